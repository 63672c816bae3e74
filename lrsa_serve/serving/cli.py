"""``lrsa serve [MODEL]`` and ``python server.py``: vLLM's OpenAI server with LagKV.

Every vLLM server flag passes through unchanged (``--dtype``, ``--block-size``,
``--max-num-seqs``, ``--max-model-len``, ...); the "LagKV" group adds ours. MODEL defaults to the
prepared default model. A start-up failure ends in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from lrsa_serve.errors import UserError, one_line

# Without a cap a request that sets no max_tokens generates up to the context limit.
MAX_TOKENS_CAP = 1024
# The vLLM flags that lagkv_engine_kwargs checks or completes.
ENGINE_FLAGS = (
    "block_size",
    "dtype",
    "attention_backend",
    "speculative_config",
    "kv_transfer_config",
    "additional_config",
)


def multiprocess_metrics() -> None:
    """Every engine process records into one directory that /metrics aggregates; it must be set
    before prometheus_client is first imported, i.e. before vLLM."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="lrsa-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from lrsa_serve.config import add_lagkv_arguments

    parser = FlexibleArgumentParser(
        prog="lrsa serve",
        description="OpenAI-compatible server (vLLM) whose KV cache is compressed with LagKV. "
        "MODEL: a local HF model folder (default: the prepared SmolLM2-135M-Instruct).",
    )
    parser = make_arg_parser(parser)
    group = parser.add_argument_group(
        "LagKV", "Compression settings; defaults come from the checkpoint's config.json "
        '"lagkv" section, else lrsa-serve\'s defaults (sink 32, lag 256, ratio 0.25). Sink, lag '
        "and keep = int(ratio * lag) must be multiples of the KV block size.",
    )  # fmt: skip
    add_lagkv_arguments(group)
    group.add_argument(
        "--no-lagkv", action="store_true", help="serve without compression (stock vLLM)"
    )
    group.add_argument(
        "--kv-cache-gib",
        type=float,
        help="KV pool size in GiB (CPU: VLLM_CPU_KVCACHE_SPACE; GPU: --kv-cache-memory-bytes)",
    )
    group.add_argument(
        "--cors-origins", nargs="+", help="allowed CORS origins (same as --allowed-origins)"
    )
    group.add_argument(
        "--max-tokens-cap",
        type=int,
        default=MAX_TOKENS_CAP,
        help="most tokens one completion may generate: the length of requests that set no "
        "max_tokens and the limit for those that ask more (default %(default)s; 0: up to the "
        "context limit). Through vLLM's generation-config override; an explicit "
        "--override-generation-config max_new_tokens wins",
    )
    group.add_argument(
        "--enable-admin-routes",
        action="store_true",
        help="keep vLLM's routes that change the running deployment (elastic-EP scaling, "
        "sleep/wake, cache resets, profiling, RPC, weight updates, LoRA loading); off by default, "
        "behind --api-key when on",
    )
    # Prefix caching is on (vLLM's default): say in every response's usage what it saved.
    parser.set_defaults(enable_prompt_tokens_details=True)
    return parser


def prepare(args: argparse.Namespace, argv: Sequence[str]):
    """Resolve the model and LagKV settings and fold them into vLLM's arguments.
    Returns (settings or None, api key or None, why the dtype is what it is)."""
    from lrsa_serve.config import LagKVConfig, lagkv_overrides
    from lrsa_serve.engine import api
    from lrsa_serve.models import resolve_model

    model_given = args.model_tag or (args.model if any(a.startswith("--model") for a in argv)
                                     else None)  # fmt: skip
    model = resolve_model(model_given)
    args.model = args.model_tag = model
    if not args.served_model_name:  # clients name the model by its folder, not a local path
        args.served_model_name = [os.path.basename(os.path.normpath(model))]
    settings = None
    if not args.no_lagkv:
        settings = LagKVConfig.for_model(model, **lagkv_overrides(args))
    if args.block_size is None:
        args.block_size = api.default_block_size()
    dtype_reason = "--dtype"
    if args.dtype == "auto":
        args.dtype, dtype_reason = api.default_dtype()
    given = {name: getattr(args, name) for name in ENGINE_FLAGS}
    # Checked (a refused feature is an error here) and completed: LagKV's scheduler, attention
    # backend and additional_config; all of it goes back to vLLM's args.
    for name, value in api.lagkv_engine_kwargs(model, settings, **given).items():
        setattr(args, name, value)
    if args.kv_cache_gib is not None:
        if api.on_cpu():
            if args.kv_cache_gib != int(args.kv_cache_gib) or args.kv_cache_gib < 1:
                raise ValueError("--kv-cache-gib must be a whole number of GiB (>= 1) on CPU")
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(args.kv_cache_gib))
        else:
            args.kv_cache_memory_bytes = int(args.kv_cache_gib * 2**30)
    elif api.on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    bound = api.bind_cpu_workers(
        args.tensor_parallel_size, args.pipeline_parallel_size, args.enforce_eager, args.nnodes
    )
    if bound:
        print(f"lrsa serve: {bound}", file=sys.stderr, flush=True)
    if args.cors_origins:
        args.allowed_origins = args.cors_origins
    if args.max_tokens_cap < 0:
        raise ValueError("--max-tokens-cap must be >= 0 (0: up to the context limit)")
    if args.max_tokens_cap:
        # vLLM's generation-config override sets the default; the user's own override wins.
        overrides = dict(args.override_generation_config or {})
        overrides.setdefault("max_new_tokens", args.max_tokens_cap)
        args.override_generation_config = overrides
    # vLLM's own key check answers with a non-OpenAI body; ours replaces it.
    keys = args.api_key or []
    api_key = keys[0] if keys else os.environ.get("LRSA_API_KEY") or None
    args.api_key = None
    return settings, api_key, dtype_reason


async def serve(args: argparse.Namespace, settings, api_key: str | None, dtype_reason: str) -> None:
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    from lrsa_serve.serving.app import build_server_app, drop_unserved_routes

    try:
        listen_address, sock = setup_server(args, reuse_port=False)
    except OSError as e:  # e.g. the port is taken; later OSErrors are the engine's, not this
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    async with build_async_engine_client(args) as engine_client:
        tasks = await engine_client.get_supported_tasks()
        app = build_server_app(args, tasks, engine_client.model_config, engine_client,
                               settings, api_key)  # fmt: skip
        await init_app_state(engine_client, app.state, args, tasks)
        drop_unserved_routes(app)
        lagkv = f"LagKV {settings.short()}" if settings else "LagKV off (stock vLLM)"
        dtype = str(engine_client.model_config.dtype).removeprefix("torch.")
        cap = args.max_tokens_cap or "context limit"
        print(f"lrsa serve: {args.model} | {lagkv} | dtype {dtype} ({dtype_reason}) | "
              f"max_tokens cap {cap} | auth {'on' if api_key else 'off'}",
              file=sys.stderr)  # fmt: skip
        print(f"lrsa serve: listening on {listen_address}", file=sys.stderr, flush=True)
        shutdown = await serve_http(
            app,
            sock=sock,
            enable_ssl_refresh=args.enable_ssl_refresh,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
            ssl_ciphers=args.ssl_ciphers,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
        )
    try:
        await shutdown
    finally:
        sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    multiprocess_metrics()
    parser = build_parser()
    args = parser.parse_args(argv)

    from lrsa_serve.models import ModelError

    try:
        settings, api_key, dtype_reason = prepare(args, argv)
    except (ModelError, UserError, ValueError) as e:  # ValueError: LagKVConfigError, pydantic's
        print(f"lrsa serve: error: {one_line(e)}", file=sys.stderr)
        return 2
    import uvloop

    try:
        uvloop.run(serve(args, settings, api_key, dtype_reason))
    except KeyboardInterrupt:
        return 0
    except UserError as e:
        print(f"lrsa serve: error: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        print(f"lrsa serve: error: the engine failed to start: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


# `lrsa serve` is dispatched straight to main() (vLLM's flags need its own parser); these two
# keep the subcommand convention of lrsa_serve.cli for `lrsa --help`.
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs=argparse.REMAINDER, help="see `lrsa serve --help`")


def run(args: argparse.Namespace) -> int:
    return main(args.args)


if __name__ == "__main__":
    sys.exit(main())
