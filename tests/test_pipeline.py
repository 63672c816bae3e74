"""``lrsa pipeline``: config checks, the server it starts is always stopped (failure, timeout,
Ctrl-C, SIGTERM), and the CPU example runs end to end with a report holding both models' scores."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from lrsa_serve.cli import main as lrsa
from lrsa_serve.pipeline.config import load_config
from lrsa_serve.pipeline.processes import ManagedServer, PipelineError
from lrsa_serve.pipeline.stages import cli_flags

REPO = Path(__file__).resolve().parents[1]
CPU_EXAMPLE = REPO / "examples" / "pipeline-cpu.yaml"

# A stand-in for `lrsa serve`: records its pid and its child's, then serves /ready (mode "ok"),
# exits at once (mode "exit") or never becomes ready (mode "hang").
FAKE_SERVER = textwrap.dedent("""
    import http.server, json, os, subprocess, sys, time
    port, pids, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(pids, "w").write(json.dumps([os.getpid(), child.pid]))
    if mode == "exit":
        print("fatal: no such model folder", flush=True)
        sys.exit(3)
    if mode == "hang":
        time.sleep(600)
    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ready" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
""")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_dead(pids: list[int], seconds: float = 10) -> bool:
    deadline = time.time() + seconds
    while any(alive(pid) for pid in pids):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def fake_server(tmp_path: Path, mode: str, ready_timeout: float = 60) -> ManagedServer:
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVER)
    server = ManagedServer("unused", [], tmp_path / "serve.log", ready_timeout=ready_timeout)
    server.command = [sys.executable, str(script), str(server.port), str(tmp_path / "pids"), mode]
    return server


def pids_of(tmp_path: Path) -> list[int]:
    deadline = time.time() + 30
    while not (tmp_path / "pids").is_file() or not (tmp_path / "pids").read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    return json.loads((tmp_path / "pids").read_text())


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\n", "out: Field required"),
        ("out: o\ntrain: {argz: {}}\n", "train.argz: Extra inputs are not permitted"),
        ("out: o\neval: {samples: 0}\n", "eval.samples: Input should be greater than or equal"),
        ("out: o\neval: {api: rest}\n", "eval.api: Input should be 'completions' or 'chat'"),
        ("out: [unclosed\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_bad_config_is_one_line(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(Exception, match="p.yaml") as error:
        load_config(path)
    assert message in str(error.value) and "\n" not in str(error.value)


EXAMPLES = ("pipeline-cpu.yaml", "pipeline-gpu.yaml", "pipeline-paper.yaml")


def test_examples_are_valid_configs():
    for name in EXAMPLES:
        config = load_config(REPO / "examples" / name)
        assert config.train.variants and config.eval.lengths
    gpu = load_config(REPO / "examples" / "pipeline-gpu.yaml")
    assert set(gpu.train.variants) == {"dense", "lrsa"}
    assert gpu.train.variants["dense"] == {"attention": "dense"} and gpu.lagkv.ratio == 0.25


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_ask_what_the_trainer_and_eval_take(name, default_model):
    """Every variant's training flags parse and validate as `lrsa train` takes them, and every
    task named (trained or evaluated) exists: a typo would otherwise surface only minutes into
    a GPU run."""
    from lrsa_serve.cli import build_parser
    from lrsa_serve.eval.tasks import resolve_tasks
    from lrsa_serve.synthetic_tasks import TASKS
    from lrsa_serve.training.cli import build_job

    config = load_config(REPO / "examples" / name)
    settings = cli_flags(config.lagkv.model_dump(exclude_none=True))
    for variant, options in config.train.variants.items():
        flags = cli_flags({**config.train.args, **options})
        args = build_parser().parse_args(["train", default_model, "--out", "x", *settings, *flags])
        job = build_job(args)
        assert job.model.attention == options.get("attention", job.model.attention), variant
        assert set(job.data.synthetic_tasks) <= set(TASKS)
    assert resolve_tasks(config.eval.tasks)


def test_cli_flags():
    flags = cli_flags({"max_len": 1536, "resume": True, "no_thing": False, "seed": None,
                       "synthetic_tasks": ["passkey", "kv_lookup"], "lr": 1e-4})  # fmt: skip
    assert flags == ["--max-len", "1536", "--resume", "--synthetic-tasks", "passkey,kv_lookup",
                     "--lr", "0.0001"]  # fmt: skip


def test_serving_length_stays_within_the_models_context(default_model, tmp_path):
    # The GPU example's 8,000-token prompts + answers + template room ask for 8,592 tokens; the
    # default model's context is 8,192, past which vLLM refuses to start (seen on an H100).
    from lrsa_serve.pipeline.stages import serving_length

    assert (
        json.loads((Path(default_model) / "config.json").read_text())["max_position_embeddings"]
        == 8192
    )
    assert serving_length(default_model, 8592) == 8192
    assert serving_length(default_model, 2048) == 2048
    assert serving_length(str(tmp_path), 8592) == 8592  # no local config: vLLM decides


def test_missing_config_and_reserved_train_flags(tmp_path, capsys):
    assert lrsa(["pipeline", str(tmp_path / "nope.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    config = tmp_path / "p.yaml"
    config.write_text(f"out: {tmp_path / 'o'}\ntrain: {{args: {{ratio: 0.5}}}}\n")
    assert lrsa(["pipeline", str(config)]) == 2
    assert "'ratio' is set by the pipeline" in capsys.readouterr().err


# ---- the server it starts is always stopped -----------------------------------------------------
def test_server_stopped_when_the_stage_inside_fails(tmp_path):
    server = fake_server(tmp_path, "ok")
    with pytest.raises(RuntimeError, match="eval blew up"):
        with server:
            assert httpx.get(f"{server.url}/ready").status_code == 200
            pids = pids_of(tmp_path)
            raise RuntimeError("eval blew up")
    assert wait_dead(pids), "server or its child still running"


def test_server_that_exits_early_is_a_one_line_error(tmp_path):
    with pytest.raises(PipelineError, match="exited with code 3.*fatal: no such model folder"):
        with fake_server(tmp_path, "exit"):
            pass
    assert wait_dead(pids_of(tmp_path))  # its child too


def test_server_never_ready_times_out_and_is_stopped(tmp_path):
    with pytest.raises(PipelineError, match="not ready after 2s"):
        with fake_server(tmp_path, "hang", ready_timeout=2):
            pass
    assert wait_dead(pids_of(tmp_path))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_the_server(tmp_path, sig):
    """A process holding a server the way `lrsa pipeline` does, signalled while serving."""
    # Ctrl-C as a shell delivers it to a foreground job: an ignored SIGINT is inherited across
    # exec, and tests earlier in this process (in-process engines) may leave it ignored.
    holder = textwrap.dedent(f"""
        import signal
        import time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from test_pipeline import fake_server
        from lrsa_serve.pipeline.processes import stop_on_signals
        from pathlib import Path
        with stop_on_signals(), fake_server(Path({str(tmp_path)!r}), "ok"):
            print("serving", flush=True)
            time.sleep(600)
    """)
    # `python -c` in this folder: test_pipeline is importable from the working directory.
    process = subprocess.Popen(
        [sys.executable, "-c", holder],
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "serving"
        pids = pids_of(tmp_path)
        assert all(alive(pid) for pid in pids)
        process.send_signal(sig)
        process.wait(60)
        assert "KeyboardInterrupt" in process.stderr.read()  # unwound through the finally blocks
        assert wait_dead(pids), "the server outlived its pipeline"
    finally:
        if process.poll() is None:
            process.kill()


def test_base_server_with_other_settings_is_refused(tmp_path, tokenizer):
    from test_eval_http import FakeEndpoint  # serves a card with S32 L128 r0.25

    from lrsa_serve.config import LagKVConfig
    from lrsa_serve.errors import UserError
    from lrsa_serve.eval.tasks import build_items, resolve_tasks
    from lrsa_serve.pipeline.config import BaseSection, PipelineConfig
    from lrsa_serve.pipeline.stages import evaluate_models

    settings = LagKVConfig(sink=32, lag=128, ratio=0.5)
    items = build_items(tokenizer, resolve_tasks(["passkey"]), [300], [0.5], 1)
    with FakeEndpoint(lambda prompt: "x") as server:
        config = PipelineConfig(out=str(tmp_path), base=BaseSection(url=server.url))
        with pytest.raises(UserError) as error:
            evaluate_models(config, [("base", "unused", settings)], settings, items, tmp_path,
                            progress=False)  # fmt: skip
    assert (
        "runs LagKV S32 L128 r0.25, the pipeline evaluates under sink=32 lag=128 ratio=0.5"
        in str(error.value)
    )
    assert not (tmp_path / "eval" / "parts").exists()  # nothing kept from a refused server


# ---- the CPU example, end to end ---------------------------------------------------------------
@pytest.mark.engine
def test_cpu_example_pipeline(live_server, tmp_path, capsys):
    """examples/pipeline-cpu.yaml as shipped: trains, exports, serves the trained checkpoint,
    evaluates it, and reports it beside the base model. The base model is evaluated on the
    session's server (same model, LagKV settings and dtype as the example's) instead of a second
    start-up, the one override."""
    out = tmp_path / "pipe"
    code = lrsa(["pipeline", str(CPU_EXAMPLE), "--out", str(out), "--base-url", live_server.url,
                 "--base-api-key", live_server.api_key, "--no-progress"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]
    report = json.loads((out / "report.json").read_text())
    names = [t["name"] for t in report["eval"]["targets"]]
    assert names == ["base", "lrsa"]
    assert all(t["setting"] == "S32 L128 r0.25" for t in report["eval"]["targets"])
    assert report["eval"]["failures"] == {}
    items = report["eval"]["items"]
    assert len(items) == 4 and all(i["response"] is not None for i in items)
    assert report["training"]["lrsa"]["step"] == 2 and report["training"]["lrsa"]["loss"] > 0
    trained = Path(report["training"]["lrsa"]["checkpoint"])
    assert json.loads((trained / "config.json").read_text())["lagkv"]["ratio"] == 0.25
    markdown = (out / "report.md").read_text()
    mean = next(line for line in markdown.splitlines() if line.startswith("| mean |"))
    assert mean.count("%") == 2  # both models' scores, then the change in points
    assert "| task | length | base | lrsa | lrsa vs base (points) |" in markdown
    for png in ("accuracy_by_task.png", "depth_heatmap.png", "accuracy_vs_ratio.png"):
        data = (out / "eval" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"eval/{png}" in markdown
    # the server it started is gone
    trained_url = next(t["url"] for t in report["eval"]["targets"] if t["name"] == "lrsa")
    with pytest.raises(httpx.ConnectError):
        httpx.get(trained_url.removesuffix("/v1") + "/ready", timeout=5)
    assert "ready on http://127.0.0.1" in stdout and "[pipeline] done" in stdout
    # the report says how each server it stopped was started
    assert f"note: served by `lrsa serve {trained} --sink 32 --lag 128" in markdown

    # --resume of a finished run: nothing trains or is served again, the report is the same
    args = ["pipeline", str(CPU_EXAMPLE), "--out", str(out), "--base-url", live_server.url,
            "--base-api-key", live_server.api_key, "--no-progress", "--resume"]  # fmt: skip
    assert lrsa(args) == 0
    stdout = capsys.readouterr().out
    assert "train lrsa: reusing the finished run" in stdout
    assert "eval base: reusing its answers" in stdout and "eval lrsa: reusing its answers" in stdout
    assert "serve lrsa:" not in stdout and "lrsa train" not in stdout
    again = json.loads((out / "report.json").read_text())
    assert again["eval"]["items"] == report["eval"]["items"]

    # a training killed after its last checkpoint, before its export: --resume continues it from
    # that checkpoint (the trainer exports again), and the re-exported model is asked again
    metrics = trained / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("".join(line + "\n" for line in lines if '"export"' not in line))
    assert lrsa(args) == 0
    stdout = capsys.readouterr().out
    assert "resuming from its last checkpoint" in stdout and "serve lrsa:" in stdout
    assert "eval base: reusing its answers" in stdout
    events = [json.loads(line).get("event") for line in metrics.read_text().splitlines()]
    assert events[-2:] == ["resume", "export"]


def test_report_compares_every_model_with_the_base(tokenizer, tmp_path):
    from lrsa_serve.config import LagKVConfig
    from lrsa_serve.eval.runner import Answer, EvalRun, TargetInfo, grade
    from lrsa_serve.eval.tasks import build_items, resolve_tasks
    from lrsa_serve.pipeline.config import PipelineConfig
    from lrsa_serve.pipeline.report import report_markdown

    items = build_items(tokenizer, resolve_tasks(["passkey", "niah_multivalue"]), [300, 600],
                        [0.5], 1)  # fmt: skip
    lagkv = {"sink": 32, "lag": 128, "ratio": 0.25, "score_v_ratio": 1.0}
    targets = [TargetInfo("base", "http", "base-model", lagkv),
               TargetInfo("lrsa", "http", "lrsa", lagkv),
               TargetInfo("base uncompressed", "http", "base-model", None)]  # fmt: skip
    results = []
    for item in items:
        right = " ".join(item.expected)
        results.append(
            grade("base", item, Answer(right if item.task == "passkey" else "", None, 1))
        )
        results.append(grade("lrsa", item, Answer(right, None, 1)))
        results.append(grade("base uncompressed", item, Answer(None, "HTTP 503: busy", 1)))
    run = EvalRun({"tasks": ["passkey", "niah_multivalue"]}, targets, items, results)
    training = {"lrsa": {"checkpoint": str(tmp_path / "train" / "lrsa"), "step": 2, "loss": 0.5,
                         "eval_exact_match": 0.25}}  # fmt: skip
    config = PipelineConfig(out=str(tmp_path), name="unit")
    text = report_markdown(config, LagKVConfig(**lagkv), run, training, {}, tmp_path)
    assert "| task | length | base | lrsa | base uncompressed | lrsa vs base (points) |" in text
    assert "| niah_multivalue | 600 | 0% | 100% | 0% (1 failed) | +100 |" in text
    assert "| passkey | all | 100% | 100% | 0% (2 failed) | +0 |" in text
    assert "| mean | all | 50% | 100% | 0% (4 failed) | +50 |" in text
    assert "| lrsa | 2 | 0.5000 | 25% | train/lrsa |" in text
    assert "held-out exact match (teacher forcing, own attention)" in text
    assert "base uncompressed: 4 of 4 requests failed" in text
