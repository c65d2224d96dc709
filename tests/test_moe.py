"""The mixture-of-experts MLP equals routing each token through its chosen experts one by one."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.config import MoeConfig
from jaxvlm.moe import MoeMLP


def routed_one_by_one(params, x, config: MoeConfig) -> np.ndarray:
    """Each token: softmax over the experts, the top k (renormalised or not), their gated MLPs summed."""
    p = jax.tree.map(np.asarray, params["params"])
    silu = lambda v: v / (1 + np.exp(-v))
    out = np.zeros_like(x)
    for b, t in np.ndindex(x.shape[:2]):
        token = x[b, t]
        logits = token @ p["router"]["kernel"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs)[:config.top_k]
        weights = probs[chosen] / (probs[chosen].sum() if config.normalize_weights else 1.0)
        for e, w in zip(chosen, weights):
            h = silu(token @ p["gate"][e]) * (token @ p["up"][e])
            out[b, t] += w * (h @ p["down"][e])
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_sorted_ragged_products_equal_a_loop_over_tokens(normalize):
    config = MoeConfig(num_experts=8, top_k=2, mlp_dim=12, normalize_weights=normalize)
    layer = MoeMLP(config, "silu")
    x = jax.random.normal(jax.random.key(0), (3, 5, 16), jnp.float32)
    params = nn.meta.unbox(layer.init(jax.random.key(1), x))
    assert jax.tree.map(jnp.shape, params["params"]) == {
        "router": {"kernel": (16, 8)}, "gate": (8, 16, 12), "up": (8, 16, 12), "down": (8, 12, 16)}
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), routed_one_by_one(params, np.asarray(x), config),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [None, 4])
def test_int8_experts_equal_their_dequantized_stacks(group_size):
    """int8 stacks (per output channel: the products taken in int8, scaled after; per group: dequantized)
    give what the float layer gives with the dequantized weights."""
    from jaxvlm.quantize import dequantize, quantize
    config = MoeConfig(num_experts=8, top_k=2, mlp_dim=12)
    layer = MoeMLP(config, "silu")
    x = jax.random.normal(jax.random.key(0), (3, 5, 16), jnp.float32)
    params = nn.meta.unbox(layer.init(jax.random.key(1), x))["params"]
    int8, dequantized = dict(params), dict(params)
    for name in ("gate", "up", "down"):
        q, scale = quantize(params[name], (-2,), group_size)
        int8[name], int8[name + "_scale"] = q, scale
        dequantized[name] = dequantize(q, scale, (-2,), jnp.float32)
    want = jax.jit(layer.apply)({"params": dequantized}, x)
    np.testing.assert_allclose(jax.jit(layer.apply)({"params": int8}, x), want, rtol=1e-5, atol=1e-5)


def test_bad_moe_settings_are_named(hf_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="MoeConfig.top_k: 9 is more than num_experts=8"):
        MoeConfig(num_experts=8, top_k=9, mlp_dim=4)
    import json
    import shutil
    from convert.hf_config import ConfigError, model_config
    folder = shutil.copytree(hf_checkpoint("qwen3_moe"), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_experts_per_tok=9)))
    with pytest.raises(ConfigError, match=r"config.json: field 'num_experts_per_tok' must be between 1 and "
                                          r"num_experts=8, got 9$"):
        model_config(str(folder))
    with pytest.raises(ValueError, match="MoeConfig.num_experts: must be a positive int of at most 4,096, got 0"):
        MoeConfig(num_experts=0, top_k=1, mlp_dim=4)


def test_dense_and_mixture_layers_are_never_stacked():
    from jaxvlm import checkpoint
    from jaxvlm.config import DecoderConfig, ModelConfig
    moe = MoeConfig(num_experts=4, top_k=2, mlp_dim=8, layers=(True, False))
    config = ModelConfig(decoder=DecoderConfig(vocab_size=32, width=16, depth=2, num_heads=2, num_kv_heads=1,
                                               head_dim=8, mlp_dim=24, moe=moe))
    with pytest.raises(ValueError, match="cannot be stacked"):
        checkpoint.abstract_params(config, scan_layers=True)
    tree = checkpoint.abstract_params(config)
    assert tree["decoder"]["layer_0"]["mlp"]["gate"].shape == (4, 16, 8)
    assert tree["decoder"]["layer_1"]["mlp"]["gate"]["kernel"].shape == (16, 24)
    with pytest.raises(ValueError, match=r"layers differ in 'mixture' \(their params have other shapes\), so they "
                                         r"cannot be stacked: use unrolled layers \(scan_layers=False\)"):
        checkpoint.abstract_params(config, scan_layers=True)
