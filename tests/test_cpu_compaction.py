"""The CPU backend's compaction on vLLM's own CPU cache layout (written through vLLM's cache op,
read back with the general gather), against ``lagkv.select_partition`` on logical rows."""

import pytest
import torch

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.engine.compaction import CompactionPlan
from lrsa_serve.engine.cpu_backend import compact_cpu_pages
from lrsa_serve.engine.cpu_layout import page_orders

BLOCK = 32


def write_rows(kv_cache: torch.Tensor, isa: str, keys, values, slots) -> None:
    from vllm import _custom_ops as ops

    blocks, heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(blocks, heads, 2 * block_size, -1).chunk(2, 2)
    ops.cpu_attn_reshape_and_cache(
        keys, values, key_cache, value_cache, slots, isa,
        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )  # fmt: skip


def read_rows(kv_cache: torch.Tensor, orders, blocks: torch.Tensor) -> list[torch.Tensor]:
    """``[R, heads, cols * block, dim]`` logical rows of K and V, through the plain gather."""
    num_blocks, heads, block_size, _ = kv_cache.shape
    halves = kv_cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, 2)
    out = []
    for half, order in zip(halves, orders, strict=True):
        pages = half.flatten(2)[blocks.long()].index_select(-1, order.logical_to_physical)
        out.append(pages.unflatten(-1, (block_size, -1)).transpose(1, 2).flatten(2, 3))
    return out


@pytest.mark.parametrize(
    "isa, dim, dtype",
    [("vec", 64, torch.float32), ("vec", 64, torch.bfloat16), ("vec16", 48, torch.float32)],
)
def test_compaction_in_the_cpu_layout_equals_the_reference(isa, dim, dtype):
    cfg = LagKVConfig.build(sink=32, lag=128, ratio=0.5)
    gen = torch.Generator().manual_seed(dim)
    requests, heads, cols = 3, 2, cfg.lag // BLOCK
    num_blocks = requests * 2 * cols + 4
    kv_cache = torch.zeros(num_blocks, heads, BLOCK, 2 * dim, dtype=dtype)
    slots = torch.arange(num_blocks * BLOCK)
    keys = torch.randn(slots.numel(), heads, dim, generator=gen).to(dtype)
    values = torch.randn(slots.numel(), heads, dim, generator=gen).to(dtype)
    write_rows(kv_cache, isa, keys, values, slots)
    orders = page_orders(isa, dtype, BLOCK, dim)
    table = torch.randperm(num_blocks, generator=gen)[: requests * 2 * cols].view(requests, -1)
    part, ref = table[:, :cols].int(), table[:, cols:].int()

    k, v = read_rows(kv_cache, orders, table)
    kept = lagkv.select_partition(
        k[:, :, : cfg.lag], v[:, :, : cfg.lag], k[:, :, cfg.lag :], v[:, :, cfg.lag :], cfg.keep
    )
    index = kept[..., None].expand(-1, -1, -1, dim)
    expected = [x.gather(2, index) for x in (k, v)]
    before = kv_cache.clone()

    compact_cpu_pages(kv_cache, CompactionPlan(part, ref, cfg.rule), orders)

    front = read_rows(kv_cache, orders, part[:, : cfg.keep // BLOCK])
    for got, want in zip(front, expected, strict=True):
        assert torch.equal(got, want)
    untouched = torch.ones(num_blocks, dtype=torch.bool)
    untouched[part[:, : cfg.keep // BLOCK].flatten().long()] = False
    assert torch.equal(kv_cache[untouched], before[untouched])
    assert not torch.equal(kv_cache, before)


def test_the_stock_orders_are_recognised_as_views():
    key_order, value_order = page_orders("vec", torch.float32, BLOCK, 64)
    assert key_order.transposed and value_order.identity
    page = torch.randn(5, BLOCK * 64)
    for order in (key_order, value_order):
        rows = order.to_logical(page)
        general = page.index_select(-1, order.logical_to_physical).unflatten(-1, (BLOCK, -1))
        assert torch.equal(rows, general)
        assert torch.equal(order.to_physical(rows), page)
