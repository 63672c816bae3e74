"""The measurement scripts behind docs/benchmarks.md, each run as a module from the repository
root or an installed package: ``python -m benchmarks.engine_memory --json out/engine_memory.json``.

``engine_memory`` and ``engine_throughput`` are what ``lrsa bench`` runs; the others need a GPU
(each module's docstring gives its command). ``random_models`` builds their tiny and random models.
"""
