"""A real `lrsa serve` subprocess on a free local port, for tests that talk HTTP to it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lrsa_serve.pipeline.processes import free_port


class LiveServer:
    def __init__(self, *args: str, api_key: str | None = None, timeout: float = 900) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.args = list(args)
        self.timeout = timeout
        self.log_path = Path(tempfile.mkstemp(prefix="lrsa-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LiveServer:
        cmd = [sys.executable, "-m", "lrsa_serve.serving.cli", "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]  # fmt: skip
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.__exit__(None, None, None)
        raise TimeoutError(f"server not ready in {self.timeout}s:\n{self.tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics, plus labelled ones keyed by their full text."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def metric(self, name: str) -> float:
        """Sum of a series over its labels (e.g. vllm:num_requests_running{...})."""
        pattern = re.compile(rf"^{re.escape(name)}(\{{.*\}})?$")
        return sum(v for k, v in self.metrics().items() if pattern.match(k))
