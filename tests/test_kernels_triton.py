"""Triton LagKV select/compact against the paged torch path (``naive.py``, itself tested against
``lagkv.py``): kept indices exactly, moved rows bitwise, every other block untouched.

Without CUDA the kernels run in Triton's interpreter at small shapes, in a child pytest (see
IN_CHILD; ~30 s on 2 cores); with CUDA the same tests run compiled, and the ``gpu`` tests add real
sizes (L=1024, 8 KV heads, head_dim 128, 64 sequences; L=2048). Run:
``pytest tests/test_kernels_triton.py`` (CPU or GPU; ``-m gpu`` for the real sizes only).

How exact is "exact": the kernel's spreads (std over channels) equal torch's bit for bit on the
CPU, but its softmax rounds differently from torch's in the last ulp, so two tokens whose
reference scores are within a few ulps of each other at the keep boundary can swap. Random
scores at L=1024 have such near-ties in a few percent of heads (even exact float32 ties), so the
comparison is: the selection equals the reference's exactly, except that tokens whose reference
score lies within ``NEAR_TIE`` (relative) of the reference's keep-th score may differ; such swaps
are counted, and none is allowed in the small CPU cases, where boundary gaps are far wider. The
top-K itself is checked with no tolerance at all: the kernel's indices must equal
``lagkv.top_keep_sorted`` of the kernel's own scores, ties to the lower position included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrsa_serve import kernels, lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.kernels import naive

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Triton chooses interpreter or compiler process-wide, when it is first imported (its own
# library functions are decorated then). So without a GPU, unless this process was started with
# TRITON_INTERPRET=1, the kernel tests run in a child pytest that is: no other test in this
# process (vLLM's, say) ever sees the interpreter.
IN_CHILD = not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1"
kernel_test = pytest.mark.skipif(IN_CHILD, reason="runs in test_kernels_in_triton_interpreter")

if IN_CHILD:
    triton_select = triton_compact = None
else:
    try:
        from lrsa_serve.kernels import compact as triton_compact
        from lrsa_serve.kernels import select as triton_select
    except ImportError as err:
        pytest.skip(f"triton cannot be imported: {err}", allow_module_level=True)
    assert triton_select.INTERPRETED != HAS_CUDA, (
        "Triton kernels built for the wrong mode: TRITON_INTERPRET=1 must be set, before triton "
        "is first imported, exactly when there is no GPU"
    )


@pytest.mark.skipif(not IN_CHILD, reason="the kernel tests run in this process")
def test_kernels_in_triton_interpreter():
    """This module's tests, under TRITON_INTERPRET=1 in a child pytest (see IN_CHILD)."""
    pytest.importorskip("triton", reason="triton cannot be imported")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]


# Relative distance to the reference's keep-th score inside which a swap counts as a near-tie
# (about 16 float32 ulps; measured differences between the two score computations are <= 3e-7).
NEAR_TIE = 2e-6
SCORE_RTOL = 1e-6


# ---- paged caches -------------------------------------------------------------------------------
def paged_cache(
    layout: str,
    num_blocks: int,
    heads: int,
    block_size: int,
    dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    device: str = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(storage, key_cache, value_cache) with random contents in one of three layouts:
    "separate" tensors; "packed" K|V in the last dim (vLLM's Triton layout); "halves": K then V
    inside each (block, head) (vLLM's CPU layout)."""
    if layout == "separate":
        shape = (2, num_blocks, heads, block_size, dim)
    elif layout == "packed":
        shape = (num_blocks, heads, block_size, 2 * dim)
    elif layout == "halves":
        shape = (num_blocks, heads, 2, block_size, dim)
    else:
        raise ValueError(layout)
    storage = torch.randn(shape, generator=gen, device=gen.device).to(device, dtype)
    if layout == "separate":
        return storage, storage[0], storage[1]
    if layout == "packed":
        return storage, storage[..., :dim], storage[..., dim:]
    return storage, storage[:, :, 0], storage[:, :, 1]


def block_tables(
    requests: int, blocks_per_part: int, num_blocks: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition p and p+1 block ids of each request: distinct, shuffled over the whole cache."""
    perm = torch.randperm(num_blocks, generator=gen)[: requests * 2 * blocks_per_part]
    table = perm.view(requests, 2 * blocks_per_part).to(torch.int32).to(DEVICE)
    return table[:, :blocks_per_part], table[:, blocks_per_part:]


def reference_scores(key_cache, value_cache, part, ref, score_v_ratio) -> torch.Tensor:
    return lagkv.partition_score(
        naive.gather_rows(key_cache, part),
        naive.gather_rows(value_cache, part),
        naive.gather_rows(key_cache, ref),
        naive.gather_rows(value_cache, ref),
        score_v_ratio,
    )


# ---- comparisons --------------------------------------------------------------------------------
def assert_same_selection(
    kept: torch.Tensor, expected: torch.Tensor, ref_score: torch.Tensor, keep: int
) -> int:
    """kept == expected, except for tokens within NEAR_TIE of the reference's keep boundary.
    Returns how many (request, head) rows differ at all (each only inside that band)."""
    differ = (kept != expected).any(dim=-1)
    if not differ.any():
        return 0
    scores = ref_score[differ]
    boundary = scores.sort(dim=-1, descending=True).values[:, keep - 1 : keep]
    near = (scores - boundary).abs() <= NEAR_TIE * boundary
    is_kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, kept[differ], True)
    is_expected = torch.zeros_like(is_kept).scatter_(-1, expected[differ], True)
    assert torch.equal(is_kept & ~near, is_expected & ~near), "selection differs beyond near-ties"
    return int(differ.sum())


def check_select_and_compact(
    storage: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    part: torch.Tensor,
    ref: torch.Tensor,
    keep: int,
    score_v_ratio: float = 1.0,
    num_splits: int | None = None,
) -> tuple[int, torch.Tensor]:
    """Select and compact with the kernels and with naive.py; returns the near-tie swap count
    and the oracle's selection.

    The selection oracle is naive.py on the CPU, also for CUDA tensors: torch's CPU std
    accumulates in float64 like the kernel (bitwise equal spreads), its CUDA std in float32."""
    requests, heads, length = part.shape[0], key_cache.shape[1], part.shape[1] * key_cache.shape[2]
    on_cpu = [t.cpu() for t in (key_cache, value_cache, part, ref)]
    expected = naive.select_kept(*on_cpu, keep, score_v_ratio).to(storage.device)
    ref_score = reference_scores(*on_cpu, score_v_ratio).to(storage.device)

    # Poisoned outputs: every element must be written.
    kept = torch.full((requests, heads, keep), -1, dtype=torch.int64, device=storage.device)
    scores = torch.full((requests, heads, length), float("nan"), device=storage.device)
    triton_select.select_kept(
        key_cache,
        value_cache,
        part,
        ref,
        keep,
        score_v_ratio,
        num_splits=num_splits,
        out=kept,
        scores_out=scores,
    )
    torch.testing.assert_close(scores, ref_score, rtol=SCORE_RTOL, atol=0)
    # The top-K is exact on the kernel's own scores: no tolerance, ties to the lower position.
    assert torch.equal(kept, lagkv.top_keep_sorted(scores, keep))
    swaps = assert_same_selection(kept, expected, ref_score, keep)

    # Compaction with the kernel's selection, against naive.py on a copy: bitwise, whole storage
    # (so K, V, other heads, rows past keep and every other block are compared too).
    original = storage.clone()
    twin = storage.clone()
    twin_k, twin_v = _views_like(twin, storage, key_cache, value_cache)
    naive.compact_kept(twin_k, twin_v, part, kept)
    triton_compact.compact_kept(key_cache, value_cache, part, kept)
    assert torch.equal(storage, twin)

    # And directly: the front of each partition holds the kept rows in order; nothing else moved.
    block_size = key_cache.shape[2]
    for cache, before in zip(
        (key_cache, value_cache),
        _views_like(original, storage, key_cache, value_cache),
        strict=True,
    ):
        rows = naive.gather_rows(before, part)
        idx = kept[..., None].expand(-1, -1, -1, rows.shape[-1])
        assert torch.equal(naive.gather_rows(cache, part)[:, :, :keep], rows.gather(2, idx))
        untouched = torch.ones(cache.shape[0], dtype=torch.bool, device=cache.device)
        untouched[part[:, : keep // block_size].flatten().long()] = False
        assert torch.equal(cache[untouched], before[untouched])
    return swaps, expected


def _views_like(
    other: torch.Tensor, storage: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same K/V views as key_cache/value_cache of storage, on another tensor shaped alike."""
    element = storage.element_size()
    views = []
    for cache in (key_cache, value_cache):
        offset = (cache.data_ptr() - storage.data_ptr()) // element
        views.append(other.as_strided(cache.shape, cache.stride(), other.storage_offset() + offset))
    return views[0], views[1]


# ---- small shapes: interpreter on the CPU, compiled on a GPU ------------------------------------
@kernel_test
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dim", [64, 128])
def test_select_compact_match_naive(seed, dtype, dim):
    gen = torch.Generator().manual_seed(1000 * seed + dim)
    requests, heads, block_size, lag, keep = 3, 2, 16, 64, 32
    num_blocks = requests * 2 * lag // block_size + 7
    storage, key_cache, value_cache = paged_cache(
        "separate", num_blocks, heads, block_size, dim, dtype, gen
    )
    part, ref = block_tables(requests, lag // block_size, num_blocks, gen)
    assert check_select_and_compact(storage, key_cache, value_cache, part, ref, keep)[0] == 0


@kernel_test
@pytest.mark.parametrize(
    "layout, dim, lag, keep, block_size, ratio, splits",
    [
        ("packed", 64, 64, 16, 16, 1.0, 2),  # vLLM's Triton layout, split scoring
        ("halves", 128, 48, 16, 16, 0.5, 3),  # vLLM's CPU layout, L not a power of two
        ("packed", 256, 32, 16, 8, 1.0, 1),  # head_dim 256, small blocks
    ],
)
def test_layouts_and_shapes(layout, dim, lag, keep, block_size, ratio, splits):
    gen = torch.Generator().manual_seed(dim + lag + keep)
    requests, heads = 2, 3
    num_blocks = requests * 2 * lag // block_size + 3
    storage, key_cache, value_cache = paged_cache(
        layout, num_blocks, heads, block_size, dim, torch.bfloat16, gen
    )
    part, ref = block_tables(requests, lag // block_size, num_blocks, gen)
    swaps, _ = check_select_and_compact(
        storage, key_cache, value_cache, part, ref, keep, ratio, num_splits=splits
    )
    assert swaps == 0


@kernel_test
def test_ties_constant_inputs_keep_the_first_tokens():
    """Constant K and V: every span is 0 (divided by 1e-6), every score equal: keep 0..keep-1."""
    gen = torch.Generator().manual_seed(7)
    requests, heads, block_size, lag, keep, dim = 2, 2, 16, 64, 32, 64
    num_blocks = requests * 2 * lag // block_size + 2
    storage, key_cache, value_cache = paged_cache(
        "packed", num_blocks, heads, block_size, dim, torch.float32, gen
    )
    storage.fill_(0.5)
    part, ref = block_tables(requests, lag // block_size, num_blocks, gen)
    assert check_select_and_compact(storage, key_cache, value_cache, part, ref, keep)[0] == 0
    first = torch.arange(keep, device=storage.device).expand(requests, heads, keep)
    assert torch.equal(triton_select.select_kept(key_cache, value_cache, part, ref, keep), first)


@kernel_test
def test_ties_repeated_rows_go_to_the_lower_position():
    """Partition p's tokens repeat 3 row patterns, so scores tie in groups: the kept tokens must
    be the lowest positions of each tied group, exactly as the reference's stable sort."""
    gen = torch.Generator().manual_seed(11)
    requests, heads, block_size, lag, keep, dim = 2, 2, 16, 64, 40 - 8, 64
    num_blocks = requests * 2 * lag // block_size + 2
    storage, key_cache, value_cache = paged_cache(
        "separate", num_blocks, heads, block_size, dim, torch.bfloat16, gen
    )
    part, ref = block_tables(requests, lag // block_size, num_blocks, gen)
    pattern = torch.randint(0, 3, (lag,), generator=gen).to(DEVICE)
    for cache in (key_cache, value_cache):
        rows = naive.gather_rows(cache, part)  # [R, H, L, D]
        rows = rows[:, :, pattern]  # token t takes the row of token pattern[t] (0, 1 or 2)
        cache[part.long()] = rows.unflatten(2, (lag // block_size, block_size)).transpose(1, 2)
    expected = naive.select_kept(key_cache, value_cache, part, ref, keep)
    score = reference_scores(key_cache, value_cache, part, ref, 1.0)
    assert (score[..., None, :] == score[..., :, None]).sum() > requests * heads * lag  # ties
    assert torch.equal(triton_select.select_kept(key_cache, value_cache, part, ref, keep), expected)
    assert check_select_and_compact(storage, key_cache, value_cache, part, ref, keep)[0] == 0


@kernel_test
@pytest.mark.parametrize(
    "lag, keep, ratio",
    [(64, 1, 1.0), (64, 16, -0.5), (48, 47, 1.0), (48, 48, -0.5), (256, 64, 1.0)],
)
def test_top_keep_is_exact_with_many_ties(lag, keep, ratio):
    """The top-K step alone, on spreads drawn from 3 values (scores tie in large groups across
    the keep boundary; a negative ratio makes scores negative): exactly torch's stable top-K of
    the kernel's own scores."""
    gen = torch.Generator().manual_seed(lag + keep)
    rows = 5
    spread = torch.tensor([0.25, 0.5, 1.0])[torch.randint(0, 3, (rows, 2, lag), generator=gen)]
    spread = spread.to(DEVICE)
    kept = torch.full((rows, keep), -1, dtype=torch.int64, device=DEVICE)
    scores = torch.full((rows, lag), float("nan"), device=DEVICE)
    triton_select._top_keep_kernel[(rows,)](
        spread,
        kept,
        scores,
        kept,  # no active mask: never read
        1,
        ratio,
        L=lag,
        KEEP=keep,
        BLOCK_L=triton_next_pow2(lag),
        WRITE_SCORES=True,
        HAS_ACTIVE=False,
    )
    expected_scores = (
        torch.softmax(spread[:, 0].double(), -1).float()
        + ratio * torch.softmax(spread[:, 1].double(), -1).float()
    )
    torch.testing.assert_close(scores, expected_scores, rtol=SCORE_RTOL, atol=0)
    assert torch.equal(kept, lagkv.top_keep_sorted(scores, keep))


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def compress_one(key_cache, value_cache, part, ref, rule, **kwargs) -> torch.Tensor:
    """``compress_layers`` of one layer's caches."""
    stack = kernels.LayerStack.of([key_cache], [value_cache])
    return kernels.compress_layers(stack, part, ref, rule, **kwargs)[0]


@kernel_test
def test_dispatch_compress_layers():
    gen = torch.Generator().manual_seed(3)
    requests, heads, block_size, lag, keep, dim = 2, 2, 16, 32, 16, 64
    rule = lagkv.Rule(sink=0, lag=lag, keep=keep)  # the sink plays no part here
    num_blocks = requests * 2 * lag // block_size + 1
    storage, key_cache, value_cache = paged_cache(
        "packed", num_blocks, heads, block_size, dim, torch.float32, gen
    )
    part, ref = block_tables(requests, lag // block_size, num_blocks, gen)
    twin = storage.clone()
    twin_k, twin_v = _views_like(twin, storage, key_cache, value_cache)
    expected = compress_one(twin_k, twin_v, part, ref, rule, use_triton=False)
    kept = compress_one(key_cache, value_cache, part, ref, rule, use_triton=True)
    assert torch.equal(kept, expected)
    assert torch.equal(storage, twin)


@kernel_test
def test_active_rows_only_compress():
    """A fixed number of rows with a device mask (what a captured CUDA graph launches): masked
    rows leave the cache untouched, the others compress as without a mask."""
    gen = torch.Generator().manual_seed(5)
    requests, heads, block_size, lag, keep, dim = 3, 2, 16, 32, 16, 64
    rule = lagkv.Rule(sink=0, lag=lag, keep=keep)  # the sink plays no part here
    num_blocks = requests * 2 * lag // block_size + 1
    storage, key_cache, value_cache = paged_cache(
        "packed", num_blocks, heads, block_size, dim, torch.float32, gen
    )
    part, ref = block_tables(requests, lag // block_size, num_blocks, gen)
    active = torch.tensor([1, 0, 1], dtype=torch.int32, device=storage.device)
    original = storage.clone()
    twin = storage.clone()
    twin_k, twin_v = _views_like(twin, storage, key_cache, value_cache)
    rows = torch.tensor([0, 2], device=storage.device)
    expected = compress_one(twin_k, twin_v, part[rows], ref[rows], rule, use_triton=True)
    kept = compress_one(key_cache, value_cache, part, ref, rule, use_triton=True, active=active)
    assert torch.equal(kept[rows], expected)
    assert torch.equal(storage, twin)  # row 1's blocks were not touched
    # The torch path honours the mask the same way.
    fresh = original.clone()
    fresh_k, fresh_v = _views_like(fresh, storage, key_cache, value_cache)
    compress_one(fresh_k, fresh_v, part, ref, rule, use_triton=False, active=active)
    assert torch.equal(fresh, twin)


@kernel_test
@pytest.mark.parametrize("layout,scratch", [("packed", None), ("separate", None), ("packed", 1)])
def test_all_layers_in_one_launch_equal_layer_by_layer(layout, scratch, monkeypatch):
    """``compress_layers`` over caches allocated apart (as vLLM allocates each layer's) moves,
    in every layer, exactly what the layer-by-layer kernels move; masked rows stay untouched.
    ``scratch=1``: a scratch budget below one layer's, so each layer gets its own launches."""
    if scratch is not None:
        monkeypatch.setattr(kernels, "LAYERS_SCRATCH_BYTES", scratch)
    gen = torch.Generator().manual_seed(11)
    layers, requests, heads, block_size, lag, keep, dim = 3, 3, 2, 16, 32, 16, 64
    rule = lagkv.Rule(sink=0, lag=lag, keep=keep)  # the sink plays no part here
    num_blocks = requests * 2 * lag // block_size + 2
    made = [
        paged_cache(layout, num_blocks, heads, block_size, dim, torch.float32, gen)
        for _ in range(layers)
    ]
    part, ref = block_tables(requests, lag // block_size, num_blocks, gen)
    active = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEVICE)
    originals = [storage.clone() for storage, _, _ in made]
    twins = [storage.clone() for storage, _, _ in made]
    expected = []
    for twin, (storage, k, v) in zip(twins, made, strict=True):
        twin_k, twin_v = _views_like(twin, storage, k, v)
        expected.append(
            compress_one(
                twin_k, twin_v, part, ref, rule, use_triton=True, active=active
            )  # fmt: skip
        )
    stack = kernels.LayerStack.of([k for _, k, _ in made], [v for _, _, v in made])
    assert stack.offsets.tolist()[0] == 0 and len(set(stack.offsets.tolist())) == layers
    kept = kernels.compress_layers(stack, part, ref, rule, use_triton=True, active=active)
    assert kept.shape == (layers, requests, heads, keep)
    rows = [0, 2]
    for layer in range(layers):
        assert torch.equal(kept[layer, rows], expected[layer][rows]), layer
        assert torch.equal(made[layer][0], twins[layer]), layer
    # The torch path of the same call moves the same rows.
    fresh = [original.clone() for original in originals]
    views = [_views_like(f, storage, k, v) for f, (storage, k, v) in zip(fresh, made, strict=True)]
    torch_stack = kernels.LayerStack.of([k for k, _ in views], [v for _, v in views])
    kernels.compress_layers(torch_stack, part, ref, rule, use_triton=False, active=active)
    for f, twin in zip(fresh, twins, strict=True):
        assert torch.equal(f, twin)


def test_layer_stack_refuses_caches_laid_out_differently():
    a = torch.zeros(4, 2, 16, 128)
    b = torch.zeros(4, 2, 16, 64)
    with pytest.raises(ValueError, match="laid out alike"):
        kernels.LayerStack.of([a[..., :64], b[..., :32]], [a[..., 64:], b[..., 32:]])
    stack = kernels.LayerStack.of([a[..., :64]], [a[..., 64:]])
    assert stack.holds([a[..., :64]]) and not stack.holds([b[..., :32]])


# ---- the builder's compacted view (compacted_view) ---------------------------------------------
def view_buffers(rows: int, width: int, part_blocks: int, fill: int):
    from lrsa_serve.kernels.compacted_view import ViewBuffers

    def full(*shape):
        return torch.full(shape, fill, dtype=torch.int32, device=DEVICE)

    return ViewBuffers(
        full(rows, width), full(rows), full(rows, part_blocks), full(rows, part_blocks), full(rows)
    )


@kernel_test
@pytest.mark.parametrize("sink,lag,keep", [(16, 64, 16), (0, 32, 16), (32, 128, 64)])
def test_compacted_view_kernel_equals_torch(sink, lag, keep):
    """One launch writes what the torch reference writes: decode rows, first and later prefill
    chunks, rows far into compression, a captured batch's padding rows (whose lengths vLLM
    passes through) and buffer rows past the batch (left alone)."""
    from lrsa_serve.kernels.compacted_view import ViewShape, compacted_view_torch
    from lrsa_serve.kernels.compacted_view_triton import compacted_view

    block = 16
    shape = ViewShape(lagkv.Rule(sink, lag, keep), block)
    width = 48
    gen = torch.Generator().manual_seed(lag)
    contexts = [0, sink + 2 * lag - 1, sink + 5 * lag - 1, 3 * lag, sink + 2 * lag, 7]
    queries = [min(sink + 2 * lag, 40), 1, 1, lag, 1, 9]
    n, rows, capacity = len(contexts), len(contexts) + 2, len(contexts) + 4
    seq = torch.tensor(
        [c + q for c, q in zip(contexts, queries, strict=True)] + [0, 0], dtype=torch.int32
    )
    starts = torch.tensor([0, *queries, 0, 0], dtype=torch.int32).cumsum(0).int()
    table = torch.randperm(rows * width * 2, generator=gen)[: rows * width].view(rows, width)
    args = (table.int().to(DEVICE), seq.to(DEVICE), starts.to(DEVICE), n, shape)
    expected, got = (
        view_buffers(capacity, width, lag // block, -1),
        view_buffers(capacity, width, lag // block, -1),
    )
    compacted_view_torch(*args, expected)
    compacted_view(*args, got)
    for name in ("table", "seq_lens", "part_blocks", "ref_blocks", "active"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    cfg = LagKVConfig(sink=sink, lag=lag, ratio=keep / lag)
    assert got.active[:n].tolist() == [
        int(lagkv.compressed_partitions(c + q, cfg.rule) > lagkv.compressed_partitions(c, cfg.rule))
        for c, q in zip(contexts, queries, strict=True)
    ]
    assert got.active[:n].sum() >= 3  # the rows that complete a partition are seen


# ---- whole training sequences (sequence_select) ------------------------------------------------
def sequence_kv(batch, heads, n, dim, dtype, layout, gen, device=DEVICE):
    """Post-RoPE K/V ``[B, H, n, D]`` as a model makes them: heads-major (contiguous) or
    tokens-major (a transposed ``[B, n, H, D]`` projection)."""
    shape = (batch, n, heads, dim) if layout == "tokens" else (batch, heads, n, dim)
    k, v = (torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(2))
    if layout == "tokens":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    return k, v


def assert_sequence_selection(key, value, cfg) -> int:
    """``sequence_select.select_all`` equals ``lagkv.select_all`` up to near-ties (see
    assert_same_selection); returns how many (partition, head) rows differ at all."""
    from lrsa_serve.training.attention import sequence_select

    kept = sequence_select.select_all(key, value, cfg.rule)
    expected = lagkv.select_all(key.cpu(), value.cpu(), cfg.rule).to(kept.device)
    assert kept.shape == expected.shape and kept.dtype == torch.int64
    parts = kept.shape[2]
    if parts == 0:
        return 0
    span = (parts + 1) * cfg.lag
    k = key.cpu()[..., cfg.sink : cfg.sink + span, :].unflatten(-2, (parts + 1, cfg.lag))
    v = value.cpu()[..., cfg.sink : cfg.sink + span, :].unflatten(-2, (parts + 1, cfg.lag))
    score = lagkv.partition_score(k[..., :-1, :, :], v[..., :-1, :, :], k[..., 1:, :, :],
                                  v[..., 1:, :, :], cfg.score_v_ratio)  # fmt: skip
    starts = (cfg.sink + cfg.lag * torch.arange(parts))[:, None].to(kept.device)
    return assert_same_selection(
        (kept - starts).flatten(0, 2).cpu(),
        (expected - starts).flatten(0, 2).cpu(),
        score.flatten(0, 2),
        cfg.keep,
    )


@kernel_test
@pytest.mark.parametrize(
    "batch, n, layout, dtype",
    [
        (1, 16 + 6 * 32 + 5, "heads", torch.float32),
        (2, 16 + 4 * 32, "tokens", torch.bfloat16),
        (3, 16 + 3 * 32 + 31, "heads", torch.bfloat16),
        (2, 16 + 2 * 32 - 1, "tokens", torch.float32),  # no partition compressed yet
        (2, 16 + 4 * 32 + 3, "tokens", "mixed"),  # float32 K (RoPE), bf16 V, as under autocast
    ],
)
def test_sequence_select_matches_lagkv(batch, n, layout, dtype):
    """Every compressed partition of every sequence at once, through one-token blocks: the
    kept positions of ``lagkv.select_all``, for both K/V layouts, lengths not multiples of L."""
    from lrsa_serve.config import LagKVConfig

    cfg = LagKVConfig(sink=16, lag=32, ratio=0.25, score_v_ratio=0.5)
    gen = torch.Generator(device=DEVICE).manual_seed(n + batch)
    mixed = dtype == "mixed"
    key, value = sequence_kv(batch, 2, n, 64, torch.float32 if mixed else dtype, layout, gen)
    if mixed:
        value = value.to(torch.bfloat16)
    assert assert_sequence_selection(key, value, cfg) == 0


# ---- the varlen call's key/value rows (pack_rows) ----------------------------------------------
def packed_case(batch, n, dim, dtype, layout, seed, device=DEVICE):
    """Keys/values, their selection and the varlen packing of one small LRSA case."""
    from lrsa_serve.config import LagKVConfig
    from lrsa_serve.training.attention import varlen as lv

    cfg = LagKVConfig(sink=16, lag=32, ratio=0.25)
    gen = torch.Generator(device=device).manual_seed(seed)
    key, value = sequence_kv(batch, 2, n, dim, dtype, layout, gen, device=device)
    kept = lagkv.select_all(key, value, cfg.rule)
    packing = lv.packing_for(n, cfg.rule)
    template = torch.tensor(packing.template, device=device)
    return key, value, kept, packing, lv.key_index(kept, packing, template)


def torch_packed(key, value, index):
    """What ``lrsa_varlen`` did before pack_rows: ``gather`` per tensor."""
    idx = index[..., None].expand(-1, -1, -1, key.shape[-1])
    return tuple(x.transpose(1, 2).gather(1, idx).flatten(0, 1) for x in (key, value))


def float64_gather_grads(key, value, index, grads):
    """The K/V gradients of ``torch_packed`` summed in float64."""
    leaves = [x.detach().double().requires_grad_(True) for x in (key, value)]
    outs = torch_packed(*leaves, index)
    return torch.autograd.grad(outs, leaves, [g.double() for g in grads])


@kernel_test
@pytest.mark.parametrize(
    "batch, n, dim, dtype, layout",
    [
        (1, 16 + 6 * 32 + 5, 16, torch.float32, "heads"),
        (2, 16 + 5 * 32, 64, torch.bfloat16, "tokens"),
        (2, 16 + 2 * 32 - 3, 16, torch.float32, "tokens"),  # nothing compressed yet
    ],
)
def test_pack_rows_forward_and_exact_gradient(batch, n, dim, dtype, layout):
    """Forward: the rows ``gather`` copies, bit for bit. Backward: each source row's gradient is
    the sum of the packed rows' gradients that copied it, accumulated in float32 and rounded
    once (checked against float64 sums), and the same bits on a second run."""
    from lrsa_serve.training.attention import varlen as lv
    from lrsa_serve.training.attention.pack_rows import pack_rows

    key, value, kept, packing, index = packed_case(batch, n, dim, dtype, layout, seed=n)
    refs = lv.rows_refs(packing, kept)
    key.requires_grad_(True)
    value.requires_grad_(True)
    k, v = pack_rows(key, value, index, kept, refs)
    want_k, want_v = torch_packed(key.detach(), value.detach(), index)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    gen = torch.Generator(device=key.device).manual_seed(1)
    grad_k, grad_v = (torch.randn(k.shape, generator=gen, device=k.device).to(dtype)
                      for _ in range(2))  # fmt: skip
    dk, dv = torch.autograd.grad((k, v), (key, value), (grad_k, grad_v))
    again = torch.autograd.grad(pack_rows(key, value, index, kept, refs),
                                (key, value), (grad_k, grad_v))  # fmt: skip
    assert torch.equal(dk, again[0]) and torch.equal(dv, again[1])
    ref_k, ref_v = float64_gather_grads(key, value, index, (grad_k, grad_v))
    abs_k, abs_v = float64_gather_grads(key, value, index, (grad_k.abs(), grad_v.abs()))
    # Sink rows are copied into every item: the longest sums.
    assert (index[0, :, 0] < 16).sum() >= len(packing.q_lens)
    # the one final rounding: one ulp (Triton's interpreter rounds to bf16 by truncation)
    out_eps = 2**-23 if dtype == torch.float32 else 2**-7
    for got, ref, magnitude in ((dk, ref_k, abs_k), (dv, ref_v, abs_v)):
        assert got.dtype == dtype and got.shape == ref.shape
        # float32 accumulation of at most len(q_lens) terms, then one rounding to the dtype
        bound = magnitude * len(packing.q_lens) * 2**-24 + ref.abs() * out_eps + 1e-30
        assert ((got.double() - ref).abs() <= bound).all()


@kernel_test
def test_lrsa_varlen_packs_with_triton_as_with_gather(monkeypatch):
    """The whole varlen LRSA attention (plain-torch items) packing with ``pack_rows`` gives the
    output and the q/k/v gradients of packing with ``gather``, batch 2 with GQA; eagerly
    (autograd through the packers) and through the custom op (their explicit backwards,
    ``pack_items_backward``). The packer is forced here: by default only CUDA takes
    ``pack_rows``, from 32K tokens."""
    from lrsa_serve.config import LagKVConfig
    from lrsa_serve.training.attention import dispatch
    from lrsa_serve.training.attention import varlen as lv
    from lrsa_serve.training.attention.op import lrsa_varlen_op

    # float64, to compare at 1e-12: only the plain-torch items take it everywhere. On CUDA the
    # automatic choice for float64 is the memory-efficient kernel, which the op does not run
    # (production calls it only where ``op_applies``): both paths name the math kernel.
    cfg = LagKVConfig(sink=16, lag=32, ratio=0.25)
    n, gen = 16 + 5 * 32 + 9, torch.Generator(device=DEVICE).manual_seed(5)
    q = torch.randn(2, 4, n, 16, generator=gen, device=DEVICE, dtype=torch.float64)
    k, v = (torch.randn(2, 2, n, 16, generator=gen, device=DEVICE, dtype=torch.float64)
            for _ in range(2))  # fmt: skip
    paths = {
        "eager": lambda *x: dispatch.lrsa_varlen(*x, cfg.rule, kernel="math"),
        "op": lambda *x: lrsa_varlen_op(*x, cfg.rule, None, kernel="math"),
    }
    results = {}
    for packer in ("torch", "triton"):
        monkeypatch.setattr(lv, "packer_for", lambda key, packer=packer: packer)
        for path, attend in paths.items():
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            out = attend(*leaves)
            out.backward(torch.ones_like(out))
            results[packer, path] = [out.detach()] + [x.grad for x in leaves]
    for key in results:
        for got, want in zip(results[key], results["torch", "eager"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---- real sizes on the GPU ----------------------------------------------------------------------
def _poison_allocator() -> None:
    """Fill memory the caching allocator will hand out next with NaN, so that an unwritten
    element of a kernel's scratch buffer shows up."""
    torch.full((64 << 20,), float("nan"), device="cuda")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(
    "layout, dtype, requests, lag, keep",
    [
        ("packed", torch.bfloat16, 64, 1024, 256),
        ("separate", torch.float32, 64, 1024, 256),
        ("packed", torch.float16, 16, 2048, 512),
    ],
)
def test_gpu_real_sizes(layout, dtype, requests, lag, keep):
    gen = torch.Generator(device="cuda").manual_seed(lag + requests)
    heads, block_size, dim = 8, 16, 128
    blocks_per_part = lag // block_size
    num_blocks = requests * 2 * blocks_per_part + 64
    storage, key_cache, value_cache = paged_cache(
        layout, num_blocks, heads, block_size, dim, dtype, gen, device="cuda"
    )
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")
    table = perm[: requests * 2 * blocks_per_part].view(requests, -1).to(torch.int32)
    part, ref = table[:, :blocks_per_part], table[:, blocks_per_part:]
    cuda_kept = naive.select_kept(key_cache, value_cache, part, ref, keep)
    _poison_allocator()
    swaps, expected = check_select_and_compact(storage, key_cache, value_cache, part, ref, keep)
    # For information: torch's own CUDA path (float32 std) against its CPU path.
    torch_swaps = int((cuda_kept != expected).any(dim=-1).sum())
    print(
        f"\n{layout} {dtype} R={requests} L={lag}: heads with near-tie swaps: kernel {swaps}, "
        f"torch CUDA {torch_swaps}, of {requests * heads} (vs torch CPU)"
    )
    # A swap needs a boundary gap of a few ulps: a few percent of heads at most.
    assert swaps <= requests * heads // 20


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["heads", "tokens"])
def test_gpu_sequence_select_real_size(layout):
    """A 32K training sequence with the trainer's settings (S=16, L=1024, r=0.25), 2 KV heads
    of 64, bf16: the positions lagkv.select_all keeps, up to near-ties."""
    from lrsa_serve.config import LagKVConfig

    cfg = LagKVConfig(sink=16, lag=1024, ratio=0.25)
    gen = torch.Generator(device="cuda").manual_seed(7)
    key, value = sequence_kv(1, 2, 32768, 64, torch.bfloat16, layout, gen, device="cuda")
    rows = 2 * 30  # KV heads x compressed partitions
    swaps = assert_sequence_selection(key, value, cfg)
    assert swaps <= rows // 20, f"{swaps} of {rows} (partition, head) rows differ at near-ties"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_pack_rows_real_size():
    """The trainer's 32K packing (S=16, L=1024, r=0.25; 2 KV heads of 64, bf16, tokens-major as
    a model makes them): rows equal gather's; gradients within one bf16 rounding of float64 sums."""
    from lrsa_serve.config import LagKVConfig
    from lrsa_serve.training.attention import varlen as lv
    from lrsa_serve.training.attention.pack_rows import pack_rows

    cfg = LagKVConfig(sink=16, lag=1024, ratio=0.25)
    gen = torch.Generator(device="cuda").manual_seed(11)
    key, value = sequence_kv(1, 2, 32768, 64, torch.bfloat16, "tokens", gen, device="cuda")
    kept = lagkv.select_all(key, value, cfg.rule)
    packing = lv.packing_for(32768, cfg.rule)
    index = lv.key_index(kept, packing, torch.tensor(packing.template, device="cuda"))
    key.requires_grad_(True)
    value.requires_grad_(True)
    k, v = pack_rows(key, value, index, kept, lv.rows_refs(packing, kept))
    assert torch.equal(k, torch_packed(key.detach(), value.detach(), index)[0])
    grad = torch.randn(k.shape, generator=gen, device="cuda").to(torch.bfloat16)
    (dk,) = torch.autograd.grad(k, key, grad)
    ref, _ = float64_gather_grads(key, value, index, (grad, grad))
    magnitude, _ = float64_gather_grads(key, value, index, (grad.abs(), grad.abs()))
    # float32 sums of at most 32 terms, rounded once to bf16 (half an ulp: 2^-8 relative)
    bound = magnitude * 32 * 2**-24 + ref.abs() * 2**-8 + 1e-30
    assert ((dk.double() - ref).abs() <= bound).all()
    # gather's backward (bf16 atomics) is what this replaces: its error is larger
    (atomic,) = torch.autograd.grad(torch_packed(key, value, index)[0], key, grad)
    assert (atomic.double() - ref).norm() > (dk.double() - ref).norm()
