"""Declarative maps from Hugging Face tensor names to jaxvlm param paths.

Each `Rule` names a source tensor (`{i}` stands for the layer index), the shape the config predicts
for it (torch layout), and where its pieces go in the jaxvlm tree with a pure re-layout (transpose,
reshape, split): no arithmetic is folded into weights, so stored values stay bit-identical.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxvlm.config import DecoderConfig

Shape = Callable[[DecoderConfig], tuple[int, ...]]
Transform = Callable[[np.ndarray, DecoderConfig], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    shape: Shape  # the torch shape the config predicts
    targets: tuple[tuple[str, Transform], ...]  # (jaxvlm path, re-layout)
    when: Callable[[DecoderConfig], bool] = lambda c: True


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
OUT = "layer_{i}/"


def norm(source: str, target: str, when=lambda c: True) -> Rule:
    return Rule(source, lambda c: (c.width,), ((target + "/scale", keep),), when)


EMBEDDING = [
    Rule("model.embed_tokens.weight", lambda c: (c.vocab_size, c.width), (("embedder/embedding", keep),)),
    norm("model.norm.weight", "final_norm"),
    Rule("lm_head.weight", lambda c: (c.vocab_size, c.width), (("lm_head/kernel", transpose),),
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

TABLES: dict[str, list[Rule]] = {
    "gemma": EMBEDDING + SEPARATE_QKV + ATTN_OUT + SEPARATE_MLP + MLP_DOWN + PRE_NORMS,
    "gemma2": EMBEDDING + SEPARATE_QKV + ATTN_OUT + SEPARATE_MLP + MLP_DOWN + SANDWICH_NORMS,
    "phi3": EMBEDDING + FUSED_QKV + ATTN_OUT + FUSED_MLP + MLP_DOWN + PRE_NORMS,
    "qwen3": EMBEDDING + SEPARATE_QKV + ATTN_OUT + QK_NORM + SEPARATE_MLP + MLP_DOWN + PRE_NORMS,
}

# Tensors some files carry that hold nothing to convert: rotary tables saved by older transformers.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expand(family: str, config: DecoderConfig) -> dict[str, Rule]:
    """Every source tensor the config predicts for `family`, by name, layer indices filled in."""
    rules = {}
    for rule in TABLES[family]:
        if not rule.when(config):
            continue
        for i in range(config.depth) if "{i}" in rule.source else [None]:
            fill = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
            rules[fill(rule.source)] = dataclasses.replace(
                rule, source=fill(rule.source), targets=tuple((fill(path), t) for path, t in rule.targets))
    return rules
