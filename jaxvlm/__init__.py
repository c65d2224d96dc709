"""jaxvlm: vision-language and text decoder models in JAX."""

from jaxvlm.config import DecoderConfig, ModelConfig, RopeConfig, TokensConfig
from jaxvlm.model import Model, load

__all__ = ["DecoderConfig", "ModelConfig", "Model", "RopeConfig", "TokensConfig", "load"]
