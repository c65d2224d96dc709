"""The ViT image encoder: SigLIP, CLIP and Qwen-VL's from one module, driven by `VisionConfig` flags.

pixels [B, H, W, C] -> patches (a conv with stride = patch) -> [class token] + learned positions ->
[pre-norm] -> pre-LN blocks (the decoders' attention, with biases and no mask) -> post-norm.

Images of any size (Qwen-VL) come as `jaxvlm.patches.Patches`, every image of a batch in one sequence:
patches -> a linear embedding -> pre-norm blocks with a 2-D rotary embedding, attending within their
image (or their window of it) -> the projector merges squares of patches into tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxvlm.attention import Attention
from jaxvlm.config import VisionConfig
from jaxvlm.layout import layer_stack
from jaxvlm.layers import MLP, Dtype, Einsum, GatedMLP, RMSNorm, named
from jaxvlm.patches import Patches
from jaxvlm.rope import grid_rope_tables


def norm_of(kind: str, eps: float, dtype: Dtype, name: str) -> nn.Module:
    """A LayerNorm (`kind` "layer") or an RMSNorm ("rms"), as an image encoder and its projector use them."""
    if kind == "rms":
        return RMSNorm(eps, dtype=dtype, name=name)
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=dtype, name=name,
                        scale_init=named(nn.initializers.ones_init(), ("embed",)),
                        bias_init=named(nn.initializers.zeros_init(), ("embed",)))


def _layer_norm(c: VisionConfig, dtype: Dtype, name: str) -> nn.Module:
    return norm_of(c.norm, c.norm_eps, dtype, name)


def _attention(c: VisionConfig, dtype: Dtype, name: str) -> Attention:
    return Attention(c.num_heads, c.num_heads, c.head_dim, c.head_dim ** -0.5, qkv_bias=True, out_bias=True,
                     dtype=dtype, name=name)


def resampled_positions(table: jax.Array, patches: Patches, side: int) -> jax.Array:
    """Learned positions on a `side` x `side` grid (`table` [side * side, D]) resampled to each patch's
    place in its own image's grid, [L, D]: bilinear, the grids' corners aligned (as transformers'
    `F.interpolate(mode="bilinear", align_corners=True)` taps them for Qwen3-VL)."""
    L = patches.image.shape[0]
    image = jnp.where(patches.image >= 0, patches.image, L)
    extent = jax.ops.segment_max(patches.position, image, num_segments=L + 1) + 1  # [L + 1, 2]: rows, columns
    size = extent[image].astype(jnp.float32)  # [L, 2]: the patch's image's rows and columns

    def taps(index, n):  # the two table rows (or columns) either side of each patch's, and their weights
        source = index.astype(jnp.float32) * (side - 1) / jnp.maximum(n - 1, 1)
        floor = jnp.floor(source)
        offsets = jnp.arange(2, dtype=jnp.float32)
        weights = jnp.maximum(1 - jnp.abs(source[:, None] - floor[:, None] - offsets), 0)
        return jnp.clip(floor[:, None] + offsets, 0, side - 1).astype(jnp.int32), weights

    rows, row_weights = taps(patches.position[:, 0], size[:, 0])
    columns, column_weights = taps(patches.position[:, 1], size[:, 1])
    index = (rows[:, :, None] * side + columns[:, None, :]).reshape(L, 4)
    weights = (row_weights[:, :, None] * column_weights[:, None, :]).reshape(L, 4)
    return jnp.sum(jnp.take(table.astype(jnp.float32), index, axis=0) * weights[..., None], axis=1)


class EncoderBlock(nn.Module):
    """Returns the new hidden state twice: as a scan's carry and as this layer's output. `rope` (cos, sin)
    and `masks` (within the image, within the window: each bool[B, T, T]) are for patch sequences, with
    `windowed` (a bool, traced when the layers are scanned) picking the mask; None: full attention."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope=None, masks=None, windowed=False) -> tuple[jax.Array, jax.Array]:
        c = self.config
        if masks is None:
            mask = None
        elif isinstance(windowed, bool):  # unrolled layers
            mask = masks[1] if windowed else masks[0]
        else:
            mask = jnp.where(windowed, masks[1], masks[0])
        x = x + _attention(c, self.dtype, "attn")(_layer_norm(c, self.dtype, "pre_attn_norm")(x), rope, mask)[0]
        h = _layer_norm(c, self.dtype, "pre_mlp_norm")(x)
        mlp = GatedMLP(c.width, c.mlp_dim, c.activation, use_bias=True, dtype=self.dtype, name="mlp") if c.gated_mlp \
            else MLP(c.mlp_dim, c.width, c.activation, dtype=self.dtype, name="mlp")
        x = x + mlp(h)
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
        # Scanned, the arguments after x are: rope, masks (shared), windowed (per layer).
        self.layers = layer_stack(EncoderBlock, c.depth, self.scan_layers, self.remat,
                                  (nn.broadcast, nn.broadcast, 0), config=c, dtype=self.dtype)
        if c.image_size is None:  # patches come cut: their embedding is a linear map of their values
            self.patch_embed = Einsum("BLK,KD->BLD", (c.patch_dim, c.width), ("patch", "embed"), c.patch_bias,
                                      dtype=self.dtype)
            if c.position_grid is not None:
                self.pos_embedding = self.param("pos_embedding",
                                                named(nn.initializers.normal(0.02), ("image_tokens", "embed")),
                                                (c.position_grid ** 2, c.width), self.dtype)
            return
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
        return self._run_layers(x, depth)

    def _run_layers(self, x: jax.Array, depth: int | None, rope=None, masks=None) -> list[jax.Array]:
        c = self.config
        depth = c.depth if depth is None else depth
        if self.scan_layers:  # the scan runs every layer; the states past `depth` are dropped
            windowed = jnp.asarray([c.windowed(i) for i in range(c.depth)])
            _, states = self.layers(x, rope, masks, windowed)
            return [x] + [states[i] for i in range(depth)]
        states = [x]
        for i, layer in enumerate(self.layers[:depth]):
            with jax.named_scope(f"layer_{i}"):
                states.append(layer(states[-1], rope, masks, c.windowed(i))[0])
        return states

    def patch_features(self, patches: Patches) -> tuple[jax.Array, list[jax.Array]]:
        """The last hidden state of a batch's images given as patches (`jaxvlm.patches`), [1, L, D]: what
        the projector merges into tokens; and the outputs of the `deepstack_layers`, each [1, L, D]."""
        c = self.config
        x = self.patch_embed(patches.values[None].astype(self.dtype))
        if c.position_grid is not None:
            x = x + resampled_positions(self.pos_embedding, patches, c.position_grid)[None].astype(self.dtype)
        rope = tuple(t[None] for t in grid_rope_tables(patches.position, c.rope_theta, c.head_dim))
        states = self._run_layers(x, None, rope, patches.attention_masks())
        return states[-1], [states[i + 1] for i in c.deepstack_layers]

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
