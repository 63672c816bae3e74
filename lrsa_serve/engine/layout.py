"""Block-level geometry of a LagKV sequence, shared by the KV manager (which blocks to free) and
the attention metadata builder (which block-table columns are live).

Logical block columns of a request: ``sink_blocks`` sink columns, then ``part_blocks`` columns per
partition. Once partition p is compressed its kept rows sit in its first ``keep_blocks``
columns and the other ``part_blocks - keep_blocks`` are freed. vLLM's slot mapping keeps writing
new tokens at their logical column; attention reads the live columns only.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig
from lrsa_serve.kernels.compacted_view import ViewShape
from lrsa_serve.lagkv import Ints  # the host's per-step lengths are numpy (cheaper on CPU)


class MisalignedChunkError(RuntimeError):
    pass


@dataclass(frozen=True)
class BlockGeometry(ViewShape):
    """The rule in blocks (``ViewShape``, what the compacted-view kernels take) plus what the KV
    manager and the metadata builders ask of it."""

    @classmethod
    def of(cls, settings: LagKVConfig, block_size: int) -> BlockGeometry:
        settings.check_block_size(block_size)
        return cls(settings.rule, block_size)

    def compressed(self, num_tokens: Ints) -> Ints:
        """``lagkv.compressed_partitions`` of each length (torch tensors or numpy arrays)."""
        return lagkv.compressed_partitions_each(num_tokens, self.rule)

    def check_chunks(self, seq_lens: Ints, query_lens: Ints, before: Ints) -> None:
        """Raises unless every scheduled chunk crosses no partition boundary before its last
        token (what lrsa_serve's scheduler guarantees; exact attention depends on it).
        ``before``: partitions compressed before the step. Torch tensors or numpy arrays."""
        if bool(((query_lens > 0) & (self.compressed(seq_lens - 1) != before)).any()):
            raise MisalignedChunkError(
                "LagKV: a prefill chunk crosses a lag-partition boundary; run the engine with "
                "lrsa_serve's scheduler (make_llm / lrsa serve set scheduler_cls)"
            )

    def partition_columns(self, partition: int) -> range:
        start = lagkv.partition_start(partition, self.rule) // self.block_size
        return range(start, start + self.part_blocks)

    def kept_columns(self, partition: int) -> range:
        """Columns that hold ``partition``'s kept rows once it is compressed (its first ones)."""
        return self.partition_columns(partition)[: self.keep_blocks]

    def evicted_columns(self, partition: int) -> range:
        """Columns freed once ``partition`` is compressed (its tail past the kept blocks)."""
        cols = self.partition_columns(partition)
        return range(cols.start + self.keep_blocks, cols.stop)

    def peak_blocks(self, max_len: int) -> int:
        """Most blocks one sequence of up to ``max_len`` tokens holds at once: its resident tokens
        plus the partition being compressed (freed one step after compaction)."""
        resident = lagkv.resident_tokens(max_len, self.rule) + self.rule.lag
        return min(-(-max_len // self.block_size), -(-resident // self.block_size) + 1)
