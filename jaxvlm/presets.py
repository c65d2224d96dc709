"""Released models by name, from their published `config.json` files (tokenizers and weights left out), for
compile reports, shape checks, benchmarks and random-init experiments.

Each is read by the same code as a checkpoint folder's config (`convert.hf_config`), so a preset is exactly
the `ModelConfig` that converting the released checkpoint gives. Converted checkpoints carry their own
config; these are for when none is at hand. LongRoPE models (Phi-3 128k) are left out: their
per-frequency factors are long lists better read from the checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

from jaxvlm.config import ModelConfig

_GEMMA_TOKENS = dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)
_QWEN3_TOKENS = dict(bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False, rope_theta=1_000_000.0,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, hidden_act="silu", use_sliding_window=False,
                     head_dim=128)
_PHI3 = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], vocab_size=32064, max_position_embeddings=4096,
             original_max_position_embeddings=4096, sliding_window=2047, rms_norm_eps=1e-5, rope_theta=10000.0,
             rope_scaling=None, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
             pad_token_id=32000)


def _gemma2(hidden, mlp, depth, heads, kv_heads, head_dim, scalar, **extra):
    return dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_size=hidden, intermediate_size=mlp,
                num_hidden_layers=depth,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                query_pre_attn_scalar=scalar, hidden_activation="gelu_pytorch_tanh", sliding_window=4096,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192,
                rms_norm_eps=1e-6, rope_theta=10000.0, cache_implementation="hybrid", **extra)


_LLAMA3_SCALING = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)


def _llama3(hidden, mlp, depth, heads, kv_heads, **extra):
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=hidden,
                intermediate_size=mlp, num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500_000.0, hidden_act="silu",
                attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001, **extra)


def _qwen3(hidden, mlp, depth, heads, kv_heads, **extra):
    return {**dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=hidden,
                   intermediate_size=mlp, num_hidden_layers=depth, num_attention_heads=heads,
                   num_key_value_heads=kv_heads, max_window_layers=depth), **_QWEN3_TOKENS, **extra}


_SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                      num_attention_heads=16, patch_size=14, vision_use_head=False)


def _paligemma(text: dict, projection: int) -> dict:
    return dict(model_type="paligemma", architectures=["PaliGemmaForConditionalGeneration"], hidden_size=projection,
                projection_dim=projection, image_token_index=257152, vocab_size=257216, **_GEMMA_TOKENS,
                text_config=dict(text, vocab_size=257216, num_image_tokens=256),
                vision_config=dict(_SIGLIP_SO400M, image_size=224, num_image_tokens=256, projection_dim=projection))


def _gemma3(hidden, mlp, depth, heads, kv_heads, head_dim=256, scalar=256) -> dict:
    return dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], boi_token_index=255999,
                eoi_token_index=256000, image_token_index=262144, mm_tokens_per_image=256, bos_token_id=2,
                eos_token_id=[1, 106], pad_token_id=0,
                text_config=dict(model_type="gemma3_text", hidden_size=hidden, intermediate_size=mlp,
                                 num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                 head_dim=head_dim, query_pre_attn_scalar=scalar, sliding_window=1024,
                                 rope_scaling=dict(factor=8.0, rope_type="linear"), rope_theta=1_000_000.0,
                                 rope_local_base_freq=10_000.0, max_position_embeddings=131072, vocab_size=262208,
                                 hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6),
                vision_config=dict(_SIGLIP_SO400M, image_size=896))


def _qwen2_5_vl(hidden, mlp, depth, heads, kv_heads, **extra) -> dict:
    """As the hub's files are laid out: the decoder's fields at the top level, M-RoPE in rope_scaling."""
    return dict(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"], hidden_size=hidden,
                intermediate_size=mlp, num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=kv_heads,
                hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                sliding_window=32768, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
                vision_start_token_id=151652, vision_end_token_id=151653, image_token_id=151655,
                video_token_id=151656, rope_scaling=dict(type="mrope", mrope_section=[16, 24, 24]),
                vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   in_chans=3, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                                   spatial_patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                                   tokens_per_second=2, temporal_patch_size=2), **extra)


# Each released model's config.json (the fields that shape it; transformers' defaults for the rest).
CONFIGS: dict[str, dict] = {
    "gemma-2b": dict(model_type="gemma", architectures=["GemmaForCausalLM"], vocab_size=256000, hidden_size=2048,
                     intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                     head_dim=256, hidden_act="gelu", hidden_activation=None, max_position_embeddings=8192,
                     rms_norm_eps=1e-6, rope_theta=10000.0, **_GEMMA_TOKENS),
    "gemma-2-2b": _gemma2(2304, 9216, 26, 8, 4, 256, 256, vocab_size=256000, **_GEMMA_TOKENS),
    "gemma-2-9b": _gemma2(3584, 14336, 42, 16, 8, 256, 256, vocab_size=256000, **_GEMMA_TOKENS),
    "gemma-2-27b": _gemma2(4608, 36864, 46, 32, 16, 128, 144, vocab_size=256000, **_GEMMA_TOKENS),
    "gemma-3-1b": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=262144,
                       hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                       sliding_window_pattern=6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                       rope_scaling=None, max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh",
                       rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0),
    "gemma-3-4b-it": _gemma3(2560, 10240, 34, 8, 4),
    "gemma-3-12b-it": _gemma3(3840, 15360, 48, 16, 8),
    "gemma-3-27b-it": _gemma3(5376, 21504, 62, 32, 16, head_dim=128, scalar=168),
    "paligemma-3b-pt-224": _paligemma(dict(model_type="gemma", hidden_size=2048, intermediate_size=16384,
                                           num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                                           head_dim=256), 2048),
    "paligemma2-3b-pt-224": _paligemma(_gemma2(2304, 9216, 26, 8, 4, 256, 256), 2304),
    "paligemma2-10b-pt-224": _paligemma(_gemma2(3584, 14336, 42, 16, 8, 256, 256), 3584),
    "paligemma2-28b-pt-224": _paligemma(_gemma2(4608, 36864, 46, 32, 16, 128, 144), 4608),
    "phi-3-mini-4k": dict(_PHI3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32),
    "phi-3-medium-4k-instruct": dict(_PHI3, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                                     num_attention_heads=40, num_key_value_heads=10),
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, tie_word_embeddings=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8),
    "qwen3-30b-a3b": _qwen3(2048, 6144, 48, 32, 4, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                            moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                            mlp_only_layers=[], norm_topk_prob=True),
    "llama-3.1-8b": _llama3(4096, 14336, 32, 32, 8, rope_scaling=dict(_LLAMA3_SCALING, factor=8.0),
                            tie_word_embeddings=False),
    "llama-3.2-1b": _llama3(2048, 8192, 16, 32, 8, rope_scaling=dict(_LLAMA3_SCALING, factor=32.0), head_dim=64,
                            tie_word_embeddings=True),
    "mistral-7b-v0.3": dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32768,
                            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
                            rope_theta=1_000_000.0, sliding_window=None, hidden_act="silu", tie_word_embeddings=False,
                            bos_token_id=1, eos_token_id=2),
    "llava-1.5-7b": dict(model_type="llava", architectures=["LlavaForConditionalGeneration"], image_token_index=32000,
                         pad_token_id=32001, projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", tie_word_embeddings=False, vocab_size=32064,
                         text_config=dict(model_type="llama", architectures=["LlamaForCausalLM"],
                                          max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064),
                         vision_config=dict(model_type="clip_vision_model", hidden_size=1024, image_size=336,
                                            intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                                            patch_size=14, projection_dim=768)),
    "qwen2.5-7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, max_window_layers=28, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                       sliding_window=131072, use_sliding_window=False, hidden_act="silu", tie_word_embeddings=False,
                       bos_token_id=151643, eos_token_id=151643),
    "qwen3-vl-4b-instruct": dict(
        model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"], image_token_id=151655,
        video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True,
        text_config=dict(model_type="qwen3_vl_text", attention_bias=False, bos_token_id=151643, eos_token_id=151645,
                         head_dim=128, hidden_act="silu", hidden_size=2560, intermediate_size=9728,
                         max_position_embeddings=262144, num_attention_heads=32, num_hidden_layers=36,
                         num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=5_000_000,
                         rope_scaling=dict(mrope_interleaved=True, mrope_section=[24, 20, 20], rope_type="default"),
                         tie_word_embeddings=True, vocab_size=151936),
        vision_config=dict(model_type="qwen3_vl", deepstack_visual_indexes=[5, 11, 17], depth=24,
                           hidden_act="gelu_pytorch_tanh", hidden_size=1024, in_channels=3, intermediate_size=4096,
                           num_heads=16, num_position_embeddings=2304, out_hidden_size=2560, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2)),
    "qwen2.5-vl-3b-instruct": _qwen2_5_vl(2048, 11008, 36, 16, 2, vocab_size=151936, max_window_layers=70,
                                          tie_word_embeddings=True),
    "qwen2.5-vl-7b-instruct": _qwen2_5_vl(3584, 18944, 28, 28, 4, vocab_size=152064, max_window_layers=28,
                                          tie_word_embeddings=False),
}
PRESETS = tuple(CONFIGS)


@functools.cache
def get(name: str) -> ModelConfig:
    """The released model `name`'s config, as converting its checkpoint would give it."""
    if name not in CONFIGS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(CONFIGS)})")
    from convert.hf_config import model_config  # the checkpoint folders' reader; it imports jaxvlm
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(CONFIGS[name], f)
        return model_config(folder)[0]
