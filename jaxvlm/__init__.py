"""jaxvlm: vision-language and text decoder models in JAX."""

from jaxvlm.config import DecoderConfig, ImageProcessing, ModelConfig, RopeConfig, TokensConfig, VisionConfig
from jaxvlm.model import Model, load

__all__ = ["DecoderConfig", "ImageProcessing", "ModelConfig", "Model", "RopeConfig", "TokensConfig", "VisionConfig",
           "load"]
