"""LRSA post-training: HF attention registration, data, loop (torchrun + FSDP2), export."""
