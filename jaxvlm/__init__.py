"""jaxvlm: vision-language and text decoder models in JAX."""

from jaxvlm.config import DecoderConfig, ImageProcessing, ModelConfig, RopeConfig, TokensConfig, VisionConfig

__all__ = ["DecoderConfig", "ImageProcessing", "ModelConfig", "Model", "RopeConfig", "TokensConfig", "VisionConfig",
           "load"]


def __getattr__(name):
    # The model (and jax with it) is imported on first use, so that the `jaxvlm` command starts at once and
    # a Ctrl-C while jax loads is the command's to report.
    if name in ("Model", "load"):
        from jaxvlm import model
        return getattr(model, name)
    raise AttributeError(f"module 'jaxvlm' has no attribute {name!r}")
