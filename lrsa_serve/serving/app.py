"""The HTTP app: vLLM's OpenAI serving layer (routers, protocol models, streaming, chat
templates, tools, logprobs, structured output, its /health and /metrics) plus what is LagKV's:
settings in /v1/models, /ready, /version, OpenAI-shaped auth errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from lrsa_serve import __version__
from lrsa_serve.config import LagKVConfig
from lrsa_serve.serving.auth import BearerAuth, openai_error
from lrsa_serve.serving.validation import ResponsesInputCheck


def _drop_routes(app: FastAPI, drop: Callable[[BaseRoute], bool]) -> None:
    app.router.routes[:] = [route for route in app.router.routes if not drop(route)]
    app.openapi_schema = None  # regenerated from the remaining routes


def _drop_route(app: FastAPI, path: str, method: str = "GET") -> None:
    def matches(route: BaseRoute) -> bool:
        methods = getattr(route, "methods", None) or set()
        return getattr(route, "path", None) == path and method in methods

    _drop_routes(app, matches)


# Routes that vLLM registers for every model but serves only when the model has a handler for
# them (app.state attribute None otherwise): without one they answer 501 to every call.
OPTIONAL_ROUTES = {"/v1/systemone": ("POST", "serving_structured_decisions")}


def drop_unserved_routes(app: FastAPI) -> None:
    """After vLLM's app state exists, drop the optional routes this model cannot serve, so
    they 404 like any unknown path and leave the OpenAPI schema."""
    for path, (method, handler) in OPTIONAL_ROUTES.items():
        if getattr(app.state, handler, None) is None:
            _drop_route(app, path, method)


# vLLM routes that change the running deployment rather than serve it: elastic expert-parallel
# scaling, sleep/wake and cache resets, collective RPC, profiling, fault tolerance, RL weight
# updates and pause/resume, runtime LoRA loading. Matched by the module that defines the handler,
# so a route vLLM adds to one of these groups is covered too. Dropped unless
# --enable-admin-routes; with it they are still behind the API key like everything else.
ADMIN_ROUTE_MODULES = (
    "vllm.entrypoints.serve.elastic_ep",
    "vllm.entrypoints.serve.dev",
    "vllm.entrypoints.serve.profile",
    "vllm.entrypoints.serve.fault_tolerance",
    "vllm.entrypoints.serve.lora",
    "vllm.entrypoints.rl",
)


def is_admin_route(route: BaseRoute) -> bool:
    module = getattr(getattr(route, "endpoint", None), "__module__", "") or ""
    return any(module == m or module.startswith(m + ".") for m in ADMIN_ROUTE_MODULES)


def build_server_app(
    args: Any,
    tasks: tuple[str, ...],
    model_config: Any,
    engine_client: Any,
    settings: LagKVConfig | None,
    api_key: str | None,
) -> FastAPI:
    """vLLM's app for ``args`` with LagKV's routes, auth and route policy: what ``lrsa serve``
    serves (tests build it without an engine to walk its router)."""
    from vllm.entrypoints.launchers.app import build_app

    app = build_app(args, tasks, model_config)
    return install_lagkv(app, engine_client, settings, api_key, args.enable_admin_routes)


def install_lagkv(
    app: FastAPI,
    engine_client: Any,
    settings: LagKVConfig | None,
    api_key: str | None,
    admin_routes: bool = False,
) -> FastAPI:
    """Add LagKV's routes to a vLLM app. Call before the app starts serving."""
    if not admin_routes:
        _drop_routes(app, is_admin_route)
    lagkv_info = settings.model_dump() | {"keep": settings.keep} if settings else None

    _drop_route(app, "/v1/models")

    @app.get("/v1/models")
    async def list_models(raw_request: Request) -> JSONResponse:
        models = await raw_request.app.state.openai_serving_models.show_available_models()
        body = models.model_dump()
        for card in body["data"]:
            card["lagkv"] = lagkv_info
        return JSONResponse(body)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """200 once the model is loaded and the engine accepts requests, else 503."""
        if getattr(engine_client, "errored", False) or not getattr(
            engine_client, "is_running", True
        ):
            return JSONResponse({"status": "engine not running"}, status_code=503)
        try:
            await engine_client.check_health()
        except Exception as e:  # the engine died: not ready, and say why
            return JSONResponse({"status": f"unhealthy: {e}"}, status_code=503)
        return JSONResponse({"status": "ready"})

    _drop_route(app, "/version")

    @app.get("/version")
    async def version() -> JSONResponse:
        from vllm import __version__ as vllm_version

        return JSONResponse({"version": __version__, "vllm": vllm_version, "lagkv": lagkv_info})

    # Router-level errors (unknown URL, wrong method) come as Starlette's exception, which vLLM's
    # handler (registered for FastAPI's subclass) misses: answer them as OpenAI does.
    app.add_exception_handler(StarletteHTTPException, _openai_http_error)
    # vLLM's app bootstrap has already built the middleware stack, so ours go in front of its
    # own (Starlette refuses add_middleware at this point); auth ends up outermost.
    app.user_middleware.insert(0, Middleware(ResponsesInputCheck))
    if api_key:
        app.user_middleware.insert(0, Middleware(BearerAuth, api_key=api_key))
    app.middleware_stack = app.build_middleware_stack()  # takes in the handler and middleware
    return app


async def _openai_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail
    if exc.status_code in (404, 405):
        message = f"Invalid URL ({request.method} {request.url.path}): {exc.detail}"
    body = openai_error(message, exc.status_code, exc.status_code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
