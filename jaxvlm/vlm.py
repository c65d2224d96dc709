"""The whole model: a decoder, optionally fed by an image encoder through a projector; or an encoder alone.

Image features replace the placeholder tokens' embeddings, in order: the i-th placeholder of a row gets
the i-th feature of that row's images (`Inputs.pixels`, the batch's images as segments, each with its row:
a row's features one image after the other). Text embeddings are scaled as the decoder scales them (Gemma's
sqrt(D)); image features enter unscaled, as transformers 5 and big_vision do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxvlm.config import ModelConfig
from jaxvlm.decoder import Decoder, DecoderOutput
from jaxvlm.heads import ClassificationHead
from jaxvlm.kv_cache import KVCache
from jaxvlm.layers import MLP, Dtype, Einsum, RMSNorm
from jaxvlm.inputs import Inputs
from jaxvlm.patches import Patches
from jaxvlm.vision import VisionEncoder, norm_of


class Projector(nn.Module):
    """Vision width -> decoder width: one Linear (PaliGemma); Linear, exact GELU, Linear (LLaVA); (Gemma 3)
    the square patch grid average-pooled to `tokens` tokens, a Gemma RMSNorm, one Linear without bias; or
    (Qwen-VL) a norm of the encoder's kind (RMSNorm, LayerNorm) on each patch, or on each square with
    `norm_after_merge` (Qwen3-VL's DeepStack), each `merge` consecutive patches (a square) concatenated,
    Linear, GELU, Linear."""

    kind: str
    width: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    tokens: int | None = None
    norm_eps: float = 1e-6
    merge: int = 1  # patches a merged token takes ("merge")
    norm: str = "rms"  # "merge": the norm's kind, "rms" or "layer"
    norm_after_merge: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "mlp":
            return MLP(self.width, self.width, "gelu", self.use_bias, dtype=self.dtype, name="mlp")(x)
        if self.kind == "merge":
            B, L, C = x.shape
            norm = norm_of(self.norm, self.norm_eps, self.dtype, "norm")
            x = x.reshape(B, L // self.merge, self.merge * C) if self.norm_after_merge else x
            x = norm(x).reshape(B, L // self.merge, self.merge * C)
            return MLP(self.merge * C, self.width, "gelu", dtype=self.dtype, name="mlp")(x)
        if self.kind == "pooled":
            B, P, C = x.shape
            side, window = math.isqrt(P), math.isqrt(P) // math.isqrt(self.tokens)
            x = nn.avg_pool(x.reshape(B, side, side, C), (window, window), strides=(window, window))
            x = RMSNorm(self.norm_eps, 1.0, self.dtype, name="norm")(x.reshape(B, self.tokens, C))
            return Einsum("BPC,CD->BPD", (C, self.width), ("embed", "embed"), dtype=self.dtype, name="linear")(x)
        return Einsum("BPC,CD->BPD", (x.shape[-1], self.width), ("embed", "embed"), self.use_bias, dtype=self.dtype,
                      name="linear")(x)


def merge_image_features(text: jax.Array, features: jax.Array, image_rows: jax.Array, is_image: jax.Array):
    """text: [B, T, D]; features: [N, P, D] of images in row order, image_rows: int32[N] (-1: none);
    is_image: bool[B, T] -> [B, T, D], each row's placeholders holding its images' features in order."""
    N, P, D = features.shape
    rows = jnp.arange(text.shape[0])[:, None]
    # the features of the images of earlier rows come first in the flattened [N * P, D]
    before = jnp.sum((image_rows[None, :] >= 0) & (image_rows[None, :] < rows), axis=1) * P
    index = jnp.clip(before[:, None] + jnp.cumsum(is_image, axis=1) - 1, 0, N * P - 1)
    placed = jnp.take(features.reshape(N * P, D), index, axis=0)
    return jnp.where(is_image[:, :, None], placed.astype(text.dtype), text)


class VisionLanguageModel(nn.Module):
    """The network: a `Decoder`, optionally fed by a `VisionEncoder` through a `Projector` (a vision-language
    model), or an encoder alone, or a decoder with a classification head. Stateless: it maps params and an
    `Inputs` pytree (and a `KVCache`) to logits (and the updated cache); `jaxvlm.generate` and the trainer
    own whatever state generation or training keeps."""

    config: ModelConfig
    dtype: Dtype = jnp.float32  # the compute dtype; params are used in whatever dtype they are given
    remat: bool = False  # per-layer gradient checkpointing, in the decoder and the encoder
    scan_layers: bool = False  # each stack of layers as [L, ...] params run by a scan (see jaxvlm.layout)

    def setup(self):
        c = self.config
        if c.decoder is not None:
            self.decoder = Decoder(c.decoder, self.dtype, self.remat, self.scan_layers, c.image_blocks,
                                   c.tokens_per_image if c.image_blocks else None)
        if c.vision is not None:
            self.vision = VisionEncoder(c.vision, self.dtype, self.remat, self.scan_layers)
        if c.is_vlm:
            self.projector = Projector(c.projector, c.decoder.width, c.projector_bias, self.dtype, c.image_tokens,
                                       c.vision.norm_eps, c.vision.merge_size ** 2, c.vision.norm)
            # DeepStack: a projector for each inner layer's features, normalising merged squares
            self.deepstack_projectors = [
                Projector("merge", c.decoder.width, dtype=self.dtype, norm_eps=c.vision.norm_eps,
                          merge=c.vision.merge_size ** 2, norm=c.vision.norm, norm_after_merge=True,
                          name=f"deepstack_projector_{k}") for k in range(len(c.vision.deepstack_layers))]
        if c.head is not None:
            self.head = ClassificationHead(c.head, self.dtype)

    def encode_image(self, pixels: jax.Array | Patches) -> jax.Array:
        """pixels float[N, H, W, C] -> the features placed in the prompt, [N, P, D_decoder]; `Patches` -> [1,
        squares, D_decoder], each merged square of patches a token."""
        if isinstance(pixels, Patches):
            return self._patch_tokens(pixels)[0]
        return self.projector(self.vision.features(pixels))

    def _patch_tokens(self, patches: Patches) -> tuple[jax.Array, list[jax.Array]]:
        """The merged tokens of images given as patches, [1, squares, D_decoder], and DeepStack's (each alike)."""
        last, inner = self.vision.patch_features(patches)
        return self.projector(last), [project(x) for project, x in zip(self.deepstack_projectors, inner)]

    def _embeddings(self, inputs: Inputs) -> tuple[jax.Array | None, jax.Array | None]:
        """The prompt's embeddings with the images' features at the placeholders (None without images), and
        DeepStack's additions [n, B, T, D] (None without)."""
        if inputs.pixels is None:
            return None, None
        is_image = inputs.tokens == self.config.image_token_id
        text = self.decoder.embed(jnp.where(is_image | ~inputs.valid, 0, inputs.tokens))  # (see Decoder)
        if isinstance(inputs.pixels, Patches):  # one sequence of tokens for the whole batch, in row order
            features, inner = self._patch_tokens(inputs.pixels)
            index = jnp.clip(jnp.cumsum(is_image.reshape(-1)) - 1, 0, features.shape[1] - 1).reshape(is_image.shape)
            place = lambda f, base: jnp.where(is_image[..., None], f[0][index].astype(text.dtype), base)
            deepstack = jnp.stack([place(f, 0) for f in inner]) if inner else None
            return place(features, text), deepstack
        return merge_image_features(text, self.encode_image(inputs.pixels), inputs.image_rows, is_image), None

    def __call__(self, inputs: Inputs, cache: KVCache | None = None, last_only: bool = False) -> DecoderOutput:
        """The decoder over `inputs` (`jaxvlm.inputs.Inputs`), the images' features at the placeholder tokens
        (whose ids may lie outside the vocabulary). See `Decoder.__call__` for `cache` and `last_only`."""
        embeddings, deepstack = self._embeddings(inputs)
        return self.decoder(inputs.tokens, inputs.positions, inputs.valid, cache, embeddings, inputs.blocks,
                            last_only, deepstack)

    def classify(self, inputs: Inputs) -> jax.Array:
        """The classification head's float32 logits: [B, labels] or, per token, [B, T, labels]."""
        embeddings, deepstack = self._embeddings(inputs)
        hidden, _ = self.decoder.hidden_states(inputs.tokens, inputs.positions, inputs.valid, None, embeddings,
                                               inputs.blocks, deepstack)
        return self.head(hidden, inputs.valid)

    def initialize(self, tokens: jax.Array, pixels: jax.Array | Patches):
        """Touches every submodule, so `init` creates every parameter."""
        c = self.config
        out = []
        if isinstance(pixels, Patches):
            out.append(self.vision.patch_features(pixels))
        elif c.vision is not None:
            out += [self.vision(pixels), self.vision.features(pixels)]
            if c.vision.can_pool:
                out.append(self.vision.pooled(pixels))
        if c.decoder is not None:
            run = self.classify if c.head is not None else self
            out.append(run(Inputs.build(c, tokens, tokens >= 0, pixels=pixels if c.is_vlm else None)))
        return out
