"""Named configs of released models, for shape checks, benchmarks and random-init experiments.

Converted checkpoints carry their own config; these are for when no checkpoint is at hand. LongRoPE
models (Phi-3 128k) are left out: their per-frequency factors belong to the checkpoint's config.json.
"""

from __future__ import annotations

from jaxvlm.config import DecoderConfig, RopeConfig

PRESETS: dict[str, DecoderConfig] = {
    "gemma-2b": DecoderConfig(
        vocab_size=256_000, width=2048, depth=18, num_heads=8, num_kv_heads=1, head_dim=256, mlp_dim=16_384,
        mlp_activation="gelu_tanh", norm_scale_offset=1.0, embed_scale=True, tie_embeddings=True,
        max_position_embeddings=8192),
    "gemma-2-2b": DecoderConfig(
        vocab_size=256_000, width=2304, depth=26, num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=9216,
        mlp_activation="gelu_tanh", norm_scale_offset=1.0, embed_scale=True, tie_embeddings=True,
        use_post_norms=True, query_pre_attn_scalar=256, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        sliding_window=4096, layer_types=("local", "global") * 13, max_position_embeddings=8192),
    "gemma-3-1b": DecoderConfig(
        vocab_size=262_144, width=1152, depth=26, num_heads=4, num_kv_heads=1, head_dim=256, mlp_dim=6912,
        mlp_activation="gelu_tanh", norm_scale_offset=1.0, embed_scale=True, tie_embeddings=True,
        use_post_norms=True, use_qk_norm=True, query_pre_attn_scalar=256, sliding_window=512,
        layer_types=tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(26)),
        rope=RopeConfig(theta=1_000_000.0), local_rope=RopeConfig(theta=10_000.0), max_position_embeddings=32_768),
    "phi-3-mini-4k": DecoderConfig(
        vocab_size=32_064, width=3072, depth=32, num_heads=32, num_kv_heads=32, head_dim=96, mlp_dim=8192,
        norm_eps=1e-5, sliding_window=2047, layer_types=("local",) * 32, max_position_embeddings=4096),
    "qwen3-0.6b": DecoderConfig(
        vocab_size=151_936, width=1024, depth=28, num_heads=16, num_kv_heads=8, head_dim=128, mlp_dim=3072,
        use_qk_norm=True, tie_embeddings=True, rope=RopeConfig(theta=1_000_000.0), max_position_embeddings=40_960),
}


def get(name: str) -> DecoderConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]
