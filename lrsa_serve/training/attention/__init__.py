"""LRSA training attention: what ``lrsa train`` attends with, each fast path beside its plain-torch
reference (the modules are described in docs/architecture.md).

Nothing is imported here: ``reference_attention`` imports ``replay`` and ``dispatch`` imports
``reference_attention``, so an eager import would be a cycle.
"""
