"""vLLM CPU workers when one host runs several ranks: their OpenMP thread binding, and the
combination vLLM's CPU runner cannot run.

vLLM binds each local CPU worker's OpenMP threads to a NUMA node of its own
(``VLLM_CPU_OMP_THREADS_BIND=auto``) and refuses to start when the host has fewer NUMA nodes
than ranks: every single-socket machine under tensor or pipeline parallelism. There the cores
this process may use are split into one contiguous group per rank instead, unless the user
chose a binding (the variable set, ``nobind`` included).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence

import numpy as np

from lrsa_serve.errors import UserError

BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


def core_groups(cores: Sequence[int], ranks: int) -> list[list[int]]:
    """``cores`` split into ``ranks`` contiguous groups, sizes differing by at most one."""
    if len(cores) < ranks:
        raise UserError(
            f"{ranks} CPU workers need at least {ranks} cores, and this process may use "
            f"{len(cores)} ({', '.join(map(str, cores))}); lower --tensor-parallel-size / "
            f"--pipeline-parallel-size or set {BIND_VARIABLE} yourself"
        )
    return [group.tolist() for group in np.array_split(sorted(cores), ranks)]


def bind_local_ranks(
    ranks: int, environ: MutableMapping[str, str] = os.environ
) -> list[list[int]] | None:
    """Set ``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` workers on this host, unless there is
    one rank, the user set it, or the host has a NUMA node per rank (vLLM's own binding then
    works). Returns the core groups it set."""
    if ranks <= 1 or BIND_VARIABLE in environ:
        return None
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    if len(get_visible_memory_node()) >= ranks:
        return None
    groups = core_groups(sorted(os.sched_getaffinity(0)), ranks)
    environ[BIND_VARIABLE] = "|".join(",".join(map(str, group)) for group in groups)
    return groups


def describe(groups: list[list[int]]) -> str:
    """One line for the start-up log: which cores each rank got, and how to choose others."""
    ranks = ", ".join(f"rank {r} on cores {group}" for r, group in enumerate(groups))
    return f"CPU workers: {ranks} (set {BIND_VARIABLE} to choose)"


def check_pipeline_stages(pipeline_parallel_size: int, enforce_eager: bool) -> None:
    """vLLM 0.32's CPU runner allocates the buffers a later pipeline stage receives into only
    during its compile warm-up, which ``--enforce-eager`` skips: the first request then kills
    the engine (stock vLLM as well). Refuse it at start instead."""
    if pipeline_parallel_size > 1 and enforce_eager:
        raise UserError(
            "--pipeline-parallel-size > 1 on CPU needs vLLM's compile warm-up, which "
            "--enforce-eager skips; drop --enforce-eager (for a fast start without inductor: "
            """--compilation-config '{"backend": "eager"}')"""
        )
