"""lrsa-serve: vLLM serving with LagKV KV-cache compression, and LRSA post-training."""

__version__ = "0.1.0"
