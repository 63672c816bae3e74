"""LRSA post-training: HF attention registration, data, loop (torchrun + FSDP2), export.

Heavy modules load on first use so ``lrsa train --help`` stays quick; ``lrsa_forward_logits``
(the training forward under the LRSA mask, for comparing with the serving engine) is re-exported.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("lrsa_forward_logits", "use_lrsa"):
        from lrsa_serve.training.attention import dispatch

        return getattr(dispatch, name)
    raise AttributeError(name)
