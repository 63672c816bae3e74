"""The LRSA varlen path against the dense masked reference.

The varlen path runs its items in plain torch on CPU (``kernel="math"``): forward and gradients
are checked against the float64 oracle; on CUDA (tests marked ``gpu``) it runs FlashAttention-4
or -2 varlen (bf16) or the memory-efficient kernel (float32).
"""

from __future__ import annotations

import pytest
import torch

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.reference_attention import masked_attention
from lrsa_serve.training.attention import dispatch, sequence_select
from lrsa_serve.training.attention import varlen as lv

# (sink, lag, ratio, length): lengths off partition boundaries, sinks off block boundaries,
# a sequence shorter than S + 2L (no compression) and one shorter than the sink.
SHAPES = [
    (4, 16, 0.25, 100),
    (3, 16, 0.5, 77),
    (0, 8, 0.25, 61),
    (5, 32, 0.25, 203),
    (6, 16, 0.25, 5),
    (16, 16, 0.125, 150),
    (2, 16, 0.25, 30),
]


def oracle(q, k, v, cfg, scale):
    """Float64 dense attention under lagkv.visibility_mask: the rule written the obvious way,
    through the one plain-torch reference attention."""
    with torch.no_grad():
        kept = lagkv.select_all(k, v, cfg.rule)
    visible = lagkv.visibility_mask(k.shape[2], kept, cfg.rule)  # [B, Hkv, n, n]
    return masked_attention(q.double(), k.double(), v.double(), visible, scale)


def qkv(n, dtype, heads=(6, 2), dim=8, batch=2, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads[0], n, dim), (batch, heads[1], n, dim), (batch, heads[1], n, dim)]
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad) for s in shapes]


def assert_matches_oracle(out, q, k, v, cfg, dtype) -> None:
    """``out`` (from q, k, v with scale 0.3) and its gradients equal the float64 oracle's."""
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle(q2, k2, v2, cfg, 0.3)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    weights = torch.randn_like(ref)
    (out.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got.double(), want, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sink,lag,ratio,n", [*SHAPES, (4, 16, 0.25, 36), (4, 16, 0.25, 68)])
def test_varlen_matches_oracle_forward_and_gradients(sink, lag, ratio, n, dtype):
    """The varlen items (plain-torch kernel on CPU) give the rule's outputs and gradients; the
    extra shapes end exactly at S + 2L and on a partition boundary."""
    cfg = LagKVConfig(sink=sink, lag=lag, ratio=ratio)
    q, k, v = qkv(n, dtype, heads=(6, 2), seed=n + 7, grad=True)
    out = dispatch.lrsa_varlen(q, k, v, cfg.rule, 0.3, kernel="math")
    assert out.shape == (2, n, 6, 8) and out.dtype == dtype
    assert_matches_oracle(out, q, k, v, cfg, dtype)


def test_varlen_attends_in_the_autocast_dtype():
    """Under autocast the float32 q/k/v a fp32-weight model makes (RoPE) are attended in the
    autocast dtype, as SDPA does (on CUDA: the bf16 flash kernel, not the float32 one)."""
    cfg = LagKVConfig(sink=4, lag=16, ratio=0.25)
    q, k, v = qkv(100, torch.float32, heads=(4, 2), seed=3, grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dispatch.lrsa_varlen(q, k, v, cfg.rule, 0.3, kernel="math")
    assert out.dtype == torch.bfloat16
    ref = oracle(q, k, v, cfg, 0.3)
    assert float((out.double() - ref).norm() / ref.norm()) < 2e-2
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32


@pytest.mark.parametrize("n", [1, 5, 36, 37, 67, 68, 69, 100, 203])
def test_varlen_packing_computes_exactly_the_visible_pairs(n):
    """Each item's keys are distinct, the item's queries are its last keys, and the pairs the
    bottom-right causal items compute are the rule's visible pairs (per KV head, any selection)."""
    cfg = LagKVConfig(sink=4, lag=16, ratio=0.25)
    rule = cfg.rule
    packing = lv.packing_for(n, rule)
    assert sum(packing.q_lens) == n and len(packing.template) == sum(packing.k_lens)
    k = torch.randn(1, 1, n, 8, generator=torch.Generator().manual_seed(n))
    kept = lagkv.select_all(k, k, cfg.rule)
    index = lv.key_index(kept, packing, torch.tensor(packing.template))[0, :, 0]
    visible = torch.zeros(n, n, dtype=torch.bool)
    q0 = k0 = 0
    for lq, lk in zip(packing.q_lens, packing.k_lens, strict=True):
        keys = index[k0 : k0 + lk]
        assert len(set(keys.tolist())) == lk
        assert keys[lk - lq :].tolist() == list(range(q0, q0 + lq))
        for i in range(lq):
            visible[q0 + i, keys[: lk - lq + i + 1]] = True
        q0, k0 = q0 + lq, k0 + lk
    assert torch.equal(visible, lagkv.visibility_mask(n, kept, cfg.rule)[0, 0])
    assert packing.visible_pairs() == int(visible.sum())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_model_lrsa_varlen_equals_reference(kind):
    """The registered "lrsa" attention inside a real HF model (varlen items in plain torch on
    CPU) gives the reference attention's logits; lrsa_forward_logits restores the model's
    attention."""
    from engine_helpers import lrsa_forward_logits

    from benchmarks.random_models import random_model, tiny_config
    from lrsa_serve.reference_attention import use_lagkv_reference

    cfg = LagKVConfig(sink=4, lag=16, ratio=0.25)
    model = random_model(tiny_config(kind, vocab_size=300), seed=1).eval()
    ids = torch.randint(0, 300, (2, 117), generator=torch.Generator().manual_seed(0))
    dispatch.set_kernel("math")
    try:
        fast = lrsa_forward_logits(model, ids, cfg)
    finally:
        dispatch.set_kernel("auto")
    assert model.config._attn_implementation == "sdpa"
    assert getattr(model.config, "lagkv", None) is None
    with torch.no_grad():
        ref = use_lagkv_reference(model, cfg)(ids).logits
        model.set_attn_implementation("sdpa")
        dense = model(ids).logits
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    assert (dense - ref).abs().max() > 1e-3  # the rule really changes something here


# ---- CUDA: forward and backward at real sizes -------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    "sink,lag,ratio,n,heads,dim,dtype",
    [
        (16, 1024, 0.25, 5000, (12, 2), 128, torch.bfloat16),  # the benchmark's shape
        (32, 256, 0.25, 3001, (9, 3), 64, torch.bfloat16),  # the default model's shape
        (32, 256, 0.25, 3001, (9, 3), 64, torch.float32),  # tight tolerance
    ],
)
def test_cuda_forward_backward_match_reference(sink, lag, ratio, n, heads, dim, dtype):
    """varlen (flash for bf16, memory-efficient kernel for float32), fwd+bwd."""
    cfg = LagKVConfig(sink=sink, lag=lag, ratio=ratio)
    g = torch.Generator(device="cuda").manual_seed(n)
    shapes = [(1, heads[0], n, dim), (1, heads[1], n, dim), (1, heads[1], n, dim)]
    base = [torch.randn(*s, generator=g, device="cuda") for s in shapes]
    fast_in = [t.to(dtype).detach().requires_grad_() for t in base]  # distinct leaves even
    ref_in = [t.detach().clone().requires_grad_() for t in base]  # when dtype is float32
    out = dispatch.lrsa_varlen(*fast_in, cfg.rule, dim**-0.5)
    assert torch.isfinite(out).all()
    # the module's own (compiled) selection: float rounding differences between compiled and
    # eager scores could flip a near-tie at the top-K boundary and move one kept token
    kept = sequence_select.select_kept(fast_in[1], fast_in[2], cfg.rule)
    # float32 reference on the same (rounded) inputs, selection from the same keys
    visible = lagkv.visibility_mask(n, kept, cfg.rule)
    qr, kr, vr = (t.to(dtype).float() for t in ref_in)
    ref = masked_attention(qr, kr, vr, visible, dim**-0.5)
    weights = torch.randn_like(ref)
    (out.float() * weights).sum().backward()
    (ref * weights).sum().backward()
    # relative L2 error
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert rel(out, ref) < tol
    for got, want in zip(fast_in, ref_in, strict=True):
        assert rel(got.grad, want.grad) < tol * 2


def assert_cuda_kernels_match_math(attend, batch: int, n: int, dim: int) -> None:
    """``attend(q, k, v, rule, scale, kept, fast)`` with the CUDA kernels (bf16, ``fast``) against
    its plain-torch kernels on the same rounded inputs in float32, forward and backward."""
    rule = LagKVConfig(sink=16, lag=256, ratio=0.25).rule
    g = torch.Generator(device="cuda").manual_seed(n)
    shapes = [(batch, 12, n, dim), (batch, 2, n, dim), (batch, 2, n, dim)]
    base = [torch.randn(*s, generator=g, device="cuda").bfloat16() for s in shapes]
    kept = sequence_select.select_kept(base[1], base[2], rule)
    fast_in = [t.detach().requires_grad_() for t in base]
    ref_in = [t.detach().float().requires_grad_() for t in base]
    out = attend(*fast_in, rule, dim**-0.5, kept, True)
    ref = attend(*ref_in, rule, dim**-0.5, kept, False)
    weights = torch.randn_like(ref)
    (out.float() * weights).sum().backward()
    (ref * weights).sum().backward()

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert rel(out, ref) < 2e-2
    for got, want in zip(fast_in, ref_in, strict=True):
        assert rel(got.grad, want.grad) < 4e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel", ["fa4", "flash"])
@pytest.mark.parametrize("batch,n,dim", [(2, 1500, 128), (1, 2200, 64)])
def test_cuda_varlen_kernels_match_math(kernel, batch, n, dim):
    """Each CUDA varlen kernel; batch 2, a short last partition, both head dims the benchmarks
    use."""
    if kernel == "fa4" and not lv.kernel_applies("fa4", torch.empty(dim, device="cuda").bfloat16()):
        pytest.skip("flash-attn-4 not installed or not this GPU")

    def attend(q, k, v, rule, scale, kept, fast):
        chosen = kernel if fast else "math"
        return lv.lrsa_varlen_attention(q, k, v, rule, scale, kernel=chosen, kept=kept)

    assert_cuda_kernels_match_math(attend, batch, n, dim)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel", ["fa4", "flash"])
@pytest.mark.parametrize("n,heads,dim", [(5000, (12, 2), 128), (32768, (14, 2), 64)])
def test_cuda_varlen_op_matches_eager(kernel, n, heads, dim):
    """The custom op ``lrsa::varlen`` (the kernel's own backward called directly, the packers'
    explicit backwards; at 32K the Triton selection and packing) against the eager path with the
    same kernel: the same output, gradients within the kernels' atomic-add rounding."""
    from lrsa_serve.training.attention.op import lrsa_varlen_op

    if kernel == "fa4" and not lv.kernel_applies("fa4", torch.empty(dim, device="cuda").bfloat16()):
        pytest.skip("flash-attn-4 not installed or not this GPU")
    cfg = LagKVConfig(sink=16, lag=1024, ratio=0.25)
    g = torch.Generator(device="cuda").manual_seed(n)
    shapes = [(1, heads[0], n, dim), (1, heads[1], n, dim), (1, heads[1], n, dim)]
    base = [torch.randn(*s, generator=g, device="cuda").bfloat16() for s in shapes]
    grad = torch.randn(1, n, heads[0], dim, generator=g, device="cuda").bfloat16()
    results = []
    for attend in (
        lambda *x: dispatch.lrsa_varlen(*x, cfg.rule, dim**-0.5, kernel=kernel),
        lambda *x: lrsa_varlen_op(*x, cfg.rule, dim**-0.5, kernel=kernel),
    ):
        leaves = [t.detach().clone().requires_grad_() for t in base]
        out = attend(*leaves)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in leaves])

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    eager, op = results
    assert rel(op[0], eager[0]) < 1e-3
    for got, want in zip(op[1:], eager[1:], strict=True):
        assert torch.isfinite(got).all() and rel(got, want) < 1e-2


def test_cpu_selects_and_packs_in_plain_torch_at_any_length():
    """The Triton selection and packing are CUDA paths (from ``TRITON_MIN_LENGTH`` tokens): a CPU
    run takes plain torch even past that length."""
    for n in (40, sequence_select.TRITON_MIN_LENGTH):
        k = torch.empty(1, 2, n, 16)
        assert sequence_select.selector_for(k) == "eager" and lv.packer_for(k) == "torch"


def test_varlen_kernel_choice_is_explicit():
    """A kernel that cannot run is an error naming the cause, never a silent fallback, both
    where the trainer sets it and where a call names it."""
    q = torch.randn(1, 4, 40, 16)
    with pytest.raises(ValueError, match="kernel must be one of"):
        lv.default_kernel(q, "fast")
    with pytest.raises(ValueError, match="kernel must be one of"):
        dispatch.set_kernel("fast")
    assert lv.default_kernel(q) == "math"  # CPU
    assert lv.default_kernel(q, "efficient") == "efficient"  # a named kernel is taken as is
    if lv._fa4() is None:  # FA4 is a GPU-only optional package
        rule = LagKVConfig(sink=4, lag=8, ratio=0.25).rule
        k = torch.randn(1, 2, 40, 16)
        with pytest.raises(ValueError, match="flash-attn-4"):
            lv.lrsa_varlen_attention(q, k, k, rule, kernel="fa4")
        with pytest.raises(ValueError, match="flash-attn-4"):
            dispatch.set_kernel("fa4")


def test_dense_baseline_is_sdpa_without_a_mask(monkeypatch):
    """The trainer's dense attention gives transformers' own SDPA loss and gradients, and never
    asks transformers to build or check a mask (that check reads the device every forward)."""
    import transformers.masking_utils as masking

    from benchmarks.random_models import random_model, tiny_config
    from lrsa_serve.training import model as model_mod

    model = random_model(tiny_config("qwen2", vocab_size=300), seed=3).double()
    ids = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    model.set_attn_implementation("sdpa")
    want = loss_and_grads()
    model_mod.set_attention(model, "dense", LagKVConfig(sink=4, lag=16, ratio=0.25))

    def no_mask(*args, **kwargs):
        raise AssertionError("a mask was built")

    monkeypatch.setattr(masking, "find_packed_sequence_indices", no_mask)
    monkeypatch.setattr(masking, "sdpa_mask", no_mask)
    got = loss_and_grads()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
