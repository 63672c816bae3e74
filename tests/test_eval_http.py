"""``lrsa eval`` against HTTP endpoints: a canned fake server (a test double of the endpoint, in a
thread), broken servers (500s, junk bodies, timeouts, nothing listening) that must produce a
report of failures rather than a crash, and the session's real ``lrsa serve``."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import Request  # module level: the routes' annotations resolve against it

from lrsa_serve.cli import main as lrsa
from lrsa_serve.eval.tasks import build_items, resolve_tasks
from lrsa_serve.pipeline.processes import free_port

LAGKV_CARD = {"sink": 32, "lag": 128, "ratio": 0.25, "score_v_ratio": 1.0, "keep": 32}
PNG = b"\x89PNG\r\n\x1a\n"
# One small grid shared by the fake-server tests: 2 tasks x 2 lengths x 2 depths x 1 sample.
GRID = ["--tasks", "passkey", "niah_multivalue", "--lengths", "256", "512",
        "--depths", "0.25", "0.75", "--samples", "1"]  # fmt: skip


class FakeEndpoint:
    """A FastAPI app on a free port in a background thread. ``reply(prompt)`` returns the
    response: a str (the completion text), or a (status, body) pair, or ("sleep", seconds)."""

    def __init__(self, reply: Callable[[str], object], models: tuple[int, object] | None = None):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, PlainTextResponse

        app = FastAPI()
        card = {"id": "fake-model", "object": "model", "max_model_len": 4096,
                "lagkv": LAGKV_CARD}  # fmt: skip
        status, body = models or (200, {"object": "list", "data": [card]})
        self.prompts: list[str] = []

        @app.get("/v1/models")
        async def list_models():
            return JSONResponse(body, status_code=status)

        async def answer(prompt: str, chat: bool):
            self.prompts.append(prompt)
            out = reply(prompt)
            if isinstance(out, tuple) and out[0] == "sleep":
                await asyncio.sleep(out[1])
                out = "late"
            if isinstance(out, tuple):
                code, payload = out
                if isinstance(payload, str):
                    return PlainTextResponse(payload, status_code=code)
                return JSONResponse(payload, status_code=code)
            choice = {"message": {"role": "assistant", "content": out}} if chat else {"text": out}
            return JSONResponse({"object": "text_completion", "choices": [choice]})

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await answer((await request.json())["prompt"], chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await answer((await request.json())["messages"][-1]["content"], chat=True)

        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeEndpoint:
        import uvicorn

        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "fake endpoint did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def answers(tokenizer) -> dict[str, tuple[str, ...]]:
    """Prompt -> expected values of the GRID items (the CLI builds the same ones)."""
    items = build_items(tokenizer, resolve_tasks(["passkey", "niah_multivalue"]), [256, 512],
                        [0.25, 0.75], 1)  # fmt: skip
    return {item.example.prompt: item.expected for item in items}


def png_ok(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_canned_server_scores_exact_and_partial(tmp_path, default_model, answers, capsys):
    def reply(prompt: str) -> str:
        values = answers[prompt]
        # passkey: right; multi-value: the first two of four values, so partial credit 0.5
        return f" {values[0]}." if len(values) == 1 else "They are " + ", ".join(values[:2])

    with FakeEndpoint(reply) as server:
        code = lrsa(["eval", "--base-url", server.url, "--tokenizer", default_model, *GRID,
                     "--out", str(tmp_path), "--concurrency", "3"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(server.prompts) == 8 and set(server.prompts) == set(answers)
    data = json.loads((tmp_path / "results.json").read_text())
    (target,) = data["targets"]
    # the setting comes from the server's card and labels the column
    assert target["name"] == target["setting"] == "S32 L128 r0.25"
    assert target["kept_ratio"] == 0.25 and target["model"] == "fake-model"
    summary = {(c["task"], c["length"]): c for c in data["summary"]}
    assert summary[("passkey", None)]["score"] == 1.0 == summary[("passkey", None)]["exact"]
    assert summary[("niah_multivalue", 512)]["score"] == 0.5
    assert summary[("niah_multivalue", 512)]["exact"] == 0.0
    assert summary[("mean", None)]["score"] == 0.75 and data["failures"] == {}
    item = next(i for i in data["items"] if i["task"] == "niah_multivalue")
    assert len(item["expected"]) == 4 and item["score"] == 0.5 and item["error"] is None
    assert "niah_multivalue  512" in out and "50%" in out and "S32 L128 r0.25" in out
    assert "8/8" in err  # the progress bar counted the requests
    report = (tmp_path / "report.md").read_text()
    assert "| passkey | 256 | 100% |" in report and "Failures" not in report
    for name in ("accuracy_vs_ratio", "depth_heatmap", "accuracy_by_task"):
        assert png_ok(tmp_path / f"{name}.png"), name


def test_a_sweep_over_servers(tmp_path, default_model, answers, capsys):
    """One --base-url per setting: columns labelled by each server's card (or NAME=)."""
    dense_card = {"id": "fake-model", "max_model_len": 4096, "lagkv": None}
    dense = FakeEndpoint(lambda prompt: " ".join(answers[prompt]),
                         models=(200, {"object": "list", "data": [dense_card]}))  # fmt: skip
    compressed = FakeEndpoint(lambda prompt: answers[prompt][0])  # first value only
    with dense, compressed:
        code = lrsa(["eval", "--base-url", dense.url, "--base-url", f"r.25={compressed.url}",
                     "--tokenizer", default_model, *GRID, "--out", str(tmp_path),
                     "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(t["name"], t["kept_ratio"]) for t in data["targets"]] == [
        ("dense", 1.0),
        ("r.25", 0.25),
    ]
    header = next(line for line in out.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "length", "dense", "r.25"]
    mean = {c["target"]: c["score"] for c in data["summary"] if c["task"] == "mean"}
    assert mean == {"dense": 1.0, "r.25": 0.625}  # passkey 1, multi-value 1 of 4
    assert png_ok(tmp_path / "accuracy_vs_ratio.png")


def test_broken_server_gives_a_report_of_failures(tmp_path, default_model, capsys):
    calls = {"multi_value": 0}

    def reply(prompt: str) -> object:
        if "pass key" in prompt:
            return 500, {"error": {"message": "engine exploded", "type": "InternalError"}}
        calls["multi_value"] += 1  # multi-value prompts: junk and timeouts, alternately
        return (200, "<html>502 Bad Gateway</html>") if calls["multi_value"] % 2 else ("sleep", 3)

    broken_models = (500, {"error": {"message": "no models today"}})
    with FakeEndpoint(reply, models=broken_models) as server:
        code = lrsa(["eval", "--base-url", f"broken={server.url}", "--tokenizer", default_model,
                     *GRID, "--out", str(tmp_path), "--timeout", "1", "--no-progress"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1, err  # ran to the end, and says that requests failed
    data = json.loads((tmp_path / "results.json").read_text())
    failures = data["failures"]["broken"]
    assert failures["failed"] == failures["requests"] == 8
    assert failures["by_task"] == {"passkey": 4, "niah_multivalue": 4}
    messages = {m["message"]: m["count"] for m in failures["messages"]}
    assert messages.pop("HTTP 500: engine exploded") == 4
    assert messages == {
        "timeout after 1s": 2,
        "malformed response: not JSON ('<html>502 Bad Gateway</html>')": 2,
    }
    (target,) = data["targets"]
    assert target["setting"] == "unknown" and target["kept_ratio"] is None
    assert any("could not read" in note and "no models today" in note for note in target["notes"])
    assert "Failures:" in out and "broken: 8 of 8 requests failed (passkey 4, niah_multivalue 4)" \
        in out  # fmt: skip
    assert "4x  HTTP 500: engine exploded" in out
    assert "0% (4/4 failed)" in out
    assert "## Failures" in (tmp_path / "report.md").read_text()
    assert png_ok(tmp_path / "accuracy_by_task.png")
    assert not (tmp_path / "accuracy_vs_ratio.png").exists()  # no known ratio: nothing to plot


def test_nothing_listening_is_reported_not_raised(tmp_path, default_model, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code = lrsa(["eval", "--base-url", url, "--tokenizer", default_model, "--tasks", "passkey",
                 "--lengths", "128", "--depths", "0.5", "--samples", "2", "--out", str(tmp_path),
                 "--no-progress", "--no-plots"])  # fmt: skip
    out, _ = capsys.readouterr()
    assert code == 1
    assert "unknown: 2 of 2 requests failed (passkey 2)" in out
    assert "2x  connection error" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--base-url", "http://x", "--sweep"], "--sweep builds in-process engines"),
        (["--base-url", "http://x", "--ratio", "0.5"], "--ratio set an in-process engine"),
        (["--base-url", "a=http://x", "--base-url", "a=http://y"], "names must be distinct"),
        (["--tasks", "passkey,nope"], "unknown task(s) nope"),
        (["--lengths", "10"], "--lengths must be at least 64"),
        (["--depths", "1.5"], "--depths must be between 0 and 1"),
        (["--sweep", "0.5", "--no-lagkv"], "already includes the uncompressed baseline"),
        (["--sweep", "2"], "--sweep ratios must be in (0, 1]"),
        (["--lag", "100", "--ratio", "0.5"], "multiples of the KV block size"),
    ],
)
def test_bad_arguments_fail_in_one_line(args, message, capsys):
    assert lrsa(["eval", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after "[prepare-model] ..." if any
    assert err.startswith("lrsa eval: error:") and message in err


@pytest.mark.engine
def test_live_server(live_server, tmp_path, capsys):
    """The real server: its card labels the run, every request is answered and scored, the
    1K-token passkey is retrieved through 4x compression of 6 of its 7 partitions."""
    code = lrsa(["eval", "--base-url", live_server.url, "--api-key", live_server.api_key,
                 "--tasks", "passkey", "niah_multivalue", "--lengths", "1024", "--depths", "0.5",
                 "--samples", "1", "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, out + err
    data = json.loads((tmp_path / "results.json").read_text())
    (target,) = data["targets"]
    assert target["setting"] == "S32 L128 r0.25" and target["model"] == "SmolLM2-135M-Instruct"
    assert target["max_model_len"] == 4096
    assert [i["error"] for i in data["items"]] == [None, None]
    assert all(i["response"] for i in data["items"])
    passkey = next(i for i in data["items"] if i["task"] == "passkey")
    assert passkey["score"] == 1.0, passkey["response"]
    assert png_ok(tmp_path / "depth_heatmap.png") and png_ok(tmp_path / "accuracy_vs_ratio.png")
