"""LRSA training attention: what ``lrsa train`` attends with, apart from the serving engine's
paged-cache kernels (``lrsa_serve.kernels``). Each fast path sits beside its plain-torch reference.

- ``dispatch``: the ``"lrsa"`` attention registered in transformers' ``AttentionInterface`` and
  the choice of path: the varlen call on CUDA, the exact dense masked reference
  (``lrsa_serve.reference_attention``) on CPU; ``use_lrsa``, ``lrsa_forward_logits``.
- ``varlen``: the rule as one variable-length attention call over gathered key lists
  (FlashAttention-4 or -2, the memory-efficient kernel; ``math``: the same items through the
  reference's ``masked_attention``, the one plain-torch attention the kernels are tested against).
- ``op``: that call as the custom op ``lrsa::varlen`` (one node of a compiled decoder layer),
  with its own backward; plain-torch items beside the CUDA kernels.
- ``pack_rows``: Triton gather of the items' key/value rows with an exact, deterministic
  backward; ``torch.gather`` (``varlen.pack_items``) is its reference.
- ``sequence_select``: the selection of whole sequences, in plain torch, compiled, or on the
  serving engine's Triton select kernel (``lagkv.select_all`` is its reference), replayed under
  checkpointing.
- ``replay``: under gradient checkpointing the recompute replays the forward's selection.

Nothing is imported here: ``reference_attention`` imports ``replay`` and ``dispatch`` imports
``reference_attention``, so an eager import would be a cycle.
"""
