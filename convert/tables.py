"""Declarative maps from Hugging Face tensor names to jaxvlm param paths.

Each `Rule` names a source tensor (`{i}` stands for the layer index, `{e}` for an expert's), the shape
the config predicts for it (torch layout), and where its pieces go in the jaxvlm tree with a pure
re-layout (transpose, reshape, split): no arithmetic is folded into weights, so stored values stay
bit-identical. A target path ending in `[{e}]` is one slice of a stacked [E, ...] param (an expert's
weights, stored one tensor per expert in Hugging Face files).

A table covers one part of a model and reads one part of the config: the decoder tables take a
`DecoderConfig` (each family's record in `convert.families` lists its pieces), the vision table a
`VisionConfig`, the projector tables the whole `ModelConfig`.
Names are canonical: `canonical_name` first maps each layout found in the wild onto them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from jaxvlm.config import DecoderConfig, ModelConfig

Config = Any  # the part of the ModelConfig a table reads
Shape = Callable[[Config], tuple[int, ...]]
Transform = Callable[[np.ndarray, Config], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    shape: Shape  # the torch shape the config predicts
    targets: tuple[tuple[str, Transform], ...]  # (jaxvlm path, re-layout)
    when: Callable[[Config], bool] = lambda c: True
    layers: Callable[[Config, int], bool] = lambda c, i: True  # the layers that have it (for `{i}` rules)


@dataclasses.dataclass(frozen=True)
class BoundRule:
    """A rule for one tensor, with its config applied: a shape and functions of the tensor alone."""

    source: str
    shape: tuple[int, ...]
    targets: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...]


# --- re-layouts: torch Linear weights are [out, in]; jaxvlm einsum kernels put the input first ----------
def keep(w, c):
    return w


def to_heads(heads: Callable[[DecoderConfig], int]) -> Transform:
    """[heads * H, D] -> [D, heads, H] (q, k, v projections)."""
    return lambda w, c: w.T.reshape(c.width, heads(c), c.head_dim)


def bias_to_heads(heads: Callable[[DecoderConfig], int]) -> Transform:
    return lambda w, c: w.reshape(heads(c), c.head_dim)


def from_heads(w, c):
    """[D, N * H] -> [N, H, D] (output projection)."""
    return w.T.reshape(c.num_heads, c.head_dim, c.width)


def transpose(w, c):
    return w.T


def rows(start: Callable[[DecoderConfig], int], stop: Callable[[DecoderConfig], int], then: Transform) -> Transform:
    """Takes rows start:stop of a fused torch weight (the output dim), then re-lays them out."""
    return lambda w, c: then(w[start(c):stop(c)], c)


N = lambda c: c.num_heads
K = lambda c: c.num_kv_heads
D = lambda c: c.width
F = lambda c: c.mlp_dim
QH = lambda c: c.num_heads * c.head_dim  # rows of q in a fused projection
KH = lambda c: c.num_kv_heads * c.head_dim
ZERO = lambda c: 0

LAYER = "model.layers.{i}."
OUT = "decoder/layer_{i}/"


def norm(source: str, target: str, when=lambda c: True) -> Rule:
    return Rule(source, lambda c: (c.width,), ((target + "/scale", keep),), when)


EMBEDDING = [
    Rule("model.embed_tokens.weight", lambda c: (c.vocab_size, c.width), (("decoder/embedder/embedding", keep),)),
    norm("model.norm.weight", "decoder/final_norm"),
    Rule("lm_head.weight", lambda c: (c.vocab_size, c.width), (("decoder/lm_head/kernel", transpose),),
         when=lambda c: not c.tie_embeddings),
]

SEPARATE_QKV = [
    Rule(LAYER + "self_attn.q_proj.weight", lambda c: (QH(c), c.width), ((OUT + "attn/q/kernel", to_heads(N)),)),
    Rule(LAYER + "self_attn.k_proj.weight", lambda c: (KH(c), c.width), ((OUT + "attn/k/kernel", to_heads(K)),)),
    Rule(LAYER + "self_attn.v_proj.weight", lambda c: (KH(c), c.width), ((OUT + "attn/v/kernel", to_heads(K)),)),
    Rule(LAYER + "self_attn.q_proj.bias", lambda c: (QH(c),), ((OUT + "attn/q/bias", bias_to_heads(N)),),
         when=lambda c: c.qkv_bias),
    Rule(LAYER + "self_attn.k_proj.bias", lambda c: (KH(c),), ((OUT + "attn/k/bias", bias_to_heads(K)),),
         when=lambda c: c.qkv_bias),
    Rule(LAYER + "self_attn.v_proj.bias", lambda c: (KH(c),), ((OUT + "attn/v/bias", bias_to_heads(K)),),
         when=lambda c: c.qkv_bias),
]

# Phi-3 fuses q, k, v into one projection, rows ordered [q | k | v].
FUSED_QKV = [
    Rule(LAYER + "self_attn.qkv_proj.weight", lambda c: (QH(c) + 2 * KH(c), c.width), (
        (OUT + "attn/q/kernel", rows(ZERO, QH, to_heads(N))),
        (OUT + "attn/k/kernel", rows(QH, lambda c: QH(c) + KH(c), to_heads(K))),
        (OUT + "attn/v/kernel", rows(lambda c: QH(c) + KH(c), lambda c: QH(c) + 2 * KH(c), to_heads(K))),
    )),
]

ATTN_OUT = [
    Rule(LAYER + "self_attn.o_proj.weight", lambda c: (c.width, QH(c)), ((OUT + "attn/o/kernel", from_heads),)),
    Rule(LAYER + "self_attn.o_proj.bias", lambda c: (c.width,), ((OUT + "attn/o/bias", keep),),
         when=lambda c: c.out_bias),
]

QK_NORM = [
    Rule(LAYER + "self_attn.q_norm.weight", lambda c: (c.head_dim,), ((OUT + "attn/q_norm/scale", keep),)),
    Rule(LAYER + "self_attn.k_norm.weight", lambda c: (c.head_dim,), ((OUT + "attn/k_norm/scale", keep),)),
]

SEPARATE_MLP = [
    Rule(LAYER + "mlp.gate_proj.weight", lambda c: (c.mlp_dim, c.width), ((OUT + "mlp/gate/kernel", transpose),)),
    Rule(LAYER + "mlp.up_proj.weight", lambda c: (c.mlp_dim, c.width), ((OUT + "mlp/up/kernel", transpose),)),
]

# Phi-3 fuses gate and up, gate first.
FUSED_MLP = [
    Rule(LAYER + "mlp.gate_up_proj.weight", lambda c: (2 * c.mlp_dim, c.width), (
        (OUT + "mlp/gate/kernel", rows(ZERO, F, transpose)),
        (OUT + "mlp/up/kernel", rows(F, lambda c: 2 * c.mlp_dim, transpose)),
    )),
]

MLP_DOWN = [
    Rule(LAYER + "mlp.down_proj.weight", lambda c: (c.width, c.mlp_dim), ((OUT + "mlp/down/kernel", transpose),)),
]

# Qwen3-MoE: in the layers `config.moe` names, a router and one gated MLP per expert (stacked [E, ...]
# in jaxvlm); the other layers keep the dense MLP.
EXPERT = LAYER + "mlp.experts.{e}."
MOE_LAYER = lambda c, i: c.is_moe(i)
DENSE_LAYER = lambda c, i: not c.is_moe(i)
E_ = lambda c: c.moe.num_experts
FE = lambda c: c.moe.mlp_dim
MOE_MLP = [
    Rule(LAYER + "mlp.gate.weight", lambda c: (E_(c), c.width), ((OUT + "mlp/router/kernel", transpose),),
         layers=MOE_LAYER),
    Rule(EXPERT + "gate_proj.weight", lambda c: (FE(c), c.width), ((OUT + "mlp/gate[{e}]", transpose),),
         layers=MOE_LAYER),
    Rule(EXPERT + "up_proj.weight", lambda c: (FE(c), c.width), ((OUT + "mlp/up[{e}]", transpose),), layers=MOE_LAYER),
    Rule(EXPERT + "down_proj.weight", lambda c: (c.width, FE(c)), ((OUT + "mlp/down[{e}]", transpose),),
         layers=MOE_LAYER),
] + [dataclasses.replace(rule, layers=DENSE_LAYER) for rule in SEPARATE_MLP + MLP_DOWN]

# Llama-style naming: `post_attention_layernorm` is the norm before the MLP.
PRE_NORMS = [
    norm(LAYER + "input_layernorm.weight", OUT + "pre_attn_norm"),
    norm(LAYER + "post_attention_layernorm.weight", OUT + "pre_mlp_norm"),
]

# Gemma 2 naming: four norms, `post_attention_layernorm` on the attention output.
SANDWICH_NORMS = [
    norm(LAYER + "input_layernorm.weight", OUT + "pre_attn_norm"),
    norm(LAYER + "post_attention_layernorm.weight", OUT + "post_attn_norm"),
    norm(LAYER + "pre_feedforward_layernorm.weight", OUT + "pre_mlp_norm"),
    norm(LAYER + "post_feedforward_layernorm.weight", OUT + "post_mlp_norm"),
]

# --- the ViT (SigLIP, CLIP): rules over a VisionConfig -------------------------------------------------
VIT = "vision_tower."
VLAYER = VIT + "encoder.layers.{i}."
VOUT = "vision/layer_{i}/"
QKV_NAMES = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"))


def layer_norm(source: str, target: str, when=lambda c: True) -> list[Rule]:
    return [Rule(source + ".weight", lambda c: (c.width,), ((target + "/scale", keep),), when),
            Rule(source + ".bias", lambda c: (c.width,), ((target + "/bias", keep),), when)]


def linear(source: str, target: str, out_dim, in_dim, bias: bool = True) -> list[Rule]:
    """A torch Linear [out, in] with its bias, to an [in, out] kernel."""
    rules = [Rule(source + ".weight", lambda c: (out_dim(c), in_dim(c)), ((target + "/kernel", transpose),))]
    if bias:
        rules.append(Rule(source + ".bias", lambda c: (out_dim(c),), ((target + "/bias", keep),)))
    return rules


def vit_attention(prefix: str, target: str) -> list[Rule]:
    return [rule for name, proj in QKV_NAMES for rule in (
        Rule(f"{prefix}{proj}.weight", lambda c: (c.width, c.width), ((f"{target}/{name}/kernel", to_heads(N)),)),
        Rule(f"{prefix}{proj}.bias", lambda c: (c.width,), ((f"{target}/{name}/bias", bias_to_heads(N)),)),
    )] + [
        Rule(prefix + "out_proj.weight", lambda c: (c.width, c.width), ((target + "/o/kernel", from_heads),)),
        Rule(prefix + "out_proj.bias", lambda c: (c.width,), ((target + "/o/bias", keep),)),
    ]


# torch.nn.MultiheadAttention (SigLIP's pooling head) packs q, k, v as rows of one in_proj.
def _packed(index: int, then: Transform) -> Transform:
    return lambda w, c: then(w[index * c.width:(index + 1) * c.width], c)


# What every ViT here holds; each encoder family's record (convert.families) adds its own.
VIT_COMMON = [
    Rule(VIT + "embeddings.patch_embedding.weight", lambda c: (c.width, 3, c.patch_size, c.patch_size),
         (("vision/patch_embed/kernel", lambda w, c: w.transpose(2, 3, 1, 0)),)),  # to [h, w, C_in, C_out]
    Rule(VIT + "embeddings.position_embedding.weight", lambda c: (c.num_tokens, c.width),
         (("vision/pos_embedding", keep),)),
    *layer_norm(VLAYER + "layer_norm1", VOUT + "pre_attn_norm"),
    *vit_attention(VLAYER + "self_attn.", VOUT + "attn"),
    *layer_norm(VLAYER + "layer_norm2", VOUT + "pre_mlp_norm"),
    *linear(VLAYER + "mlp.fc1", VOUT + "mlp/fc1", F, D),
    *linear(VLAYER + "mlp.fc2", VOUT + "mlp/fc2", D, F),
    *layer_norm(VIT + "post_layernorm", "vision/post_norm"),
]

POOL = VIT + "head."
# SigLIP's optional pooling head: torch.nn.MultiheadAttention over a learned probe, then an MLP
ATTENTION_POOL = [
    Rule(POOL + "probe", lambda c: (1, 1, c.width), (("vision/attention_pool/probe", lambda w, c: w.reshape(-1)),)),
    Rule(POOL + "attention.in_proj_weight", lambda c: (3 * c.width, c.width), tuple(
        (f"vision/attention_pool/attn/{name}/kernel", _packed(i, to_heads(N))) for i, (name, _) in enumerate(QKV_NAMES))),
    Rule(POOL + "attention.in_proj_bias", lambda c: (3 * c.width,), tuple(
        (f"vision/attention_pool/attn/{name}/bias", _packed(i, bias_to_heads(N))) for i, (name, _) in enumerate(QKV_NAMES))),
    Rule(POOL + "attention.out_proj.weight", lambda c: (c.width, c.width),
         (("vision/attention_pool/attn/o/kernel", from_heads),)),
    Rule(POOL + "attention.out_proj.bias", lambda c: (c.width,), (("vision/attention_pool/attn/o/bias", keep),)),
    *layer_norm(POOL + "layernorm", "vision/attention_pool/norm"),
    *linear(POOL + "mlp.fc1", "vision/attention_pool/mlp/fc1", F, D),
    *linear(POOL + "mlp.fc2", "vision/attention_pool/mlp/fc2", D, F),
]

SIGLIP_VISION = VIT_COMMON + [
    Rule(VIT + "embeddings.patch_embedding.bias", lambda c: (c.width,), (("vision/patch_embed/bias", keep),)),
    *(dataclasses.replace(rule, when=lambda c: c.attention_pool) for rule in ATTENTION_POOL),
]

CLIP_VISION = VIT_COMMON + [
    Rule(VIT + "embeddings.class_embedding", lambda c: (c.width,), (("vision/class_token", keep),)),
    *layer_norm(VIT + "pre_layrnorm", "vision/pre_norm"),  # sic: transformers' name
    Rule("visual_projection.weight", lambda c: (c.projection_dim, c.width), (("vision/projection/kernel", transpose),),
         when=lambda c: c.projection_dim is not None),
]

# Qwen2.5-VL's image encoder: patches embedded by a bias-free Conv3d whose kernel spans a whole patch (a
# linear map of its C x T x P x P values), RMSNorms, q, k and v fused in one projection (rows [q | k | v]),
# a gated MLP with biases.
QV = "visual."
QVLAYER = QV + "blocks.{i}."
PATCH_KERNEL = lambda c: (c.width, 3, c.temporal_patch_size, c.patch_size, c.patch_size)
QWEN_ATTENTION = [
    Rule(QVLAYER + "attn.qkv.weight", lambda c: (3 * c.width, c.width), tuple(
        (f"{VOUT}attn/{name}/kernel", _packed(i, to_heads(N))) for i, (name, _) in enumerate(QKV_NAMES))),
    Rule(QVLAYER + "attn.qkv.bias", lambda c: (3 * c.width,), tuple(
        (f"{VOUT}attn/{name}/bias", _packed(i, bias_to_heads(N))) for i, (name, _) in enumerate(QKV_NAMES))),
    Rule(QVLAYER + "attn.proj.weight", lambda c: (c.width, c.width), ((VOUT + "attn/o/kernel", from_heads),)),
    Rule(QVLAYER + "attn.proj.bias", lambda c: (c.width,), ((VOUT + "attn/o/bias", keep),)),
]
QWEN_VISION = [
    Rule(QV + "patch_embed.proj.weight", PATCH_KERNEL,
         (("vision/patch_embed/kernel", lambda w, c: w.reshape(c.width, -1).T),)),
    norm(QVLAYER + "norm1.weight", VOUT + "pre_attn_norm"),
    norm(QVLAYER + "norm2.weight", VOUT + "pre_mlp_norm"),
    *QWEN_ATTENTION,
    *linear(QVLAYER + "mlp.gate_proj", VOUT + "mlp/gate", F, D),
    *linear(QVLAYER + "mlp.up_proj", VOUT + "mlp/up", F, D),
    *linear(QVLAYER + "mlp.down_proj", VOUT + "mlp/down", D, F),
]
# Qwen3-VL's: the patch embedding with a bias, learned positions on a square grid, LayerNorms, a plain MLP
QWEN3_VISION = [
    Rule(QV + "patch_embed.proj.weight", PATCH_KERNEL,
         (("vision/patch_embed/kernel", lambda w, c: w.reshape(c.width, -1).T),)),
    Rule(QV + "patch_embed.proj.bias", lambda c: (c.width,), (("vision/patch_embed/bias", keep),)),
    Rule(QV + "pos_embed.weight", lambda c: (c.position_grid ** 2, c.width), (("vision/pos_embedding", keep),)),
    *layer_norm(QVLAYER + "norm1", VOUT + "pre_attn_norm"),
    *layer_norm(QVLAYER + "norm2", VOUT + "pre_mlp_norm"),
    *QWEN_ATTENTION,
    *linear(QVLAYER + "mlp.linear_fc1", VOUT + "mlp/fc1", F, D),
    *linear(QVLAYER + "mlp.linear_fc2", VOUT + "mlp/fc2", D, F),
]

# --- projectors: rules over the whole ModelConfig -------------------------------------------------------
TEXT_WIDTH = lambda m: m.decoder.width
VISION_WIDTH = lambda m: m.vision.width
MERGED_WIDTH = lambda m: m.vision.width * m.vision.merge_size ** 2
PROJECTORS = {
    "linear": lambda m: linear("multi_modal_projector.linear", "projector/linear", TEXT_WIDTH, VISION_WIDTH,
                               m.projector_bias),
    "mlp": lambda m: (linear("multi_modal_projector.linear_1", "projector/mlp/fc1", TEXT_WIDTH, VISION_WIDTH,
                             m.projector_bias)
                      + linear("multi_modal_projector.linear_2", "projector/mlp/fc2", TEXT_WIDTH, TEXT_WIDTH,
                               m.projector_bias)),
    # Gemma 3 keeps its projection as a bare [in, out] parameter, beside the pooled tokens' norm
    "pooled": lambda m: [
        Rule("multi_modal_projector.mm_soft_emb_norm.weight", lambda m: (VISION_WIDTH(m),),
             (("projector/norm/scale", keep),)),
        Rule("multi_modal_projector.mm_input_projection_weight", lambda m: (VISION_WIDTH(m), TEXT_WIDTH(m)),
             (("projector/linear/kernel", keep),)),
    ],
}

# Qwen-VL's patch merger: an RMSNorm per patch, each square of patches concatenated, then an MLP
PROJECTORS["merge"] = lambda m: [
    Rule(QV + "merger.ln_q.weight", lambda m: (VISION_WIDTH(m),), (("projector/norm/scale", keep),)),
    *linear(QV + "merger.mlp.0", "projector/mlp/fc1", MERGED_WIDTH, MERGED_WIDTH),
    *linear(QV + "merger.mlp.2", "projector/mlp/fc2", TEXT_WIDTH, MERGED_WIDTH),
]



def _qwen3_merger(source: str, target: str, after_merge: bool) -> list[Rule]:
    """A Qwen3-VL merger: a LayerNorm (on each patch, or on each merged square), Linear, GELU, Linear."""
    width = MERGED_WIDTH if after_merge else VISION_WIDTH
    return [Rule(source + "norm.weight", lambda m: (width(m),), ((target + "/norm/scale", keep),)),
            Rule(source + "norm.bias", lambda m: (width(m),), ((target + "/norm/bias", keep),)),
            *linear(source + "linear_fc1", target + "/mlp/fc1", MERGED_WIDTH, MERGED_WIDTH),
            *linear(source + "linear_fc2", target + "/mlp/fc2", TEXT_WIDTH, MERGED_WIDTH)]


# Qwen3-VL's merger and DeepStack's, one for each of its inner layers
QWEN3_MERGERS = lambda m: _qwen3_merger(QV + "merger.", "projector", False) + [
    rule for k in range(len(m.vision.deepstack_layers))
    for rule in _qwen3_merger(f"{QV}deepstack_merger_list.{k}.", f"deepstack_projector_{k}", True)]

# A classification head (`...ForSequenceClassification`, `...ForTokenClassification`) replaces lm_head.
LABELS = lambda m: m.head.num_labels
HEADS = [
    Rule("score.weight", lambda m: (LABELS(m), m.decoder.width), (("head/score/kernel", transpose),)),
    Rule("score.bias", lambda m: (LABELS(m),), (("head/score/bias", keep),), when=lambda m: m.head.bias),
]

# Tensors some files carry that hold nothing to convert: rotary tables saved by older transformers,
# CLIP's position ids buffer.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")

# Layouts in the wild -> canonical names, first match wins. Real PaliGemma and LLaVA checkpoints nest
# the encoder as `vision_tower.vision_model.*`; transformers 5 `save_pretrained` writes `vision_tower.*`;
# its in-memory names put everything under `model.`. Standalone encoders are `vision_model.*` or bare.
RENAMES = {
    "vlm": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
            ("model.language_model.", "model."), ("model.vision_tower.vision_model.", VIT),
            ("model.vision_tower.", VIT), ("vision_tower.vision_model.", VIT),
            ("model.multi_modal_projector.", "multi_modal_projector."), ("model.visual.", QV)),
    "vision": (("vision_model.", VIT), ("embeddings.", VIT + "embeddings."), ("encoder.", VIT + "encoder."),
               ("pre_layrnorm.", VIT + "pre_layrnorm."), ("post_layernorm.", VIT + "post_layernorm."),
               ("head.", VIT + "head.")),
    "text": (),
}


def canonical_name(name: str, kind: str) -> tuple[str, tuple[str, str] | None]:
    """(the canonical name, the (file prefix, canonical prefix) rename applied, if any)."""
    for old, new in RENAMES[kind]:
        if name.startswith(old):
            return new + name[len(old):], (old, new)
    return name, None


def file_name(canonical: str, renames: set[tuple[str, str]]) -> str:
    """A canonical name spelled as the file spells its neighbours (for naming a missing tensor)."""
    for old, new in sorted(renames, key=lambda r: -len(r[1])):
        if canonical.startswith(new):
            return old + canonical[len(new):]
    return canonical


def stacked_slice(path: str) -> tuple[str, int | None]:
    """('decoder/layer_0/mlp/gate', 3) for 'decoder/layer_0/mlp/gate[3]'; (path, None) for a whole param."""
    if not path.endswith("]"):
        return path, None
    base, _, index = path[:-1].rpartition("[")
    return base, int(index)


def _bind(rules: list[Rule], config: Config) -> dict[str, BoundRule]:
    """Every source tensor `rules` predict for `config`, by name, layer and expert indices filled in."""
    bound = {}
    for rule in rules:
        if not rule.when(config):
            continue
        layers = [i for i in range(config.depth) if rule.layers(config, i)] if "{i}" in rule.source else [None]
        experts = range(config.moe.num_experts) if "{e}" in rule.source else [None]
        for i in layers:
            for e in experts:
                fill = lambda s: s.format(i=i, e=e)
                targets = tuple((fill(path), lambda w, t=t: t(w, config)) for path, t in rule.targets)
                bound[fill(rule.source)] = BoundRule(fill(rule.source), tuple(rule.shape(config)), targets)
    return bound


def expand(config: ModelConfig, decoder_table: tuple[Rule, ...] | None, vision_table: tuple[Rule, ...] | None,
           projector_table: Callable[[ModelConfig], list[Rule]] | None = None) -> dict[str, BoundRule]:
    """Every source tensor (canonical name) a model predicts: its decoder and its image encoder (the tables
    of their families), its projector (its vision-language family's table, else the projector kind's) and
    its head."""
    rules = {}
    if config.decoder is not None:
        rules |= _bind(list(decoder_table), config.decoder)
    if config.vision is not None:
        rules |= _bind(list(vision_table), config.vision)
    if config.is_vlm:
        rules |= _bind((projector_table or PROJECTORS[config.projector])(config), config)
    if config.head is not None:
        rules.pop("lm_head.weight", None)
        rules |= _bind(HEADS, config)
    return rules
