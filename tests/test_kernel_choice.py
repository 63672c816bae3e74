"""Kernel choices that must fail loudly rather than fall back: a broken FlashAttention-4 install
(never reported as absent, which would run FlashAttention-2 instead) and a kernel the custom op
cannot run. CPU only: the FA4 installs are fake packages on a temporary ``sys.path``."""

from __future__ import annotations

import sys

import pytest
import torch

from lrsa_serve.config import LagKVConfig
from lrsa_serve.training.attention import varlen as lv
from lrsa_serve.training.attention.op import lrsa_varlen_op


@pytest.fixture
def fake_flash_attn(tmp_path, monkeypatch):
    """Installs a fake ``flash_attn`` package: ``files`` maps paths under it to their source.
    The real one (if any) is hidden from ``sys.modules`` and ``_fa4``'s cache meanwhile."""
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    lv._fa4.cache_clear()

    def install(files: dict[str, str]) -> None:
        for relative, source in files.items():
            path = tmp_path / "flash_attn" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source)

    yield install
    lv._fa4.cache_clear()
    # Plain pops: monkeypatch then puts back only what was there before (a real install).
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        sys.modules.pop(name)


@pytest.mark.parametrize(
    "source, cause",
    [
        ("raise ImportError('libcuda missing')", "ImportError: libcuda missing"),
        ("import cutlass_dsl_absent_xyz", "No module named 'cutlass_dsl_absent_xyz'"),
        ("raise OSError('libcudart.so.13: cannot open shared object file')", "libcudart"),
    ],
)
def test_a_broken_fa4_install_is_an_error_naming_the_package_and_cause(
    fake_flash_attn, source, cause
):
    fake_flash_attn({"__init__.py": "", "cute/__init__.py": source + "\n"})
    with pytest.raises(ImportError, match="flash-attn-4") as raised:
        lv._fa4()
    assert cause in str(raised.value)
    with pytest.raises(ImportError, match="flash-attn-4") as raised:  # a named fa4 asks too
        lv.default_kernel(torch.randn(1, 4, 40, 16), "fa4")
    assert cause in str(raised.value)


def test_an_absent_fa4_is_none(fake_flash_attn, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # blocks the import: not installed
    assert lv._fa4() is None


def test_flash_attention_2_alone_is_no_fa4(fake_flash_attn):
    fake_flash_attn({"__init__.py": "VERSION = '2'\n"})  # flash_attn without cute
    assert lv._fa4() is None


def test_an_installed_fa4_imports(fake_flash_attn):
    fake_flash_attn({"__init__.py": "", "cute/__init__.py": "flash_attn_varlen_func = None\n"})
    assert lv._fa4().__name__ == "flash_attn.cute"


def test_the_op_names_why_it_cannot_take_the_automatic_kernel(monkeypatch):
    """On CUDA, float32/64 queries get the memory-efficient kernel automatically, which the op
    does not run: the error says to check ``op_applies`` (simulated here on the CPU)."""
    monkeypatch.setattr(lv, "default_kernel", lambda query, kernel="auto": "efficient")
    q = torch.randn(1, 2, 40, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="check op_applies first"):
        lrsa_varlen_op(q, q, q, LagKVConfig(sink=4, lag=16, ratio=0.25).rule, None)


def test_one_function_says_where_each_kernel_applies():
    """``kernel_applies`` holds every kernel's conditions (CPU queries here: math only); the
    automatic choice and the op read it."""
    q = torch.randn(1, 2, 40, 16)
    assert lv.kernel_applies("math", q)
    assert not any(lv.kernel_applies(kernel, q) for kernel in ("fa4", "flash", "efficient"))
    with pytest.raises(ValueError, match="kernel must be one of"):
        lv.kernel_applies("auto", q)
