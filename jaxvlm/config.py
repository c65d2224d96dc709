"""Model configuration: frozen, hashable dataclasses (usable as static arguments under jit).

Names are jaxvlm's own and describe behaviour, never a model family: a family is a set of flag values,
chosen in `convert/` from a Hugging Face `config.json`. Shape letters follow the alphabet in `layers.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any

import numpy as np

LAYER_TYPES = ("global", "local")  # local = sliding-window attention
MLP_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
VISION_ACTIVATIONS = ("gelu_tanh", "quick_gelu", "gelu", "silu")
VISION_NORMS = ("layer", "rms")
# PaliGemma: one Linear; LLaVA: Linear, exact GELU, Linear; Gemma 3: the patch grid average-pooled, an
# RMSNorm, one Linear without bias; Qwen-VL: an RMSNorm, each square of merge_size x merge_size patches
# concatenated, Linear, exact GELU, Linear
PROJECTORS = ("linear", "mlp", "pooled", "merge")
# How a prompt places its images' tokens (jaxvlm.prompts): none; before BOS and the text (PaliGemma's);
# where the text's image marker stands (LLaVA's); at each image marker, framed by begin- and end-of-image
# tokens and blank lines (Gemma 3's); at each image marker, as many as that image's size gives (Qwen-VL's)
PROMPT_FORMATS = ("plain", "images_first", "image_marker", "framed_images", "sized_images")
RENAMED_PROMPT_FORMATS = {"paligemma": "images_first", "llava": "image_marker"}  # as folders written before say
HEAD_KINDS = ("sequence_classification", "token_classification")
QUANTIZE_MODES = ("int8",)


MAX_IMAGE_SIDE = 1 << 14
RESAMPLE_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # Pillow's

# Sizes are bounded before any table or buffer is built from them; each bound is far above every published
# model (a config.json edited to 10**9 layers is refused, not built).
SIZE_LIMITS = {"depth": 1024, "width": 1 << 17, "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024,
               "mlp_dim": 1 << 20, "vocab_size": 1 << 22, "image_size": 1 << 14, "patch_size": 1 << 10,
               "num_experts": 1 << 12, "top_k": 1 << 12,
               "max_position_embeddings": 2**31 - 1}  # positions are int32


def _require_size(cls: str, field: str, value: Any) -> None:
    limit = SIZE_LIMITS.get(field, 2**31 - 1)
    _require(isinstance(value, int) and 0 < value <= limit, cls, field,
             f"must be a positive int of at most {limit:,}, got {value!r}")


def _require(ok: bool, cls: str, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{cls}.{field}: {message}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrequencySmoothing:
    """Llama 3's rescaling of the rotary frequencies (transformers' "llama3" rope type): a frequency whose
    wavelength passes the pre-training length / `low_freq_factor` is divided by `factor`, one whose
    wavelength is under the pre-training length / `high_freq_factor` is kept, and those between are
    blended from one to the other."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float

    def __post_init__(self):
        _require(self.factor > 0, "FrequencySmoothing", "factor", f"must be > 0, got {self.factor}")
        _require(0 < self.low_freq_factor < self.high_freq_factor, "FrequencySmoothing", "high_freq_factor",
                 f"must be above low_freq_factor > 0, got {self.high_freq_factor} and {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding: the default one, or LongRoPE when `long_factor` is set.

    LongRoPE divides each frequency by a per-frequency factor, `short_factor` while the longest position
    of a forward pass is within `original_max_position`, `long_factor` beyond it, and multiplies cos and
    sin by `attention_factor`. `linear_factor` divides every frequency by one factor (positions
    interpolated, as transformers' "linear" rope type; Gemma 3's global layers). `smoothing` rescales the
    frequencies as Llama 3 does, around `original_max_position`.
    """

    theta: float = 10_000.0
    rotary_fraction: float = 1.0  # partial rotary: only the first fraction of head_dim is rotated
    linear_factor: float = 1.0
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    original_max_position: int | None = None  # the pre-training context length the scaling extends
    attention_factor: float = 1.0
    smoothing: FrequencySmoothing | None = None
    # LongRoPE's factors chosen for each row from its own longest position (rows that are unrelated requests,
    # as the engine's), not for the batch from its longest (transformers' batches)
    per_row: bool = False
    # M-RoPE (Qwen-VL): positions come in three streams (time, height, width; text has the same in each), and
    # each rotary frequency turns with one of them: runs of these many frequencies (Qwen2.5-VL), or, with
    # `mrope_interleaved`, frequency i with stream i % 3 for the first 3 x section[s] frequencies (Qwen3-VL)
    mrope_section: tuple[int, int, int] | None = None
    mrope_interleaved: bool = False

    def __post_init__(self):
        _require(self.theta > 0, "RopeConfig", "theta", f"must be > 0, got {self.theta}")
        _require(0 < self.rotary_fraction <= 1, "RopeConfig", "rotary_fraction",
                 f"must be in (0, 1], got {self.rotary_fraction}")
        _require(self.linear_factor > 0, "RopeConfig", "linear_factor", f"must be > 0, got {self.linear_factor}")
        _require((self.short_factor is None) == (self.long_factor is None), "RopeConfig", "long_factor",
                 "LongRoPE needs short_factor and long_factor together")
        if self.is_longrope:
            _require(self.original_max_position is not None, "RopeConfig", "original_max_position",
                     "LongRoPE needs the pre-training length its factors switch at")
            _require(len(self.short_factor) == len(self.long_factor), "RopeConfig", "short_factor",
                     f"has {len(self.short_factor)} entries but long_factor has {len(self.long_factor)}")
        if self.smoothing is not None:
            _require(self.original_max_position is not None, "RopeConfig", "original_max_position",
                     "frequency smoothing needs the pre-training length it scales around")
            _require(not self.is_longrope, "RopeConfig", "smoothing", "cannot join LongRoPE's factors")
        if self.mrope_section is not None:
            _require(len(self.mrope_section) == 3 and all(isinstance(n, int) and n >= 0 for n in self.mrope_section),
                     "RopeConfig", "mrope_section", f"must be three counts (time, height, width), "
                                                    f"got {self.mrope_section!r}")
            _require(not self.is_longrope, "RopeConfig", "mrope_section", "cannot join LongRoPE's factors")

    def mrope_streams(self, head_dim: int) -> np.ndarray | None:
        """M-RoPE: the position stream (0 time, 1 height, 2 width) each rotary frequency turns with (the
        section's sum is checked against `head_dim` by `DecoderConfig`)."""
        if self.mrope_section is None:
            return None
        n = self.rotary_dim(head_dim) // 2
        if not self.mrope_interleaved:
            return np.repeat(np.arange(3, dtype=np.int32), self.mrope_section)
        i = np.arange(n)
        streams = np.zeros(n, np.int32)
        for s in (1, 2):
            streams[(i % 3 == s) & (i < 3 * self.mrope_section[s])] = s
        return streams

    @property
    def is_longrope(self) -> bool:
        return self.long_factor is not None

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.rotary_fraction)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeConfig:
    """A mixture-of-experts MLP: a router sends each token to `top_k` of `num_experts` gated MLPs of width
    `mlp_dim` and sums their outputs weighted by its softmax (renormalised over the chosen experts when
    `normalize_weights`). `layers` says, per layer, whether its MLP is the mixture (empty: every layer);
    the other layers keep the decoder's dense MLP."""

    num_experts: int  # E
    top_k: int
    mlp_dim: int
    normalize_weights: bool = True
    layers: tuple[bool, ...] = ()

    def __post_init__(self):
        for field in ("num_experts", "top_k", "mlp_dim"):
            value = getattr(self, field)
            _require_size("MoeConfig", field, value)
        _require(self.top_k <= self.num_experts, "MoeConfig", "top_k",
                 f"{self.top_k} is more than num_experts={self.num_experts}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """A decoder-only transformer. Every family (Gemma, Gemma 2, Phi-3, Qwen3, ...) is a set of these flags."""

    vocab_size: int
    width: int  # D
    depth: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K; N for MHA, 1 for MQA
    head_dim: int  # H
    mlp_dim: int  # F
    mlp_activation: str = "silu"  # gated MLP: act(x W_gate) * (x W_up)
    norm_eps: float = 1e-6
    norm_scale_offset: float = 0.0  # Gemma stores w and scales by (1 + w)
    embed_scale: bool = False  # multiply token embeddings by sqrt(D) (Gemma)
    qkv_bias: bool = False
    out_bias: bool = False
    use_qk_norm: bool = False  # RMSNorm over H on q and k before RoPE (Qwen3)
    use_post_norms: bool = False  # norms on the attention and MLP outputs too (Gemma 2)
    query_pre_attn_scalar: float | None = None  # queries scaled by this**-0.5; None means head_dim
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None  # W: a query sees the W most recent keys, itself included
    layer_types: tuple[str, ...] = ()  # per layer, "global" or "local"; empty: all local when sliding_window is set
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    local_rope: RopeConfig | None = None  # the sliding-window layers' own rotary embedding (Gemma 3); None: `rope`
    max_position_embeddings: int = 8192
    tie_embeddings: bool = False
    moe: MoeConfig | None = None  # mixture-of-experts MLPs (Qwen3-MoE)
    # the Hugging Face family it was read as (config.json's model_type: convert.families), which export writes
    # back; None for a config made in code (export then takes the one family with its behaviours)
    model_type: str | None = None

    def __post_init__(self):
        name = "DecoderConfig"
        for field in ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                      "max_position_embeddings"):
            value = getattr(self, field)
            _require_size(name, field, value)
        _require(self.num_heads % self.num_kv_heads == 0, name, "num_kv_heads",
                 f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        _require(self.mlp_activation in MLP_ACTIVATIONS, name, "mlp_activation",
                 f"must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}")
        _require(not self.layer_types or len(self.layer_types) == self.depth, name, "layer_types",
                 f"has {len(self.layer_types)} entries for depth={self.depth}")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        _require(not bad, name, "layer_types", f"entries must be in {LAYER_TYPES}, got {bad[:1]}")
        _require(self.sliding_window is not None or "local" not in self.layer_types, name, "sliding_window",
                 "local layers need a sliding_window")
        _require(self.sliding_window is None or self.sliding_window > 0, name, "sliding_window",
                 f"must be > 0, got {self.sliding_window}")
        _require(self.moe is None or not self.moe.layers or len(self.moe.layers) == self.depth, name, "moe",
                 f"layers has {len(self.moe.layers) if self.moe else 0} entries for depth={self.depth}")
        for field in ("rope", "local_rope"):
            rope = getattr(self, field)
            if rope is None:
                continue
            _require(rope.rotary_dim(self.head_dim) % 2 == 0, name, field,
                     f"rotary dim {rope.rotary_dim(self.head_dim)} must be even")
            if rope.is_longrope:
                _require(len(rope.short_factor) == rope.rotary_dim(self.head_dim) // 2, name, field,
                         f"LongRoPE factors need rotary_dim/2 = {rope.rotary_dim(self.head_dim) // 2} entries, "
                         f"got {len(rope.short_factor)}")
            if rope.mrope_section is not None:
                _require(sum(rope.mrope_section) == rope.rotary_dim(self.head_dim) // 2, name, f"{field}.mrope_section",
                         f"{list(rope.mrope_section)} adds up to {sum(rope.mrope_section)}, not "
                         f"{rope.rotary_dim(self.head_dim) // 2} (half the rotary dimension)")

    @property
    def group_size(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_moe(self, layer: int) -> bool:
        """Whether `layer`'s MLP is the mixture of experts."""
        return self.moe is not None and (not self.moe.layers or self.moe.layers[layer])

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for global attention."""
        if self.layer_types and self.layer_types[layer] == "global":
            return None
        return self.sliding_window


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokensConfig:
    """Special token ids, and whether prompts start with BOS."""

    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    add_bos: bool = False

    def __post_init__(self):
        _require(not self.add_bos or self.bos_id is not None, "TokensConfig", "bos_id",
                 "add_bos is set but bos_id is None")
        for field, ids in (("bos_id", [self.bos_id]), ("eos_ids", self.eos_ids), ("pad_id", [self.pad_id])):
            bad = [i for i in ids if i is not None and not (isinstance(i, int) and 0 <= i < 2**31)]
            _require(not bad, "TokensConfig", field, f"token ids are int32 in [0, 2**31 - 1], got {bad[0] if bad else 0}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """A ViT image encoder; SigLIP, CLIP and Qwen-VL's are sets of these flags.

    SigLIP: no class token, post-norm on every token, optional attention-pool head. CLIP: a class token,
    a norm before the encoder, the post-norm on the pooled class token only, an optional projection.
    Qwen2.5-VL: images of any size (`image_size` None) come as patches cut by the processor, each
    `temporal_patch_size` frames deep; a 2-D rotary embedding over the patch rows and columns instead of
    learned positions; RMSNorms and a gated MLP with biases; attention within windows of `window` x
    `window` merged patches except in the `full_attention_layers`, and never across images. Qwen3-VL:
    LayerNorms and a plain MLP, no windows, learned positions resampled to each image (`position_grid`)
    besides the rotary embedding, and DeepStack's features from inner layers (`deepstack_layers`).
    """

    image_size: int | None  # None: any size, cut into patches by the processor (`PatchGrid`)
    patch_size: int
    width: int  # D
    depth: int  # L
    num_heads: int  # N
    mlp_dim: int  # F
    activation: str = "gelu_tanh"
    norm_eps: float = 1e-6
    patch_bias: bool = True
    class_token: bool = False
    pre_norm: bool = False
    post_norm_class_only: bool = False  # CLIP normalises the pooled class token only
    attention_pool: bool = False  # SigLIP's multi-head attention pooling head
    projection_dim: int | None = None  # CLIP's visual projection of the pooled token
    # What a vision-language model takes: None is the final output (after the post-norm, PaliGemma);
    # an int indexes the hidden states as transformers does (0 = embeddings, -2 = LLaVA's second-to-last).
    feature_layer: int | None = None
    keep_class_token: bool = False  # in the features (LLaVA's "full" strategy) rather than dropped
    norm: str = "layer"  # "rms": RMSNorms (Qwen-VL)
    gated_mlp: bool = False  # down(act(gate(x)) * up(x)), with biases (Qwen2.5-VL)
    rope_theta: float | None = None  # set: a 2-D rotary embedding over patch rows and columns, no learned positions
    temporal_patch_size: int = 1  # frames a patch spans (an image is repeated to fill them)
    merge_size: int = 1  # patches a side of the square the projector merges into one token
    window: int | None = None  # merged patches a side of an attention window; None: full attention everywhere
    full_attention_layers: tuple[int, ...] = ()  # with `window`, the layers that attend over the whole image
    # with `image_size` None: learned positions on a square grid of this side, resampled bilinearly (corners
    # aligned) to each image's patch grid, besides the rotary embedding (Qwen3-VL)
    position_grid: int | None = None
    # layers whose outputs, merged into tokens by projectors of their own, are added to the first decoder
    # layers' outputs at the image tokens, one layer each in order (Qwen3-VL's DeepStack)
    deepstack_layers: tuple[int, ...] = ()
    model_type: str | None = None  # the Hugging Face encoder family it was read as (as DecoderConfig's)

    def __post_init__(self):
        name = "VisionConfig"
        for field in ("patch_size", "width", "depth", "num_heads", "mlp_dim", "temporal_patch_size", "merge_size"):
            value = getattr(self, field)
            _require_size(name, field, value)
        if self.image_size is None:
            _require(self.rope_theta is not None, name, "image_size",
                     "None (images of any size) needs rope_theta: learned positions are for one size")
        else:
            _require_size(name, "image_size", self.image_size)
            _require(self.image_size % self.patch_size == 0, name, "patch_size",
                     f"{self.patch_size} does not divide image_size={self.image_size}")
        _require(self.norm in VISION_NORMS, name, "norm", f"must be one of {VISION_NORMS}, got {self.norm!r}")
        _require(self.rope_theta is None or self.head_dim % 4 == 0, name, "rope_theta",
                 f"a 2-D rotary embedding needs a head_dim divisible by 4, got {self.head_dim}")
        _require(self.window is None or (isinstance(self.window, int) and self.window > 0), name, "window",
                 f"must be a positive int or None, got {self.window!r}")
        for field in ("full_attention_layers", "deepstack_layers"):
            _require(all(isinstance(i, int) and 0 <= i < self.depth for i in getattr(self, field)), name, field,
                     f"must be layer indices below depth={self.depth}, got {getattr(self, field)!r}")
        _require(self.position_grid is None or (self.image_size is None and isinstance(self.position_grid, int)
                                                and self.position_grid > 0), name, "position_grid",
                 f"must be a positive int, with image_size None (images of any size), got {self.position_grid!r}")
        _require(self.width % self.num_heads == 0, name, "num_heads",
                 f"{self.num_heads} does not divide width={self.width}")
        _require(self.activation in VISION_ACTIVATIONS, name, "activation",
                 f"must be one of {VISION_ACTIVATIONS}, got {self.activation!r}")
        if self.feature_layer is not None:
            _require(-(self.depth + 1) <= self.feature_layer <= self.depth, name, "feature_layer",
                     f"{self.feature_layer} is not a hidden-state index for depth={self.depth}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """Values in one patch as the processor cuts it: channels x frames x patch_size x patch_size."""
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def windowed(self, layer: int) -> bool:
        """Whether `layer` attends within windows rather than over the whole image."""
        return self.window is not None and layer not in self.full_attention_layers

    @property
    def num_tokens(self) -> int:
        """Tokens the encoder runs on: the patches, and the class token."""
        return self.num_patches + int(self.class_token)

    @property
    def num_features(self) -> int:  # P: image tokens a vision-language model places in its prompt
        return self.num_patches + int(self.class_token and self.keep_class_token)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def can_pool(self) -> bool:
        """Whether it gives one vector per image: through the attention pool, or from the class token."""
        return self.attention_pool or self.class_token


@dataclasses.dataclass(frozen=True, kw_only=True)
class PanAndScan:
    """Gemma 3's pan and scan: an image whose long side is at least `min_ratio` times its short side is
    also cut, along the long side, into 2 .. `max_crops` crops of at least `min_crop_size` pixels, each
    processed as an image of its own after the whole one."""

    min_crop_size: int = 256
    max_crops: int = 4
    min_ratio: float = 1.2

    def __post_init__(self):
        _require(type(self.min_crop_size) is int and self.min_crop_size > 0, "PanAndScan", "min_crop_size",
                 f"must be a positive int, got {self.min_crop_size!r}")
        _require(type(self.max_crops) is int and self.max_crops >= 2, "PanAndScan", "max_crops",
                 f"must be an int >= 2, got {self.max_crops!r}")
        _require(self.min_ratio >= 1, "PanAndScan", "min_ratio", f"must be >= 1, got {self.min_ratio}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PatchGrid:
    """Images of any size, as Qwen-VL's processor takes them: resized, the aspect ratio kept, to whole
    merged patches (`patch_size` * `merge_size` pixels a side) of `min_pixels` to `max_pixels` pixels in
    all, then cut into `patch_size` patches, each repeated `temporal_patch_size` times along time (an image
    is a video of one frame) and ordered so that each `merge_size` x `merge_size` square is consecutive."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    def __post_init__(self):
        for field in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            _require_size("PatchGrid", field, getattr(self, field))
        _require(self.min_pixels <= self.max_pixels, "PatchGrid", "max_pixels",
                 f"must be at least min_pixels={self.min_pixels}, got {self.max_pixels}")

    @property
    def factor(self) -> int:
        """Pixels a side of a merged patch: every resized side is a multiple of it."""
        return self.patch_size * self.merge_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageProcessing:
    """How an image becomes pixel values, as the checkpoint's `preprocessor_config.json` says.

    Resize to `size` (height, width) or so the shortest edge is `shortest_edge`, centre-crop to
    `crop_size`, multiply by `rescale_factor`, then (x - mean) / std per channel. With `patches`, the size
    is each image's own (`PatchGrid`) and the pixels come out as patches.
    """

    size: tuple[int, int] | None = None
    shortest_edge: int | None = None
    resample: int = 3  # a PIL filter number; 3 is bicubic
    crop_size: tuple[int, int] | None = None
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, float, float] | None = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] | None = (0.5, 0.5, 0.5)
    pan_and_scan: PanAndScan | None = None  # None: images are taken whole
    patches: PatchGrid | None = None  # images of any size, cut into patches (Qwen-VL), instead of a size

    def __post_init__(self):
        name = "ImageProcessing"
        _require(self.size is None or self.shortest_edge is None, name, "size", "give size or shortest_edge, not both")
        _require(self.patches is None or self.size is self.shortest_edge is self.crop_size is None, name, "patches",
                 "sets each image's size itself: give no size, shortest_edge or crop_size with it")
        _require((self.mean is None) == (self.std is None), name, "std", "mean and std go together")
        for field in ("size", "crop_size"):
            value = getattr(self, field)
            _require(value is None or all(isinstance(v, int) and 0 < v <= MAX_IMAGE_SIDE for v in value), name, field,
                     f"must be two sizes in [1, {MAX_IMAGE_SIDE}], got {value!r}")
        _require(self.shortest_edge is None or (isinstance(self.shortest_edge, int)
                                                and 0 < self.shortest_edge <= MAX_IMAGE_SIDE), name, "shortest_edge",
                 f"must be in [1, {MAX_IMAGE_SIDE}], got {self.shortest_edge!r}")
        _require(self.resample in RESAMPLE_FILTERS, name, "resample",
                 f"must be a Pillow filter number {sorted(RESAMPLE_FILTERS)}, got {self.resample!r}")
        _require(self.std is None or all(v != 0 for v in self.std), name, "std", f"must not be 0, got {self.std}")
        _require(self.rescale_factor is None or self.rescale_factor > 0, name, "rescale_factor",
                 f"must be > 0, got {self.rescale_factor}")

    def output_size(self) -> tuple[int, int] | None:
        """The (height, width) every image comes out as: the crop, else the fixed size; None when it varies
        (resized by its shortest edge, not cropped)."""
        return self.crop_size or self.size

    def check_encoder(self, image_size: int) -> str | None:
        """Why this processing cannot feed an encoder of `image_size` pixels (None if it can): its output must
        be that size, and nothing is resized past twice it."""
        out = self.output_size()
        if out is None or tuple(out) != (image_size, image_size):
            return f"makes images of {'varying size' if out is None else f'{out[0]}x{out[1]}'}; the encoder takes " \
                   f"{image_size}x{image_size}"
        resized = max(self.size or (self.shortest_edge or 0,))
        if resized > 2 * image_size:
            return f"resizes to {resized} pixels, more than twice the encoder's {image_size}"
        return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationDefaults:
    """A checkpoint's `generation_config.json`, as transformers' `generate` applies it: sampling (with these
    temperature, top-k and top-p) only where `do_sample` says; the repetition penalty, the fewest and the
    most new tokens. Fields the file leaves out hold transformers' `GenerationConfig` defaults."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    max_new_tokens: int | None = None  # None: jaxvlm's default

    def __post_init__(self):
        name = "GenerationDefaults"
        _require(self.temperature >= 0, name, "temperature", f"must be >= 0, got {self.temperature}")
        _require(self.top_k is None or self.top_k >= 0, name, "top_k", f"must be >= 0, got {self.top_k}")
        _require(0 < self.top_p <= 1, name, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.repetition_penalty > 0, name, "repetition_penalty",
                 f"must be > 0, got {self.repetition_penalty}")
        _require(self.min_new_tokens >= 0, name, "min_new_tokens", f"must be >= 0, got {self.min_new_tokens}")
        _require(self.max_new_tokens is None or self.max_new_tokens > 0, name, "max_new_tokens",
                 f"must be > 0, got {self.max_new_tokens}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """A classification head in place of the language-model head: a Linear over the final hidden states,
    of the last real token (sequence classification) or of every token (token classification)."""

    kind: str  # one of HEAD_KINDS
    labels: tuple[str, ...]  # the class names, in logit order
    bias: bool = False

    def __post_init__(self):
        _require(self.kind in HEAD_KINDS, "HeadConfig", "kind", f"must be one of {HEAD_KINDS}, got {self.kind!r}")
        _require(len(self.labels) > 0, "HeadConfig", "labels", "needs at least one label")

    @property
    def num_labels(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizationConfig:
    """How the stored weights are quantized (see `jaxvlm.quantize`)."""

    mode: str = "int8"
    group_size: int | None = None  # inputs per scale along the last input axis; None: one per output channel

    def __post_init__(self):
        _require(self.mode in QUANTIZE_MODES, "QuantizationConfig", "mode",
                 f"must be one of {list(QUANTIZE_MODES)}, got {self.mode!r}")
        _require(self.group_size is None or (type(self.group_size) is int and self.group_size > 0),
                 "QuantizationConfig", "group_size", f"must be a positive integer or None, got {self.group_size!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank adapters beside chosen projections (see `jaxvlm.lora`): W x + (alpha / rank) B A x."""

    rank: int = 8
    alpha: float | None = None  # None: alpha = rank, so the adapters' product is added unscaled
    # Each a module path, or a regular expression over module paths, that a projection's path ends with:
    # "attn/q" is every attention's query projection, "decoder/.*/mlp/(gate|up)" the decoder's gated MLP.
    targets: tuple[str, ...] = ("attn/q", "attn/v")

    def __post_init__(self):
        _require(type(self.rank) is int and self.rank >= 1, "LoraConfig", "rank",
                 f"must be an integer >= 1, got {self.rank!r}")
        _require(self.alpha is None or (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                                        and self.alpha > 0), "LoraConfig", "alpha",
                 f"must be a positive number or None, got {self.alpha!r}")
        _require(bool(self.targets) and all(isinstance(t, str) and t for t in self.targets), "LoraConfig",
                 "targets", f"must name at least one projection, got {self.targets!r}")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder, optionally fed by an image encoder through a projector (a vision-language model);
    or an image encoder alone."""

    decoder: DecoderConfig | None = None
    tokens: TokensConfig = dataclasses.field(default_factory=TokensConfig)
    vision: VisionConfig | None = None
    image_processing: ImageProcessing | None = None
    projector: str = "linear"
    projector_bias: bool = True
    image_tokens: int | None = None  # tokens per image after the "pooled" projector; None: the encoder's features
    image_token_id: int | None = None  # the placeholder token the image features replace
    # (begin, end) tokens framing each image's placeholders in a "framed_images" prompt (Gemma 3's)
    image_frame: tuple[int, int] | None = None
    max_images: int = 1  # images one prompt may hold
    prefix_lm: bool = False  # full attention over the image + prompt prefix, causal after it (PaliGemma)
    # each image's tokens attend to each other in both directions, within the sliding window (Gemma 3)
    image_blocks: bool = False
    position_offset: int = 0  # PaliGemma numbers positions from 1
    prompt_format: str = "plain"
    head: HeadConfig | None = None  # a classification head instead of the language-model head
    generation: GenerationDefaults | None = None  # the checkpoint's generation_config.json, if it has one
    quantization: QuantizationConfig | None = None  # None: the weights are floats
    lora: LoraConfig | None = None  # adapters held beside their projections (not merged into them)
    model_type: str | None = None  # a vision-language model's Hugging Face family (as DecoderConfig's)

    def __post_init__(self):
        name = "ModelConfig"
        _require(self.head is None or self.decoder is not None, name, "head", "a classification head needs a decoder")
        _require(self.decoder is not None or self.vision is not None, name, "decoder", "needs a decoder or a vision")
        _require(self.projector in PROJECTORS, name, "projector", f"must be one of {PROJECTORS}, got {self.projector!r}")
        _require(self.prompt_format in PROMPT_FORMATS, name, "prompt_format",
                 f"must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        _require(type(self.max_images) is int and self.max_images >= 1, name, "max_images",
                 f"must be a positive int, got {self.max_images!r}")
        if self.is_vlm:
            _require(self.image_token_id is not None, name, "image_token_id", "a vision-language model needs one")
            _require(self.prompt_format != "framed_images" or self.image_frame is not None, name, "image_frame",
                     "a framed_images prompt needs the begin- and end-of-image tokens")
        if self.vision is not None and self.image_processing is not None and self.vision.image_size is None:
            v, grid = self.vision, self.image_processing.patches
            _require(grid is not None and (grid.patch_size, grid.merge_size, grid.temporal_patch_size)
                     == (v.patch_size, v.merge_size, v.temporal_patch_size), name, "image_processing",
                     f"must cut images into the encoder's patches ({v.patch_size} pixels, {v.temporal_patch_size} "
                     f"frames, merged {v.merge_size}x{v.merge_size}), got {grid}")
        elif self.vision is not None and self.image_processing is not None:
            why = self.image_processing.check_encoder(self.vision.image_size)
            _require(why is None, name, "image_processing", str(why))
        _require(self.vision is None or (self.vision.image_size is None) == (self.projector == "merge")
                 or not self.is_vlm, name, "projector",
                 "the merge projector is for images of any size (vision.image_size None), and they need it")
        if self.projector == "pooled" and self.vision is not None:
            side = self.vision.image_size // self.vision.patch_size
            per_side = math.isqrt(self.image_tokens or 0)
            _require(per_side > 0 and per_side ** 2 == self.image_tokens and side % per_side == 0, name,
                     "image_tokens", f"must be a square whose side divides the {side}x{side} patch grid, "
                                     f"got {self.image_tokens!r}")

    @property
    def tokens_per_image(self) -> int | None:
        """P: the placeholder tokens one image takes in a prompt; None where each image's size sets them."""
        if self.vision is None or self.vision.image_size is None:
            return None
        return self.image_tokens if self.projector == "pooled" else self.vision.num_features

    @property
    def is_vlm(self) -> bool:
        return self.decoder is not None and self.vision is not None

    @property
    def computation(self) -> "ModelConfig":
        """This config less what only the host reads (special tokens, prompt format, image processing, the
        labels' names, generation defaults, the families' names): the static argument of the jit-compiled
        functions, so that none of those settings causes a compilation. (Token ids the computation needs,
        such as EOS, are passed as arrays.)"""
        head = None if self.head is None else dataclasses.replace(self.head, labels=("",) * self.head.num_labels)
        unnamed = lambda part: part and dataclasses.replace(part, model_type=None)  # (export reads them)
        return dataclasses.replace(self, tokens=TokensConfig(), image_processing=None, prompt_format="plain",
                                   image_frame=None, max_images=1, head=head, generation=None, model_type=None,
                                   decoder=unnamed(self.decoder), vision=unnamed(self.vision))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object at the top level, got {type(data).__name__}")
        if data.get("prompt_format") in RENAMED_PROMPT_FORMATS:
            data["prompt_format"] = RENAMED_PROMPT_FORMATS[data["prompt_format"]]
        return _from_dict(cls, data, "")

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ModelConfig":
        from jaxvlm.files import inside
        path = inside(directory, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no jaxvlm config (convert a Hugging Face folder with `jaxvlm convert`)")
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        except (TypeError, ValueError) as e:  # JSON, UTF-8 and field errors alike
            raise ValueError(f"{path}: invalid jaxvlm config: {e}") from None


CONFIG_FILE = "config.json"


def _from_dict(cls, data: dict[str, Any], where: str):
    """Rebuilds a config dataclass from JSON, each field checked against its annotation (lists become
    tuples); errors name the field by its dotted path, e.g. `decoder.rope.theta`."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ValueError(f"unknown field {where + key!r}")
        kwargs[key] = _typed(value, hints[key], where + key)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing field {where + missing[0]!r}")
    return cls(**kwargs)


def _typed(value: Any, hint: Any, name: str) -> Any:
    """`value`, read from JSON, as the annotation `hint` asks; a ValueError naming `name` otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and value is not None:
            return _typed(value, options[0], name)
        raise ValueError(f"{name}: expected {_describe(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected an object, got {value!r}")
        return _from_dict(hint, value, name + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{name}: expected {len(args)} entries, got {len(value)}")
        return tuple(_typed(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          str: lambda v: isinstance(v, str)}
    if hint in ok:
        if not ok[hint](value):
            raise ValueError(f"{name}: expected {_describe(hint)}, got {value!r}")
        return float(value) if hint is float else value
    raise TypeError(f"{name}: no JSON reading for {hint}")  # a field type this module does not yet read


def _describe(hint: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if typing.get_origin(hint) is tuple:
        return "a list"
    return names.get(hint, "an object")


def longrope_attention_factor(scale: float, original_max_position: int) -> float:
    """LongRoPE's default cos/sin scale, sqrt(1 + ln(s) / ln(original)), for a context extended s times."""
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original_max_position))
