"""Build the CPU image from deploy/Dockerfile.cpu without a Docker daemon or a registry, run it
and smoke-test it: ``make image-test`` (``python deploy/image_test.py``). Exit 0 only if every
check passes.

- Base: a Debian bookworm root with what the python image holds (python3 with venv and its C
  headers, which torch.compile's C++ build needs; CA certificates), bootstrapped with mmdebstrap
  and imported with buildah, stands in for the python image (``PYTHON_IMAGE``).
- Build: ``buildah bud`` with the Dockerfile unchanged, through its build arguments: torch's CPU
  wheel from a local wheel directory (``WHEELS``) where PyTorch's index is unreachable, the host's
  CA bundle for pip (``CA_BUNDLE``) behind a TLS-intercepting proxy, the default model baked in.
- Run: ``buildah run`` (chroot isolation; see docs/deploy.md for why not ``podman run``) of the
  image's entry point as its configured user, then: uid 10001, ``/ready``, a chat completion
  that names Paris, SIGTERM ends it within the chart's grace period. The hub is unreachable from
  this network and the image runs with ``HF_HUB_OFFLINE=1``, so an answer means no hub was used.

Prints one table of results (image size, seconds to ``/ready``, ...) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/lrsa-base/debian-python:bookworm-3.11"
IMAGE = "localhost/lrsa-serve:image-test-cpu"
CUDA_IMAGE = "localhost/lrsa-serve:image-test-cuda"
GRACE_SECONDS = 60  # the chart's terminationGracePeriodSeconds
UID = 10001


class ImageTestError(Exception):
    """A failed step; printed as one line."""


def run(*cmd: str, capture: bool = False, log: Path | None = None) -> str:
    out = log.open("a") if log else None
    try:
        done = subprocess.run(
            cmd,
            stdout=subprocess.PIPE if capture else out,
            stderr=subprocess.STDOUT if out else None,
            text=True,
        )
    finally:
        if out:
            out.close()
    if done.returncode:
        where = f" (log: {log})" if log else ""
        raise ImageTestError(f"`{' '.join(cmd[:3])} ...` exited {done.returncode}{where}")
    return done.stdout or ""


def image_exists(name: str) -> bool:
    found = subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True)
    return found.returncode == 0


def build_base(log: Path) -> None:
    """Debian bookworm (python3 3.11, venv, headers, CA certificates) as a local image."""
    if image_exists(BASE):
        return
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        packages = "python3,python3-venv,python3-dev,ca-certificates"
        run("mmdebstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(rootfs),
            log=log)  # fmt: skip
        container = run("buildah", "from", "scratch", capture=True).strip()
        try:
            run("buildah", "add", container, str(rootfs), "/", log=log)
            run("buildah", "config", "--cmd", "/bin/bash", container, log=log)
            run("buildah", "commit", container, BASE, log=log)
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True)


def build_image(
    dockerfile: str, image: str, build_args: list[str], ca_bundle: Path | None, log: Path
) -> float:
    args = list(build_args)
    if ca_bundle:
        args += ["-v", f"{ca_bundle}:/run/ca.crt:ro", "--build-arg", "CA_BUNDLE=/run/ca.crt"]
    start = time.monotonic()
    # Docker's image format: OCI's has no SHELL (RUN would lose bash's pipefail) or HEALTHCHECK.
    run("buildah", "bud", "--format", "docker", "--isolation", "chroot",
        "-f", f"deploy/{dockerfile}", "--ignorefile", f"deploy/{dockerfile}.dockerignore",
        *args, "-t", image, str(ROOT), log=log)  # fmt: skip
    return time.monotonic() - start


def cpu_build_args(wheels: Path | None) -> list[str]:
    args = ["--build-arg", f"PYTHON_IMAGE={BASE}", "--build-arg", "MODEL=default"]
    if wheels:
        args += ["-v", f"{wheels}:/wheels:ro", "--build-arg", "WHEELS=/wheels",
                 "--build-arg", "TORCH_INDEX_URL="]  # fmt: skip
    return args


def cuda_import_check(log: Path) -> str:
    """The CUDA image cannot serve without a GPU; its packages must import."""
    container = run("buildah", "from", CUDA_IMAGE, capture=True).strip()
    try:
        return run("buildah", "run", "--isolation", "chroot", container, "--", "python", "-c",
                   "import vllm, lrsa_serve.serving.cli; print('vllm', vllm.__version__)",
                   capture=True).strip().splitlines()[-1]  # fmt: skip
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 5) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def descendants(root: int) -> list[tuple[int, list[bytes]]]:
    """(pid, argv) of every process below ``root``."""
    children: dict[int, list[int]] = {}
    argv: dict[int, list[bytes]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            argv[int(proc.name)] = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(proc.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, argv.get(child, [])))
            todo.append(child)
    return found


def container_processes(root: int, deadline: float) -> tuple[int, int]:
    """The container's tini and the `lrsa serve` it runs (the entry point execs into it)."""
    while time.monotonic() < deadline:
        procs = descendants(root)
        tini = [pid for pid, argv in procs if argv[0].endswith(b"tini")]
        serve = [pid for pid, argv in procs
                 if any(a.endswith(b"/lrsa") for a in argv[:2]) and b"serve" in argv]  # fmt: skip
        if tini and serve:
            return tini[0], serve[0]
        time.sleep(0.5)
    raise ImageTestError("the entry point never started `lrsa serve` under tini")


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise ImageTestError(f"no Uid line for pid {pid}")


def run_and_probe(log: Path, ready_timeout: float) -> dict:
    config = json.loads(run("buildah", "inspect", "--type", "image", IMAGE, capture=True))
    user = config["OCIv1"]["config"].get("User", "")
    if user != f"{UID}:{UID}":
        raise ImageTestError(f"the image's user is {user!r}, not {UID}:{UID}")
    healthcheck = (config.get("Docker", {}).get("config") or {}).get("Healthcheck") or {}
    container = run("buildah", "from", IMAGE, capture=True).strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = log.open("a")
    start = time.monotonic()
    proc = subprocess.Popen(
        ["buildah", "run", "--isolation", "chroot", "--env", f"LRSA_PORT={port}",
         "--env", "LRSA_HOST=127.0.0.1", "--env", "TINI_SUBREAPER=1", container, "--",
         "/usr/bin/tini", "--", "/usr/local/bin/docker-entrypoint.sh", "--max-model-len", "8192"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    result: dict = {"healthcheck": " ".join(healthcheck.get("Test", []))}
    try:
        tini, serve = container_processes(proc.pid, start + ready_timeout)
        result["uid"] = uid_of(serve)
        while time.monotonic() - start < ready_timeout:
            if proc.poll() is not None:
                raise ImageTestError(f"the container exited {proc.returncode} before /ready")
            try:
                if http(f"{url}/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            raise ImageTestError(f"/ready did not answer within {ready_timeout:.0f} s")
        result["seconds_to_ready"] = round(time.monotonic() - start, 1)
        models = json.loads(http(f"{url}/v1/models")[1])["data"]
        body = {
            "model": models[0]["id"],
            "temperature": 0,
            "max_tokens": 24,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
        status, text = http(f"{url}/v1/chat/completions", body, timeout=300)
        answer = json.loads(text)["choices"][0]["message"]["content"] if status == 200 else text
        result["answer"] = answer.strip()
        stop = time.monotonic()
        os.kill(tini, signal.SIGTERM)  # what the kubelet sends to the pod's PID 1
        try:
            proc.wait(GRACE_SECONDS)
            result["seconds_to_stop"] = round(time.monotonic() - stop, 1)
            result["exit_code"] = proc.returncode
        except subprocess.TimeoutExpired:
            result["seconds_to_stop"] = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()
        subprocess.run(["buildah", "rm", container], capture_output=True)
    return result


def image_size(image: str) -> str:
    return json.loads(run("buildah", "images", "--json", image, capture=True))[0]["size"]


def checks(result: dict) -> dict[str, bool]:
    if "import" in result:  # the CUDA image
        return {"vllm and lrsa_serve import": result["import"].startswith("vllm ")}
    return {
        f"runs as uid {UID}": result.get("uid") == UID,
        "keeps its HEALTHCHECK": "/health" in result.get("healthcheck", ""),
        "/ready answers": result.get("seconds_to_ready") is not None,
        "chat names Paris": "Paris" in result.get("answer", ""),
        f"SIGTERM stops it within {GRACE_SECONDS} s": result.get("seconds_to_stop") is not None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wheels",
        type=Path,
        default=Path("/opt/wheels"),
        help="local wheel directory holding torch 2.13.0+cpu (skipped if absent)",
    )
    parser.add_argument(
        "--ca-bundle",
        type=Path,
        default=Path("/etc/ssl/certs/ca-certificates.crt"),
        help="CA bundle pip trusts inside the build (skipped if absent)",
    )
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument(
        "--cuda",
        action="store_true",
        help="build deploy/Dockerfile instead and check that its packages import "
        "(it cannot serve without a GPU)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="default: out/image-test-cpu.json or out/image-test-cuda.json",
    )
    args = parser.parse_args(argv)
    args.json = args.json or ROOT / "out" / f"image-test-{'cuda' if args.cuda else 'cpu'}.json"
    missing = [tool for tool in ("buildah", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        print(f"image-test: error: needs {', '.join(missing)} (apt install buildah mmdebstrap)",
              file=sys.stderr)  # fmt: skip
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    log = args.json.with_suffix(".log")
    log.write_text("")
    ca_bundle = args.ca_bundle if args.ca_bundle.is_file() else None
    try:
        build_base(log)
        if args.cuda:
            base = ["--build-arg", f"CUDA_IMAGE={BASE}"]
            seconds = build_image("Dockerfile", CUDA_IMAGE, base, ca_bundle, log)
            result = {"build_seconds": round(seconds), "image_size": image_size(CUDA_IMAGE)}
            result["import"] = cuda_import_check(log)
        else:
            wheels = args.wheels if args.wheels.is_dir() else None
            seconds = build_image("Dockerfile.cpu", IMAGE, cpu_build_args(wheels), ca_bundle, log)
            result = {"build_seconds": round(seconds), "image_size": image_size(IMAGE)}
            result |= run_and_probe(log, args.ready_timeout)
    except ImageTestError as e:
        print(f"image-test: error: {e}", file=sys.stderr)
        return 1
    passed = checks(result)
    result["checks"] = passed
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        if key != "checks":
            print(f"{key:>16}  {value}")
    for name, ok in passed.items():
        print(f"{'ok' if ok else 'FAILED':>16}  {name}")
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
