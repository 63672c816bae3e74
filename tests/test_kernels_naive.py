"""The paged torch path against the contiguous reference: selection and compaction."""

import pytest
import torch

from lrsa_serve import lagkv
from lrsa_serve.kernels import naive


@pytest.mark.parametrize(
    "block_size, lag, keep, heads, dim", [(4, 16, 8, 2, 8), (32, 64, 32, 3, 64)]
)
def test_paged_select_and_compact_equal_reference(block_size, lag, keep, heads, dim):
    gen = torch.Generator().manual_seed(block_size + lag)
    requests, blocks_per_part = 3, lag // block_size
    num_blocks = requests * 2 * blocks_per_part + 5
    keys = torch.randn(num_blocks, heads, block_size, dim, generator=gen)
    values = torch.randn(num_blocks, heads, block_size, dim, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)[: requests * 2 * blocks_per_part]
    table = perm.view(requests, 2 * blocks_per_part)
    part, ref = table[:, :blocks_per_part], table[:, blocks_per_part:]

    contiguous_k = naive.gather_rows(keys, table)  # [R, H, 2L, D]
    contiguous_v = naive.gather_rows(values, table)
    expected = lagkv.select_partition(
        contiguous_k[:, :, :lag],
        contiguous_v[:, :, :lag],
        contiguous_k[:, :, lag:],
        contiguous_v[:, :, lag:],
        keep,
    )
    kept = naive.select_kept(keys, values, part, ref, keep)
    assert torch.equal(kept, expected)

    untouched = torch.ones(num_blocks, dtype=torch.bool)
    untouched[part[:, : keep // block_size].flatten()] = False
    before_k, before_v = keys.clone(), values.clone()
    naive.compact_kept(keys, values, part, kept)
    front_k = naive.gather_rows(keys, part)[:, :, :keep]
    front_v = naive.gather_rows(values, part)[:, :, :keep]
    idx = kept[..., None].expand(-1, -1, -1, dim)
    assert torch.equal(front_k, contiguous_k[:, :, :lag].gather(2, idx))
    assert torch.equal(front_v, contiguous_v[:, :, :lag].gather(2, idx))
    assert torch.equal(keys[untouched], before_k[untouched])
    assert torch.equal(values[untouched], before_v[untouched])
