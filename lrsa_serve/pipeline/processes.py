"""The subprocesses the pipeline starts (trainers, servers): each in its own process group, so
stopping it stops everything it started; logs to files."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lrsa_serve.errors import UserError


class PipelineError(UserError):
    """A stage failed; the message is one line and names the log to read."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process's whole group (its own session: engine workers included), then
    SIGKILL what is left after ``grace`` seconds."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:  # children may outlive the leader; the group id is the leader's pid
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "(empty log)")


def run_logged(command: Sequence[str], log_path: Path, *, append: bool = False) -> int:
    """Run to completion in its own process group, copying its output to ``log_path`` (after
    what it holds with ``append``) and to stdout; killed with its group if we are interrupted."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a" if append else "w") as log:
        process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(line)
                sys.stdout.flush()
            return process.wait()
        finally:
            stop_group(process, grace=10)


class ManagedServer:
    """``lrsa serve`` in its own process group on a free port; ready when ``/ready`` says 200."""

    def __init__(
        self, model: str, serve_args: Sequence[str], log_path: Path, *, ready_timeout: float = 900.0
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Hex: a urlsafe token starts with "-" one time in 64, which argparse reads as a flag.
        self.api_key = secrets.token_hex(16)  # only the pipeline talks to its servers
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        address = ["--host", "127.0.0.1", "--port", str(self.port)]
        self.command = [sys.executable, "-m", "lrsa_serve.serving.cli", model, *address]
        self.command += ["--api-key", self.api_key, *serve_args]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ManagedServer:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each server its own metrics folder
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            deadline = time.monotonic() + self.ready_timeout
            while True:
                if self.process.poll() is not None:
                    raise PipelineError(
                        f"the server exited with code {self.process.returncode} before it was "
                        f"ready: {last_line(self.log_path)} (log: {self.log_path})"
                    )
                try:
                    if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"the server was not ready after {self.ready_timeout:g}s "
                        f"(log: {self.log_path})"
                    )
                time.sleep(1)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt (as Ctrl-C does) so every ``finally`` that
    stops a server runs; the previous handlers come back afterwards."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
