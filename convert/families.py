"""Each Hugging Face family as one record: what its config.json may leave to transformers' class defaults,
how its fields map onto jaxvlm's behaviours, its tensor table, its tokenizer's BOS default and, for a
vision-language model, how encoder, projector and decoder are wired.

Reading (`convert.hf_config`) and writing (`convert.export`) both go through these records; model code
sees only the behaviours. A family is found by its `model_type` when reading, and the config records it
(`model_type` of the decoder, the encoder and a vision-language model), so that writing finds the same
record (`text_family_of`, `vision_family_of`, `vision_language_family_of`); a config made in code names
none, and writing takes the one family whose behaviours it has.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from convert import tables
from convert.fields import ConfigError, Fields
from jaxvlm.config import DecoderConfig, ModelConfig, MoeConfig, VisionConfig

Window = Callable[[Fields], "int | None"]  # the sliding window config.json asks for, if any
Pattern = Callable[[Fields, int], "tuple[str, ...]"]  # per-layer "local"/"global" when config.json has no layer_types
WindowFields = Callable[[DecoderConfig, "list[bool]"], dict]  # the inverse: config.json's window fields

LAYER_TYPE_NAMES = {"sliding_attention": "local", "full_attention": "global"}


def _refuse(ok: bool, family: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"a {family} checkpoint cannot hold {what}")


def _layer_type_names(local: list[bool]) -> list[str]:
    return ["sliding_attention" if x else "full_attention" for x in local]


@dataclasses.dataclass(frozen=True)
class TextFamily:
    """A decoder family (`model_type` of a causal LM's config.json, or of a VLM's text_config)."""

    model_type: str
    architecture: str  # transformers' class-name stem: `Gemma2` for Gemma2ForCausalLM
    table: tuple[tables.Rule, ...]  # its tensors (convert.tables)
    behaviours: Mapping[str, Any]  # DecoderConfig fields the family fixes (a config made in code is matched by them)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # transformers' class defaults
    numbers: Mapping[str, str] = dataclasses.field(default_factory=dict)  # config.json number -> DecoderConfig field
    window: Window = lambda cfg: cfg.integer("sliding_window", None)
    pattern: Pattern = lambda cfg, depth: ("local",) * depth
    window_fields: WindowFields = lambda d, local: {}
    activation_field: str = "hidden_act"
    attention_bias: bool = True  # whether its config.json can ask for q, k, v and output biases
    legacy_activations: Mapping[str, str] = dataclasses.field(default_factory=dict)  # as transformers reads them
    add_bos: bool = True  # whether its tokenizer starts prompts with BOS unless tokenizer_config.json says
    local_rope: bool = False  # whether its config.json can give local layers a rotary embedding of their own
    # a mixture of experts: how config.json describes it (depth given), and the inverse
    moe: Callable[[Fields, int], MoeConfig] | None = None
    moe_fields: Callable[[MoeConfig, int], dict] | None = None
    requires: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config.json values read as given
    # M-RoPE (Qwen-VL): the default mrope_section where config.json gives none; None for one position stream
    mrope: tuple[int, ...] | None = None
    mrope_interleaved: bool = False  # its streams' frequencies dealt out in turn (Qwen3-VL), not in runs


def _no_window(family: str) -> WindowFields:
    def fields(d: DecoderConfig, local: list[bool]) -> dict:
        _refuse(not any(local), family, "sliding-window attention")
        return {}
    return fields


def _gemma2_window_fields(d: DecoderConfig, local: list[bool]) -> dict:
    return dict(sliding_window=d.sliding_window or d.max_position_embeddings, layer_types=_layer_type_names(local))


def _qwen_window_fields(family: str) -> WindowFields:
    """Qwen2's and Qwen3's window applies from `max_window_layers` on."""
    def fields(d: DecoderConfig, local: list[bool]) -> dict:
        first = local.index(True) if any(local) else d.depth
        _refuse(all(local[first:]), family, "sliding windows on layers that are not the last ones")
        return dict(use_sliding_window=any(local), sliding_window=d.sliding_window, max_window_layers=first,
                    layer_types=_layer_type_names(local))
    return fields


def _every_layer_window_fields(family: str) -> WindowFields:
    """Phi-3's and Mistral's window is every layer's, or none's."""
    def fields(d: DecoderConfig, local: list[bool]) -> dict:
        _refuse(all(local) or not any(local), family, "sliding windows on some layers only")
        return dict(sliding_window=d.sliding_window if any(local) else None)
    return fields


def _qwen3_window(cfg: Fields) -> int | None:
    return cfg.integer("sliding_window", None) if cfg.flag("use_sliding_window", False) else None


def _mistral_window(cfg: Fields) -> int | None:
    """A null sliding_window is none (as transformers keeps it); a missing one the class default."""
    return None if "sliding_window" in cfg.data and cfg.data["sliding_window"] is None else \
        cfg.integer("sliding_window", None)


def _qwen3_pattern(cfg: Fields, depth: int) -> tuple[str, ...]:
    return tuple("local" if i >= cfg.integer("max_window_layers", 28) else "global" for i in range(depth))


def _qwen3_moe(cfg: Fields, depth: int) -> MoeConfig:
    """Experts in every `decoder_sparse_step`-th layer but those `mlp_only_layers` lists."""
    experts = cfg.integer("num_local_experts", None) or cfg.integer("num_experts")
    dense, step = set(cfg.integers("mlp_only_layers")), cfg.integer("decoder_sparse_step")
    layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(depth))
    top_k = cfg.integer("num_experts_per_tok")
    if not 0 < top_k <= experts:
        cfg.fail("num_experts_per_tok", f"between 1 and num_experts={experts}", top_k)
    return MoeConfig(num_experts=experts, top_k=top_k,
                     mlp_dim=cfg.integer("moe_intermediate_size"), normalize_weights=cfg.flag("norm_topk_prob"),
                     layers=() if all(layers) else layers)


def _qwen3_moe_fields(m: MoeConfig, depth: int) -> dict:
    layers = m.layers or (True,) * depth
    return dict(num_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.mlp_dim,
                norm_topk_prob=m.normalize_weights, decoder_sparse_step=1,
                mlp_only_layers=[i for i, moe in enumerate(layers) if not moe])


_GEMMA_DEFAULTS = dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10_000.0,
                       tie_word_embeddings=True)
_NORMS = ("norm_scale_offset", "embed_scale", "use_post_norms", "use_qk_norm")
_GEMMA = dict(zip(_NORMS, (1.0, True, False, False)))  # (1 + w) norms and a sqrt(width) embedding scale
_LLAMA = dict(zip(_NORMS, (0.0, False, False, False)))
# the query scale and soft-caps Gemma 2's and Gemma 3's config.json set (Gemma 3's caps default to none)
_GEMMA2_NUMBERS = dict(query_pre_attn_scalar="query_pre_attn_scalar", attn_logit_softcapping="attn_logit_softcap",
                       final_logit_softcapping="final_logit_softcap")
_t = tables
_DECODER = _t.EMBEDDING + _t.ATTN_OUT + _t.MLP_DOWN
_PLAIN_DECODER = tuple(_DECODER + _t.SEPARATE_QKV + _t.SEPARATE_MLP + _t.PRE_NORMS)  # Llama's names

TEXT_FAMILIES: dict[str, TextFamily] = {f.model_type: f for f in [
    TextFamily("gemma", "Gemma", tuple(_DECODER + _t.SEPARATE_QKV + _t.SEPARATE_MLP + _t.PRE_NORMS),
               behaviours=_GEMMA, defaults=_GEMMA_DEFAULTS, window=lambda cfg: None, window_fields=_no_window("gemma"),
               activation_field="hidden_activation",
               # Gemma's legacy "gelu" means the tanh approximation (as transformers reads it)
               legacy_activations={"gelu": "gelu_pytorch_tanh"}),
    TextFamily("gemma2", "Gemma2", tuple(_DECODER + _t.SEPARATE_QKV + _t.SEPARATE_MLP + _t.SANDWICH_NORMS),
               behaviours=dict(_GEMMA, use_post_norms=True),
               defaults=dict(_GEMMA_DEFAULTS, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                             final_logit_softcapping=30.0, sliding_window=4096),
               numbers=_GEMMA2_NUMBERS,
               pattern=lambda cfg, depth: tuple("local" if i % 2 == 0 else "global" for i in range(depth)),
               window_fields=_gemma2_window_fields, activation_field="hidden_activation"),
    # Gemma 3: Gemma 2's layer with q/k norms, five local layers to a global one, each kind with its own
    # rotary embedding (the global one linearly scaled in the larger models), no soft-capping
    TextFamily("gemma3_text", "Gemma3", tuple(_DECODER + _t.SEPARATE_QKV + _t.QK_NORM + _t.SEPARATE_MLP
                                              + _t.SANDWICH_NORMS),
               behaviours=dict(_GEMMA, use_post_norms=True, use_qk_norm=True),
               defaults=dict(_GEMMA_DEFAULTS, query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1_000_000.0,
                             rope_local_base_freq=10_000.0, vocab_size=262_208, hidden_size=2304,
                             intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                             num_key_value_heads=4, max_position_embeddings=131_072),
               numbers=_GEMMA2_NUMBERS,
               pattern=lambda cfg, depth: tuple("global" if (i + 1) % cfg.integer("sliding_window_pattern", 6) == 0
                                                else "local" for i in range(depth)),
               window_fields=_gemma2_window_fields, activation_field="hidden_activation", local_rope=True,
               # EmbeddingGemma's encoder attends both ways, with another window
               requires=dict(use_bidirectional_attention=False)),
    TextFamily("phi3", "Phi3", tuple(_DECODER + _t.FUSED_QKV + _t.FUSED_MLP + _t.PRE_NORMS),
               behaviours=_LLAMA, defaults=dict(hidden_act="silu", rms_norm_eps=1e-5),
               window_fields=_every_layer_window_fields("phi3"), attention_bias=False),
    TextFamily("qwen3_moe", "Qwen3Moe", tuple(_t.EMBEDDING + _t.ATTN_OUT + _t.SEPARATE_QKV + _t.QK_NORM + _t.MOE_MLP
                                              + _t.PRE_NORMS),
               behaviours=dict(_LLAMA, use_qk_norm=True),
               defaults=dict(hidden_act="silu", rms_norm_eps=1e-6, num_experts=128, num_experts_per_tok=8,
                             moe_intermediate_size=768, norm_topk_prob=False, decoder_sparse_step=1),
               window=_qwen3_window, pattern=_qwen3_pattern, window_fields=_qwen_window_fields("qwen3_moe"),
               add_bos=False, moe=_qwen3_moe, moe_fields=_qwen3_moe_fields),
    TextFamily("qwen3", "Qwen3", tuple(_DECODER + _t.SEPARATE_QKV + _t.QK_NORM + _t.SEPARATE_MLP + _t.PRE_NORMS),
               behaviours=dict(_LLAMA, use_qk_norm=True), defaults=dict(hidden_act="silu", rms_norm_eps=1e-6),
               window=_qwen3_window, pattern=_qwen3_pattern, window_fields=_qwen_window_fields("qwen3"), add_bos=False),
    # Llama 1, 2 and 3 (Llama 3's "llama3" rope scaling is read with the other rope types)
    TextFamily("llama", "Llama", _PLAIN_DECODER, behaviours=_LLAMA,
               defaults=dict(hidden_act="silu", rms_norm_eps=1e-6, vocab_size=32000, hidden_size=4096,
                             intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             max_position_embeddings=2048),
               window=lambda cfg: None, window_fields=_no_window("llama"), requires=dict(mlp_bias=False)),
    # Mistral: Llama's layer with a sliding window on every layer (none when config.json's is null)
    TextFamily("mistral", "Mistral", _PLAIN_DECODER, behaviours=_LLAMA,
               defaults=dict(hidden_act="silu", rms_norm_eps=1e-6, sliding_window=4096, vocab_size=32000,
                             hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, max_position_embeddings=131072),
               window=_mistral_window, window_fields=_every_layer_window_fields("mistral"), attention_bias=False),
    # Qwen2 and Qwen2.5: biases on q, k and v (never on the output), Qwen3's window fields
    TextFamily("qwen2", "Qwen2", _PLAIN_DECODER, behaviours=dict(_LLAMA, qkv_bias=True, out_bias=False),
               defaults=dict(hidden_act="silu", rms_norm_eps=1e-6, vocab_size=151936, hidden_size=4096,
                             intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                             max_position_embeddings=32768, max_window_layers=28),
               window=_qwen3_window, pattern=_qwen3_pattern, window_fields=_qwen_window_fields("qwen2"), add_bos=False),
    # Qwen2.5-VL's decoder: Qwen2's, its rotary embedding turned by three position streams (M-RoPE)
    TextFamily("qwen2_5_vl_text", "Qwen2_5_VL", _PLAIN_DECODER, behaviours=dict(_LLAMA, qkv_bias=True, out_bias=False),
               defaults=dict(hidden_act="silu", rms_norm_eps=1e-5, vocab_size=152064, hidden_size=8192,
                             intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                             num_key_value_heads=8, max_position_embeddings=32768, max_window_layers=80,
                             rope_theta=1_000_000.0),
               window=_qwen3_window, pattern=_qwen3_pattern, window_fields=_qwen_window_fields("qwen2_5_vl_text"),
               add_bos=False, mrope=(16, 24, 24)),
    # Qwen3-VL's decoder: Qwen3's, with M-RoPE's streams interleaved (and DeepStack's additions, which the
    # vision-language model makes)
    TextFamily("qwen3_vl_text", "Qwen3VL", tuple(_DECODER + _t.SEPARATE_QKV + _t.QK_NORM + _t.SEPARATE_MLP
                                                 + _t.PRE_NORMS),
               behaviours=dict(_LLAMA, use_qk_norm=True),
               defaults=dict(hidden_act="silu", rms_norm_eps=1e-6, vocab_size=151936, hidden_size=4096,
                             intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, head_dim=128, max_position_embeddings=128000,
                             rope_theta=500_000.0),
               window=lambda cfg: None, window_fields=_no_window("qwen3_vl_text"), add_bos=False,
               mrope=(24, 20, 20), mrope_interleaved=True),
]}


def _recorded(field: str, noun: str, families: Mapping[str, Any], model_type: str | None, fits, what: str):
    """The family `model_type` names (the config's `field`), its fixed behaviours checked by `fits`; for a
    config made in code (no model_type), the one family that fits: none or several is an error."""
    if model_type is None:
        found = [f for f in families.values() if fits(f)]
        if not found:
            raise ConfigError(f"no Hugging Face family has this {noun}'s {what}")
        if len(found) > 1:
            raise ConfigError(f"this {noun}'s {what} fit several Hugging Face families "
                              f"({', '.join(f.model_type for f in found)}): set {field} to one")
        return found[0]
    if model_type not in families:
        raise ConfigError(f"{field} {model_type!r}: no such Hugging Face family (known: {', '.join(families)})")
    family = families[model_type]
    _refuse(fits(family), getattr(family, "name", family.model_type), f"this {noun}'s {what}")
    return family


def text_family_of(d: DecoderConfig) -> TextFamily:
    """The family the decoder was read as (`model_type`), or for a config made in code the one family whose
    fixed behaviours it has (with experts or without); its behaviours must be the family's."""
    fits = lambda family: (all(getattr(d, k) == v for k, v in family.behaviours.items())
                           and (family.moe is None) == (d.moe is None)
                           and (family.mrope is None) == (d.rope.mrope_section is None))
    shown = ", ".join(f"{k}={getattr(d, k)}" for k in _NORMS)
    what = f"norms and embedding scale ({shown}, experts: {d.moe is not None}, M-RoPE: {d.rope.mrope_section})"
    return _recorded("decoder.model_type", "decoder", TEXT_FAMILIES, d.model_type, fits, what)


@dataclasses.dataclass(frozen=True)
class VisionFamily:
    """An image encoder family (`model_type` of a standalone encoder's config.json, or of a VLM's vision_config)."""

    model_type: str
    name: str  # as errors name it
    table: tuple[tables.Rule, ...]  # its tensors (convert.tables)
    behaviours: Mapping[str, Any]  # VisionConfig fields the family fixes
    defaults: Mapping[str, Any]
    # the image processor it comes with: "siglip" (a square), "clip" (shortest edge, crop) or "patches"
    # (any size, cut into patches: Qwen-VL's)
    processor: str
    attention_pool: Callable[[Fields], bool]  # whether a standalone encoder has a pooling head
    architecture: Callable[[VisionConfig], str]  # a standalone encoder's transformers class
    # config.json (its defaults filled in) -> the VisionConfig fields it sets (`activation` as config.json
    # names it)
    read: Callable[[Fields], dict] = lambda cfg: _vit_fields(cfg)
    write: Callable[[VisionConfig], dict] = lambda v: _vit_write(v)  # the inverse (but model_type, hidden_act)
    standalone: bool = True  # whether a config.json of the encoder alone is read


def _vit_fields(cfg: Fields) -> dict:
    return dict(image_size=cfg.integer("image_size"), patch_size=cfg.integer("patch_size"),
                width=cfg.integer("hidden_size"), depth=cfg.integer("num_hidden_layers"),
                num_heads=cfg.integer("num_attention_heads"), mlp_dim=cfg.integer("intermediate_size"),
                activation=cfg.text("hidden_act"), norm_eps=cfg.number("layer_norm_eps"))


def _vit_write(v: VisionConfig) -> dict:
    out = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
               num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
               layer_norm_eps=v.norm_eps, num_channels=3)
    if v.projection_dim is not None:
        out["projection_dim"] = v.projection_dim
    if not v.class_token:  # SigLIP says whether it has its attention-pool head
        out["vision_use_head"] = v.attention_pool
    return out


def _qwen_vision_fields(cfg: Fields) -> dict:
    """Qwen2.5-VL's encoder: its window in pixels becomes merged patches (rounded down, as transformers
    does); full-attention layer indices past its depth are dropped, as transformers never reaches them."""
    patch, merge, depth = cfg.integer("patch_size"), cfg.integer("spatial_merge_size"), cfg.integer("depth")
    window = cfg.integer("window_size") // merge // patch
    if window <= 0:
        cfg.fail("window_size", f"at least one merged patch ({merge * patch} pixels)", cfg.integer("window_size"))
    full = cfg.integers("fullatt_block_indexes")
    rope = cfg.sub("rope_parameters", {})
    return dict(patch_size=patch, width=cfg.integer("hidden_size"), depth=depth,
                num_heads=cfg.integer("num_heads"), mlp_dim=cfg.integer("intermediate_size"),
                activation=cfg.text("hidden_act"), norm_eps=1e-6, rope_theta=rope.number("rope_theta", 10_000.0),
                temporal_patch_size=cfg.integer("temporal_patch_size"), merge_size=merge, window=window,
                full_attention_layers=tuple(i for i in full if 0 <= i < depth))


def _qwen3_vision_fields(cfg: Fields) -> dict:
    """Qwen3-VL's encoder: its learned positions a square grid (`num_position_embeddings` a square)."""
    positions = cfg.integer("num_position_embeddings")
    side = math.isqrt(positions)
    if side * side != positions:
        cfg.fail("num_position_embeddings", "a square (the learned positions' grid)", positions)
    depth = cfg.integer("depth")
    rope = cfg.sub("rope_parameters", {})
    return dict(patch_size=cfg.integer("patch_size"), width=cfg.integer("hidden_size"),
                depth=depth, num_heads=cfg.integer("num_heads"), mlp_dim=cfg.integer("intermediate_size"),
                activation=cfg.text("hidden_act"), norm_eps=1e-6, rope_theta=rope.number("rope_theta", 10_000.0),
                temporal_patch_size=cfg.integer("temporal_patch_size"), merge_size=cfg.integer("spatial_merge_size"),
                position_grid=side, deepstack_layers=tuple(cfg.integers("deepstack_visual_indexes")))


def _qwen3_vision_write(v: VisionConfig) -> dict:
    return dict(depth=v.depth, hidden_size=v.width, num_heads=v.num_heads, intermediate_size=v.mlp_dim,
                patch_size=v.patch_size, spatial_merge_size=v.merge_size, temporal_patch_size=v.temporal_patch_size,
                num_position_embeddings=v.position_grid ** 2, deepstack_visual_indexes=list(v.deepstack_layers),
                rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta))


def _qwen_vision_write(v: VisionConfig) -> dict:
    return dict(depth=v.depth, hidden_size=v.width, num_heads=v.num_heads, intermediate_size=v.mlp_dim,
                patch_size=v.patch_size, spatial_merge_size=v.merge_size,
                temporal_patch_size=v.temporal_patch_size, window_size=v.window * v.merge_size * v.patch_size,
                fullatt_block_indexes=list(v.full_attention_layers),
                rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta))


_VIT_DEFAULTS = dict(image_size=224, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12)
VISION_FAMILIES: dict[str, VisionFamily] = {f.model_type: f for f in [
    VisionFamily("siglip_vision_model", "SigLIP", tuple(tables.SIGLIP_VISION),
                 behaviours=dict(patch_bias=True, class_token=False, pre_norm=False, post_norm_class_only=False,
                                 rope_theta=None),
                 defaults=dict(_VIT_DEFAULTS, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
                 processor="siglip", attention_pool=lambda cfg: cfg.flag("vision_use_head", True),
                 architecture=lambda v: "SiglipVisionModel"),
    VisionFamily("clip_vision_model", "CLIP", tuple(tables.CLIP_VISION),
                 behaviours=dict(patch_bias=False, class_token=True, pre_norm=True, post_norm_class_only=True,
                                 rope_theta=None),
                 defaults=dict(_VIT_DEFAULTS, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
                 processor="clip", attention_pool=lambda cfg: False,
                 architecture=lambda v: "CLIPVisionModelWithProjection" if v.projection_dim is not None
                 else "CLIPVisionModel"),
    # Qwen2.5-VL's: images of any size as patches, a 2-D rotary embedding, RMSNorms, a gated MLP, windows
    VisionFamily("qwen2_5_vl_vision", "Qwen2.5-VL", tuple(tables.QWEN_VISION),
                 behaviours=dict(image_size=None, patch_bias=False, class_token=False, norm="rms", gated_mlp=True),
                 defaults=dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
                 processor="patches", attention_pool=lambda cfg: False, architecture=lambda v: "",
                 read=_qwen_vision_fields, write=_qwen_vision_write, standalone=False),
    # Qwen3-VL's: LayerNorms, a plain MLP, no windows, learned positions resampled, DeepStack's inner layers
    VisionFamily("qwen3_vl_vision", "Qwen3-VL", tuple(tables.QWEN3_VISION),
                 behaviours=dict(image_size=None, patch_bias=True, class_token=False, norm="layer", gated_mlp=False),
                 defaults=dict(depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304,
                               num_heads=16, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                               out_hidden_size=3584, num_position_embeddings=2304,
                               deepstack_visual_indexes=[8, 16, 24]),
                 processor="patches", attention_pool=lambda cfg: False, architecture=lambda v: "",
                 read=_qwen3_vision_fields, write=_qwen3_vision_write, standalone=False),
]}


def vision_family_of(v: VisionConfig) -> VisionFamily:
    """The family the encoder was read as (`model_type`), or for a config made in code the one whose fixed
    behaviours it has; its behaviours must be the family's."""
    fits = lambda family: all(getattr(v, k) == x for k, x in family.behaviours.items())
    return _recorded("vision.model_type", "encoder", VISION_FAMILIES, v.model_type, fits,
                     "class token, norms and biases")


def tensor_rules(config: ModelConfig) -> dict[str, tables.BoundRule]:
    """Every tensor a model's checkpoint holds (canonical names, `convert.tables`): its families' tables
    bound to its config, with its projector and head."""
    decoder = None if config.decoder is None else text_family_of(config.decoder).table
    vision = None if config.vision is None else vision_family_of(config.vision).table
    projector = vision_language_family_of(config).projector_table if config.is_vlm else None
    return tables.expand(config, decoder, vision, projector)


@dataclasses.dataclass(frozen=True)
class VisionLanguageFamily:
    """How a vision-language config.json wires an encoder, a projector and a decoder."""

    model_type: str
    architecture: str
    wiring: Mapping[str, Any]  # ModelConfig fields the family fixes (a config made in code is matched by them)
    default_text_type: str  # text_config's model_type when it has none
    default_vision_type: str  # vision_config's model_type when it has none
    default_image_token: int
    # (config.json, vision(**composition) -> the VisionConfig) -> (the VisionConfig, ModelConfig fields it reads)
    read: Callable[[Fields, Callable[..., VisionConfig]], tuple[VisionConfig, dict]]
    write: Callable[[ModelConfig], dict]  # its own config.json fields
    text_types: tuple[str, ...] | None = None  # the decoders it can hold (None: any)
    # its image processor: preprocessor_config.json defaults where they differ from the encoder's processor's,
    # and the class named when export writes that file (None: the encoder's processor)
    image_processor: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    image_processor_type: str | None = None
    # what export writes for transformers' AutoProcessor: (processor_config.json, preprocessor_config.json
    # fields beyond the image processing) for a config
    processor: Callable[[ModelConfig], tuple[dict, dict]] = lambda config: ({}, {})
    # its projectors' tensors (None: the table of its projector kind, `tables.PROJECTORS`)
    projector_table: Callable[[ModelConfig], list] | None = None
    # canonical tensor name prefixes (convert.tables) -> those export writes, which transformers reads
    file_names: tuple[tuple[str, str], ...] = (("model.", "language_model.model."),
                                               ("lm_head.", "language_model.lm_head."))


def _paligemma_read(cfg: Fields, vision: Callable[..., VisionConfig]) -> tuple[VisionConfig, dict]:
    return vision(), {}


def _paligemma_write(config: ModelConfig) -> dict:
    return dict(hidden_size=config.decoder.width, projection_dim=config.decoder.width)


def _llava_read(cfg: Fields, vision: Callable[..., VisionConfig]) -> tuple[VisionConfig, dict]:
    strategy = cfg.text("vision_feature_select_strategy", "default")
    layer = cfg.raw("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise ConfigError(f"{cfg.path}: vision_feature_layer {layer!r}: only a single layer is supported")
    layer = cfg.integer("vision_feature_layer", -2)
    if strategy not in ("default", "full"):
        raise ConfigError(f"{cfg.path}: unsupported vision_feature_select_strategy {strategy!r}")
    act = cfg.text("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"{cfg.path}: unsupported projector_hidden_act {act!r} (supported: gelu)")
    v = vision(feature_layer=layer, keep_class_token=strategy == "full")
    seq = cfg.integer("image_seq_length", None)
    if seq is not None and seq != v.num_features:
        raise ConfigError(f"{cfg.path}: image_seq_length {seq} but the vision tower gives "
                          f"{v.num_features} features per image")
    return v, dict(projector_bias=cfg.flag("multimodal_projector_bias", True))


def _llava_write(config: ModelConfig) -> dict:
    v = config.vision
    return {"vision_feature_layer": v.feature_layer if v.feature_layer is not None else -1,
            "vision_feature_select_strategy": "full" if v.keep_class_token else "default",
            "projector_hidden_act": "gelu", "multimodal_projector_bias": config.projector_bias,
            "image_seq_length": v.num_features}


# Images a Gemma 3 prompt may hold, pan-and-scan crops included (transformers sets no limit; each image is a
# [896, 896] encoder pass and `mm_tokens_per_image` tokens of context). Change `ModelConfig.max_images` to
# take more.
GEMMA3_MAX_IMAGES = 8


def _gemma3_read(cfg: Fields, vision: Callable[..., VisionConfig]) -> tuple[VisionConfig, dict]:
    frame = (cfg.token_id("boi_token_index", 255_999), cfg.token_id("eoi_token_index", 256_000))
    return vision(), dict(image_tokens=cfg.integer("mm_tokens_per_image", 256), image_frame=frame,
                          max_images=GEMMA3_MAX_IMAGES)


def _gemma3_write(config: ModelConfig) -> dict:
    return dict(mm_tokens_per_image=config.image_tokens, boi_token_index=config.image_frame[0],
                eoi_token_index=config.image_frame[1])


# Images a Qwen-VL prompt may hold (transformers sets no limit; each costs its patches in the encoder and a
# token a merged square of them in the context). Change `ModelConfig.max_images` to take more.
QWEN_VL_MAX_IMAGES = 8


def _qwen_vl_read(cfg: Fields, vision: Callable[..., VisionConfig]) -> tuple[VisionConfig, dict]:
    """The merger's output must be the decoder's width, where config.json gives both (its text fields sit
    at its top level in the hub's Qwen2.5-VL files, in text_config in transformers 5's)."""
    v = vision()
    fields = cfg.sub("vision_config", {})
    text = cfg.sub("text_config") if cfg.has("text_config") else cfg
    out, width = fields.integer("out_hidden_size", None), text.integer("hidden_size", None)
    if None not in (out, width) and out != width:
        fields.fail("out_hidden_size", f"the decoder's hidden_size {width} (the merged tokens enter it)", out)
    return v, dict(max_images=QWEN_VL_MAX_IMAGES)


def _qwen_vl_write(config: ModelConfig) -> dict:
    return dict(image_token_id=config.image_token_id, vision_config=dict(out_hidden_size=config.decoder.width))


# Qwen2.5-VL: images of any size, each at its marker as one token a merged square of patches; M-RoPE. (Its
# hub files' tensor names are the canonical ones: model.layers.*, visual.*, lm_head.*.) Qwen3-VL: its
# wiring, 16-pixel patches normalised to [-1, 1], DeepStack's mergers, transformers 5's tensor names.
_QWEN2_5_VL = VisionLanguageFamily(
    "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
    wiring=dict(projector="merge", prefix_lm=False, position_offset=0, prompt_format="sized_images"),
    default_text_type="qwen2_5_vl_text", default_vision_type="qwen2_5_vl_vision", default_image_token=151_655,
    read=_qwen_vl_read, write=_qwen_vl_write, text_types=("qwen2_5_vl_text",),
    image_processor_type="Qwen2VLImageProcessor", processor=lambda c: ({"processor_class": "Qwen2_5_VLProcessor"}, {}),
    file_names=())

VISION_LANGUAGE_FAMILIES: dict[str, VisionLanguageFamily] = {f.model_type: f for f in [
    # PaliGemma: the image tokens and the prompt are one prefix with full attention; positions from 1
    VisionLanguageFamily("paligemma", "PaliGemmaForConditionalGeneration",
                         wiring=dict(projector="linear", prefix_lm=True, position_offset=1,
                                     prompt_format="images_first"),
                         default_text_type="gemma", default_vision_type="siglip_vision_model",
                         default_image_token=256000, read=_paligemma_read, write=_paligemma_write,
                         text_types=("gemma", "gemma2"),
                         processor=lambda c: ({"processor_class": "PaliGemmaProcessor"},
                                              {"image_seq_length": c.tokens_per_image})),
    VisionLanguageFamily("llava", "LlavaForConditionalGeneration",
                         wiring=dict(projector="mlp", prefix_lm=False, position_offset=0,
                                     prompt_format="image_marker"),
                         default_text_type="llama", default_vision_type="clip_vision_model",
                         default_image_token=32000, read=_llava_read, write=_llava_write,
                         processor=lambda c: ({"processor_class": "LlavaProcessor", "patch_size": c.vision.patch_size,
                                               "vision_feature_select_strategy":
                                                   "full" if c.vision.keep_class_token else "default",
                                               "num_additional_image_tokens": int(c.vision.class_token)}, {})),
    # Gemma 3: SigLIP's patch grid pooled to a few tokens per image, several images a prompt, each framed by
    # begin/end-of-image tokens and attending to itself in both directions; bilinear resizing, pan and scan
    VisionLanguageFamily("gemma3", "Gemma3ForConditionalGeneration",
                         wiring=dict(projector="pooled", prefix_lm=False, position_offset=0,
                                     prompt_format="framed_images", image_blocks=True),
                         default_text_type="gemma3_text", default_vision_type="siglip_vision_model",
                         default_image_token=262_144, read=_gemma3_read, write=_gemma3_write,
                         text_types=("gemma3_text",), image_processor=dict(resample=2),
                         image_processor_type="Gemma3ImageProcessor",
                         processor=lambda c: ({"processor_class": "Gemma3Processor",
                                               "image_seq_length": c.tokens_per_image}, {})),
    _QWEN2_5_VL,
    dataclasses.replace(_QWEN2_5_VL, model_type="qwen3_vl", architecture="Qwen3VLForConditionalGeneration",
                        default_text_type="qwen3_vl_text", default_vision_type="qwen3_vl_vision",
                        text_types=("qwen3_vl_text",),
                        image_processor=dict(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3),
                        processor=lambda c: ({"processor_class": "Qwen3VLProcessor"}, {}),
                        projector_table=tables.QWEN3_MERGERS,
                        file_names=(("model.", "model.language_model."), ("visual.", "model.visual."))),
]}


def vision_language_family_of(config: ModelConfig) -> VisionLanguageFamily:
    """The family the model was read as (`model_type`), or for a config made in code the one whose wiring
    it has; its wiring must be the family's."""
    fits = lambda family: all(getattr(config, k) == v for k, v in family.wiring.items())
    wiring = dict.fromkeys(k for family in VISION_LANGUAGE_FAMILIES.values() for k in family.wiring)
    what = f"wiring of encoder, projector and decoder ({', '.join(f'{k}={getattr(config, k)!r}' for k in wiring)})"
    return _recorded("model_type", "model", VISION_LANGUAGE_FAMILIES, config.model_type, fits, what)
