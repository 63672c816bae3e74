"""The locust load test: its CI profile against the live server (failures fail the run, and the KV
pool is idle again afterwards), and its failure detection against a deliberately broken server.
Locust runs as a subprocess: it monkey-patches the standard library through gevent."""

from __future__ import annotations

import csv
import json
import os
import runpy
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOADTESTS = ROOT / "loadtests"
# loadtests/ holds scripts (locust loads locustfile.py by path), not a package: hosts.py's names.
_hosts = runpy.run_path(str(LOADTESTS / "hosts.py"))
HostNotAllowed, check_target = _hosts["HostNotAllowed"], _hosts["check_target"]


def locust_command() -> list[str]:
    exe = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")
    if exe is None:
        pytest.skip("locust not installed (dev extra)")
    return [exe]


def run_locust(host: str, csv_prefix: Path, *args: str, api_key: str = "", timeout: float = 240):
    env = {k: v for k, v in os.environ.items() if k != "LRSA_API_KEY"}
    if api_key:
        env["LRSA_API_KEY"] = api_key
    return subprocess.run(
        [*locust_command(), "--config", "loadtests/ci.conf", "--host", host,
         "--csv", str(csv_prefix), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def stats(csv_prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{csv_prefix}_stats.csv") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


# ---- where a load test may send traffic ----


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://127.8.9.10:1", "http://[::1]:8000", "http://localhost"]
)
def test_loopback_hosts_are_allowed(url):
    assert check_target(url) == url


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:8000", "http://192.168.1.5", "https://8.8.8.8", "ftp://127.0.0.1", ""]
)
def test_other_hosts_are_refused(url):
    with pytest.raises(HostNotAllowed):
        check_target(url)


def test_remote_needs_opting_in():
    # No traffic: an IP literal is checked without a lookup, and nothing connects here.
    assert check_target("http://10.0.0.1:8000", allow_remote=True) == "http://10.0.0.1:8000"


def test_locust_refuses_before_any_request(tmp_path):
    result = run_locust("ftp://127.0.0.1:1", tmp_path / "refused", timeout=60)
    assert result.returncode != 0 and "not an http(s) URL" in result.stderr


# ---- failure detection, against a local server that breaks the contract on purpose ----


class BrokenServer(BaseHTTPRequestHandler):
    """/v1/models and /tokenize like vLLM; each generation request gets the next fault."""

    faults = ["no_done", "bad_json", "http_500", "error_event", "short", "not_sse"]
    card = {"id": "m", "max_model_len": 4096, "lagkv": {"sink": 32, "lag": 128}}
    served: list[str] = []
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.reply(200, json.dumps({"object": "list", "data": [self.card]}).encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            self.reply(200, json.dumps({"count": len(body["prompt"].split())}).encode())
            return
        with self.lock:
            fault = self.faults[len(self.served) % len(self.faults)]
            self.served.append(fault)
        if fault == "http_500":
            self.reply(500, b'{"error": {"message": "boom"}}')
            return
        chunk = {"choices": [{"index": 0, "text": "x", "delta": {"content": "x"}}]}
        usage = {"choices": [], "usage": {"prompt_tokens": 700, "completion_tokens": 24}}
        lines = [f"data: {json.dumps(chunk)}"] * 3
        if fault == "bad_json":
            lines.append("data: {not json")
        elif fault == "error_event":
            lines.append('data: {"error": {"message": "engine died"}}')
        elif fault == "not_sse":
            lines.append("event: surprise")
        elif fault == "short":
            usage["usage"]["completion_tokens"] = 3
        lines.append(f"data: {json.dumps(usage)}")
        if fault != "no_done":
            lines.append("data: [DONE]")
        self.reply(200, "".join(f"{line}\n\n" for line in lines).encode(), "text/event-stream")


def run_against(handler, csv_prefix: Path) -> subprocess.CompletedProcess:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        return run_locust(host, csv_prefix, "--users", "2", "--run-time", "4s", timeout=90)
    finally:
        server.shutdown()


def test_malformed_streams_fail_the_run(tmp_path):
    result = run_against(BrokenServer, tmp_path / "broken")
    assert result.returncode == 1, result.stderr[-2000:]
    with open(tmp_path / "broken_failures.csv") as f:
        messages = " ".join(row["Error"] for row in csv.DictReader(f))
    for expected in ("without data: [DONE]", "JSONDecodeError", "HTTP 500", "error event",
                     "3 tokens", "not an SSE data line"):  # fmt: skip
        assert expected in messages, (expected, messages)
    # No request passed, so no TTFT/ITL/E2E sample was recorded for a broken stream.
    assert not [k for k in stats(tmp_path / "broken") if k[0] in ("TTFT", "ITL", "E2E")]


# ---- the CI profile against the real server ----


def wait_idle(server, timeout: float = 60) -> dict[str, float]:
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
             "lagkv_resident_kv_tokens")  # fmt: skip
    deadline = time.time() + timeout
    while True:
        values = {name: server.metric(name) for name in names}
        if not any(values.values()) or time.time() > deadline:
            return values
        time.sleep(0.5)


@pytest.mark.engine
def test_ci_profile_against_the_live_server(live_server, tmp_path):
    before = live_server.metric("lagkv_compressed_partitions_total")
    result = run_locust(live_server.url, tmp_path / "ci", api_key=live_server.api_key)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = stats(tmp_path / "ci")
    aggregated = rows[("", "Aggregated")]
    assert int(aggregated["Failure Count"]) == 0
    names = {name for kind, name in rows if kind == "POST"}
    assert {"chat short", "completion short"} <= names
    assert names & {"chat long", "completion long"}, names
    for name in names:
        for kind in ("TTFT", "ITL", "E2E"):
            assert int(rows[(kind, name)]["Request Count"]) > 0, (kind, name)
        assert int(rows[("POST", name)]["Request Count"]) == int(
            rows[("E2E", name)]["Request Count"]
        )
    # Long prompts crossed several lag partitions, so the server compressed some.
    assert live_server.metric("lagkv_compressed_partitions_total") - before >= 3
    # Every request's blocks went back to the pool.
    assert wait_idle(live_server) == {
        "vllm:num_requests_running": 0,
        "vllm:num_requests_waiting": 0,
        "vllm:kv_cache_usage_perc": 0,
        "lagkv_resident_kv_tokens": 0,
    }


def test_a_server_too_small_for_long_prompts_fails_the_run(tmp_path):
    class Small(BrokenServer):
        card = {"id": "m", "max_model_len": 400, "lagkv": {"sink": 32, "lag": 128}}

    result = run_against(Small, tmp_path / "small")
    assert result.returncode == 1 and "leaves no room" in result.stderr, result.stderr[-2000:]
