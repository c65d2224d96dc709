"""Hugging Face PyTorch checkpoints (safetensors, sharded or not, and .bin) -> jaxvlm checkpoints."""

from convert.core import convert

__all__ = ["convert"]
