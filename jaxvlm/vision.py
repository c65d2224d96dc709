"""The ViT image encoder: SigLIP and CLIP from one module, driven by `VisionConfig` flags.

pixels [B, H, W, C] -> patches (a conv with stride = patch) -> [class token] + learned positions ->
[pre-norm] -> pre-LN blocks (the decoders' attention, with biases and no mask) -> post-norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxvlm.attention import Attention
from jaxvlm.config import VisionConfig
from jaxvlm.layout import layer_stack
from jaxvlm.layers import MLP, Dtype, Einsum, named


def _layer_norm(c: VisionConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=c.norm_eps, dtype=dtype, param_dtype=dtype, name=name,
                        scale_init=named(nn.initializers.ones_init(), ("embed",)),
                        bias_init=named(nn.initializers.zeros_init(), ("embed",)))


def _attention(c: VisionConfig, dtype: Dtype, name: str) -> Attention:
    return Attention(c.num_heads, c.num_heads, c.head_dim, c.head_dim ** -0.5, qkv_bias=True, out_bias=True,
                     dtype=dtype, name=name)


class EncoderBlock(nn.Module):
    """Returns the new hidden state twice: as a scan's carry and as this layer's output."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.config
        x = x + _attention(c, self.dtype, "attn")(_layer_norm(c, self.dtype, "pre_attn_norm")(x))[0]
        h = _layer_norm(c, self.dtype, "pre_mlp_norm")(x)
        x = x + MLP(c.mlp_dim, c.width, c.activation, dtype=self.dtype, name="mlp")(h)
        return x, x


class AttentionPool(nn.Module):
    """SigLIP's head: a learned probe attends over the tokens, then a residual MLP.  [B, P, D] -> [B, D]."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        probe = self.param("probe", named(nn.initializers.normal(1.0), ("embed",)), (c.width,), self.dtype)
        probe = probe.astype(self.dtype)
        probe = jnp.broadcast_to(probe, (x.shape[0], 1, c.width))
        h = _attention(c, self.dtype, "attn")(probe, kv_input=x)[0]
        h = h + MLP(c.mlp_dim, c.width, c.activation, dtype=self.dtype, name="mlp")(
            _layer_norm(c, self.dtype, "norm")(h))
        return h[:, 0]


class VisionEncoder(nn.Module):
    """A ViT image encoder (SigLIP or CLIP by its `VisionConfig`): patches embedded by a strided convolution,
    position embeddings, pre-norm blocks of full attention and an MLP, the post-norm; `features` gives what
    a vision-language model takes (a hidden state of its choice), `pooled` one vector per image (SigLIP's
    attention pool or CLIP's class token and projection)."""

    config: VisionConfig
    dtype: Dtype = jnp.float32
    remat: bool = False  # recompute each layer's activations in the backward pass instead of storing them
    scan_layers: bool = False  # stacked [L, ...] params run by a scan, rather than unrolled layers

    def setup(self):
        c = self.config
        p = c.patch_size
        self.patch_embed = nn.Conv(c.width, (p, p), strides=(p, p), padding="VALID", use_bias=c.patch_bias,
                                   dtype=self.dtype, param_dtype=self.dtype,
                                   kernel_init=named(nn.initializers.lecun_normal(),
                                                     ("patch", "patch", "channels", "embed")),
                                   bias_init=named(nn.initializers.zeros_init(), ("embed",)))
        if c.class_token:
            self.class_token = self.param("class_token", named(nn.initializers.normal(1.0), ("embed",)), (c.width,),
                                          self.dtype)
        self.pos_embedding = self.param("pos_embedding", named(nn.initializers.normal(0.02), ("image_tokens", "embed")),
                                        (c.num_tokens, c.width), self.dtype)
        if c.pre_norm:
            self.pre_norm = _layer_norm(c, self.dtype, "pre_norm")
        self.layers = layer_stack(EncoderBlock, c.depth, self.scan_layers, self.remat, (), config=c, dtype=self.dtype)
        self.post_norm = _layer_norm(c, self.dtype, "post_norm")
        if c.attention_pool:
            self.attention_pool = AttentionPool(c, self.dtype)
        if c.projection_dim is not None:
            self.projection = Einsum("BD,DE->BE", (c.width, c.projection_dim), ("embed", "embed"), dtype=self.dtype,
                                     out_dtype=jnp.float32)

    def hidden_states(self, pixels: jax.Array, depth: int | None = None) -> list[jax.Array]:
        """[embeddings, after layer 1, ..., after layer `depth` (default: all)], each [B, P(+1), D].

        pixels: float[B, H, W, C]. The first entry is the encoder's input (after CLIP's pre-norm), as
        transformers counts hidden states.
        """
        c = self.config
        x = self.patch_embed(pixels.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, c.width)
        if c.class_token:
            cls = jnp.broadcast_to(self.class_token.astype(self.dtype), (x.shape[0], 1, c.width))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embedding.astype(self.dtype)
        if c.pre_norm:
            x = self.pre_norm(x)
        depth = c.depth if depth is None else depth
        if self.scan_layers:  # the scan runs every layer; the states past `depth` are dropped
            _, states = self.layers(x)
            return [x] + [states[i] for i in range(depth)]
        states = [x]
        for i, layer in enumerate(self.layers[:depth]):
            with jax.named_scope(f"layer_{i}"):
                states.append(layer(states[-1])[0])
        return states

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """The final output [B, P(+1), D]: the post-norm covers every token, except in CLIP (class token only)."""
        x = self.hidden_states(pixels)[-1]
        return x if self.config.post_norm_class_only else self.post_norm(x)

    def pooled(self, pixels: jax.Array) -> jax.Array:
        """float32[B, E]: CLIP's normalised class token through its projection; SigLIP's attention pool."""
        c = self.config
        if c.attention_pool:
            return self.attention_pool(self(pixels)).astype(jnp.float32)
        if not c.can_pool:
            raise ValueError("this image encoder has neither a class token nor an attention-pool head to pool with")
        x = self.post_norm(self.hidden_states(pixels)[-1][:, 0])
        return self.projection(x) if c.projection_dim is not None else x.astype(jnp.float32)

    def features(self, pixels: jax.Array) -> jax.Array:
        """What a vision-language model consumes: [B, P, D] from the configured feature layer."""
        c = self.config
        if c.feature_layer is None:
            x = self(pixels)
        else:
            index = c.feature_layer % (c.depth + 1)
            x = self.hidden_states(pixels, depth=index)[index]
        return x[:, 1:] if c.class_token and not c.keep_class_token else x
