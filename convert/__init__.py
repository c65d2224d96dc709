"""Hugging Face PyTorch checkpoints (safetensors, sharded or not, and .bin) -> jaxvlm checkpoints."""

__all__ = ["convert"]


def __getattr__(name):
    # Imported on first use, so that the command line starts (and answers --help) before jax loads.
    if name == "convert":
        from convert.core import convert
        return convert
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
