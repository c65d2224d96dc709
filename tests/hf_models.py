"""Tiny random `transformers` models, saved as Hugging Face checkpoint folders, for parity tests.

Every parameter is re-randomised (transformers initialises norms to 1 or 0 and biases to 0), so norm
offsets, biases and transposes are all exercised.
"""

from __future__ import annotations

import os

import numpy as np

VOCAB = 256

# name -> (config class, kwargs). Each covers a family's distinctive features at a tiny size.
CONFIGS = {
    "gemma": ("GemmaConfig", dict(  # MQA, GeGLU-tanh, (1 + w) norms, sqrt(D) embedding scale, tied head
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16)),
    "gemma2": ("Gemma2Config", dict(  # GQA, post-norms, soft-capping, query_pre_attn_scalar, local/global layers
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(  # q/k norms, two local layers to a global one, a window shorter than
        # the prompts, the local layers' own RoPE base, the global layers' linear scaling
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    "phi3": ("Phi3Config", dict(  # MHA, fused qkv / gate_up, partial rotary, sliding window on every layer
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        partial_rotary_factor=0.5, sliding_window=7, tie_word_embeddings=False)),
    "phi3_longrope": ("Phi3Config", dict(  # LongRoPE: 32 original positions extended to 256
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        original_max_position_embeddings=32, max_position_embeddings=256, tie_word_embeddings=False,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
                      "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]})),
    "qwen3": ("Qwen3Config", dict(  # GQA, q/k norms, explicit head_dim != D / N, biases, tied head
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, attention_bias=True, tie_word_embeddings=True)),
    "llama": ("LlamaConfig", dict(  # GQA, untied head, Llama 3's rope scaling over 32 original positions: each
        # of its three kinds of frequency (kept, blended, divided) present at head_dim 16
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, rope_parameters={"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", dict(  # GQA, explicit head_dim, a sliding window on every layer shorter than
        # the prompts
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, sliding_window=5, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(  # biases on q, k, v but not the output, tied head
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True)),
}

CONFIGS["qwen3_moe"] = ("Qwen3MoeConfig", dict(  # 8 experts, top 2 renormalised, a dense layer between
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    mlp_only_layers=[1], tie_word_embeddings=False))

CAUSAL_LM = {"GemmaConfig": "GemmaForCausalLM", "Gemma2Config": "Gemma2ForCausalLM",
             "Gemma3TextConfig": "Gemma3ForCausalLM", "Phi3Config": "Phi3ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM",
             "Qwen3MoeConfig": "Qwen3MoeForCausalLM", "LlamaConfig": "LlamaForCausalLM",
             "MistralConfig": "MistralForCausalLM", "Qwen2Config": "Qwen2ForCausalLM"}


def build(name: str, seed: int = 0, eos_token_id=None, architecture: str | None = None, **overrides):
    """A tiny random HF causal LM (or `architecture`, e.g. 'Phi3ForTokenClassification') in float32 and
    eval mode, every parameter re-randomised."""
    import torch
    import transformers

    config_class, kwargs = CONFIGS[name]
    kwargs = dict(kwargs, vocab_size=VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=eos_token_id,
                  attn_implementation="eager", dtype=torch.float32)
    kwargs.setdefault("max_position_embeddings", 256)
    kwargs.update(overrides)
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture or CAUSAL_LM[config_class])(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def save(model, directory: str, shard: str | None = None, bin_file: bool = False) -> str:
    """Saves as safetensors (sharded when `shard` is a size like '20KB') or as pytorch_model.bin files
    (two shards with their index when `shard` is also given), as older transformers wrote them."""
    import json
    import torch
    model.save_pretrained(directory, max_shard_size=shard or "50GB")
    if bin_file:
        for f in os.listdir(directory):
            if f.startswith("model") and ("safetensors" in f):
                os.remove(os.path.join(directory, f))
        state = model.state_dict()
        if not shard:
            torch.save(state, os.path.join(directory, "pytorch_model.bin"))
            return directory
        names = list(state)
        files = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                 "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        for file, keys in files.items():
            torch.save({k: state[k] for k in keys}, os.path.join(directory, file))
        index = {"metadata": {}, "weight_map": {k: file for file, keys in files.items() for k in keys}}
        with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
            json.dump(index, f)
    return directory


def prompts(seed: int, lengths) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=n) for n in lengths]


def left_pad(rows, pad_id: int = 0):
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def hf_generate(model, rows, max_new_tokens: int, pad_id: int = 0, **kwargs) -> np.ndarray:
    """transformers' greedy (or other) generation on left-padded rows, new tokens padded to max_new_tokens."""
    import torch
    ids, mask = left_pad(rows, pad_id)
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=max_new_tokens,
                             min_new_tokens=0, pad_token_id=pad_id, **kwargs)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=pad_id)


def hf_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


# --- vision-language models and image encoders ----------------------------------------------------------
IMAGE_TOKEN = VOCAB - 1  # the placeholder id, inside the vocabulary as in real PaliGemma checkpoints
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)  # 16 patches

VLMS = {
    # SigLIP + Gemma: prefix-LM, 1-indexed positions, linear projector, tied head
    "paligemma": ("PaliGemmaConfig", "SiglipVisionConfig", "gemma"),
    # SigLIP + Gemma 2: the same composition over local/global layers with soft-capping
    "paligemma2": ("PaliGemmaConfig", "SiglipVisionConfig", "gemma2"),
    # CLIP + Phi-3 with LongRoPE: class token, second-to-last layer, two-layer GELU projector
    "llava_phi3": ("LlavaConfig", "CLIPVisionConfig", "phi3_longrope"),
    # LLaVA-1.5: the same composition over a Llama decoder
    "llava": ("LlavaConfig", "CLIPVisionConfig", "llama"),
}
# SigLIP + Gemma 3 (its own tests, several images a row): 64 patches pooled to 16 tokens per image, each framed
# by begin/end-of-image tokens, a window of 4 shorter than an image
GEMMA3 = ("Gemma3Config", "SiglipVisionConfig", "gemma3_text")
GEMMA3_VISION = dict(VISION, patch_size=4)
GEMMA3_FRAME = (IMAGE_TOKEN - 2, IMAGE_TOKEN - 1)  # begin- and end-of-image
GEMMA3_IMAGE_TOKENS = 16


def _randomise(model, seed: int, embedding_scale: float = 0.3):
    import torch
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (embedding_scale if "embed_tokens" in name else 0.3))
    return model.eval()


def build_vlm(name: str, seed: int = 0, eos_token_id=None, vocab: int = VOCAB, image_token: int = IMAGE_TOKEN,
              frame: tuple[int, int] = GEMMA3_FRAME):
    """A tiny random HF vision-language model (float32, eager attention), every parameter re-randomised."""
    import torch
    import transformers

    config_class, vision_class, text = GEMMA3 if name == "gemma3" else VLMS[name]
    text_class, text_kwargs = CONFIGS[text]
    text_config = getattr(transformers, text_class)(**dict(
        text_kwargs, vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=eos_token_id,
        max_position_embeddings=256))
    vision_config = getattr(transformers, vision_class)(**(GEMMA3_VISION if name == "gemma3" else VISION), **(
        {"vision_use_head": False} if vision_class == "SiglipVisionConfig" else {}))
    if config_class == "Gemma3Config":
        config = transformers.Gemma3Config(vision_config=vision_config, text_config=text_config,
                                           mm_tokens_per_image=GEMMA3_IMAGE_TOKENS, image_token_index=image_token,
                                           boi_token_index=frame[0], eoi_token_index=frame[1])
        model_class = transformers.Gemma3ForConditionalGeneration
    elif config_class == "PaliGemmaConfig":
        config = transformers.PaliGemmaConfig(vision_config=vision_config, text_config=text_config,
                                              image_token_index=image_token, projection_dim=text_config.hidden_size,
                                              hidden_size=text_config.hidden_size, vocab_size=vocab)
        model_class = transformers.PaliGemmaForConditionalGeneration
    else:
        config = transformers.LlavaConfig(vision_config=vision_config, text_config=text_config,
                                          image_token_index=image_token, image_seq_length=16, vision_feature_layer=-2,
                                          vision_feature_select_strategy="default")
        model_class = transformers.LlavaForConditionalGeneration
    config._attn_implementation = "eager"
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    config.eos_token_id = eos_token_id
    # Gemma 2 and 3: post-norms bound each block's output, so at the usual scale the sqrt(D)-scaled embedding
    # of the last token dominates and the model only repeats it: smaller embeddings keep generation varied.
    small = text in ("gemma2", "gemma3_text")
    return _randomise(model_class(config).to(torch.float32), seed, embedding_scale=0.05 if small else 0.3)


def build_vision(name: str, seed: int = 0):
    """A tiny random SigLIP encoder with its attention-pool head, or a CLIP encoder with its projection."""
    import torch
    import transformers
    if name == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION, vision_use_head=True))
    else:
        model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION, projection_dim=24))
    model.config._attn_implementation = "eager"
    return _randomise(model.to(torch.float32), seed)


def pixels(seed: int, batch: int, size: int = VISION["image_size"]) -> np.ndarray:
    """Random pixel values float32[B, H, W, 3] in [-1, 1] (jaxvlm's layout)."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def to_torch_pixels(pixels: np.ndarray):
    import torch
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


def vlm_prompts(name: str, seed: int, text_lengths) -> list[np.ndarray]:
    """Prompts with 16 image placeholders, laid out as each family's processor does."""
    rows = []
    for text in prompts(seed, text_lengths):
        text = text[text != IMAGE_TOKEN]
        image = np.full(16, IMAGE_TOKEN)
        if name.startswith("paligemma"):  # image tokens, BOS, prompt, newline (any fixed id)
            rows.append(np.concatenate([image, [2], text, [10]]))
        else:  # BOS, text, image tokens, text
            rows.append(np.concatenate([[2], text[:2], image, text[2:]]))
    return rows


def vlm_kwargs(name: str, mask: np.ndarray, pixel_values: np.ndarray) -> dict:
    """The tensors a processor would give besides input_ids: pixel_values, and PaliGemma's token types
    (0 over the whole prompt: its prefix)."""
    import torch
    kwargs = {"pixel_values": to_torch_pixels(pixel_values), "attention_mask": torch.tensor(mask)}
    if name.startswith("paligemma"):
        kwargs["token_type_ids"] = torch.zeros_like(kwargs["attention_mask"])
    return kwargs


def hf_vlm_generate(model, name: str, rows, pixel_values, max_new_tokens: int, pad_id: int = 0) -> np.ndarray:
    import torch
    ids, mask = left_pad(rows, pad_id)
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), **vlm_kwargs(name, mask, pixel_values), max_new_tokens=max_new_tokens,
                             min_new_tokens=0, pad_token_id=pad_id, do_sample=False)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=pad_id)


def hf_vlm_logits(model, name: str, ids, mask, pixel_values, offset: int, token_type_ids=None) -> np.ndarray:
    """A forward with generate's positions (real tokens counted, from `offset`), as jaxvlm numbers them."""
    import torch
    kwargs = vlm_kwargs(name, mask, pixel_values)
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.tensor(token_type_ids)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + offset
    with torch.no_grad():
        return model(torch.tensor(ids), position_ids=torch.tensor(positions), **kwargs).logits.float().numpy()


def gemma3_prompts(seed: int, images_per_row, text_length: int = 5) -> list[np.ndarray]:
    """Rows of BOS, then per image some text and the framed image (begin, 16 image tokens, end), then text:
    as Gemma3Processor lays them out (its blank lines are text like any other)."""
    rng = np.random.default_rng(seed)
    text = lambda: rng.integers(3, GEMMA3_FRAME[0], size=text_length)
    image = np.concatenate([[GEMMA3_FRAME[0]], np.full(GEMMA3_IMAGE_TOKENS, IMAGE_TOKEN), [GEMMA3_FRAME[1]]])
    return [np.concatenate([[2]] + [np.concatenate([text(), image]) for _ in range(n)] + [text()])
            for n in images_per_row]


def gemma3_kwargs(ids: np.ndarray, mask: np.ndarray, pixel_values: np.ndarray) -> dict:
    """What Gemma3Processor gives besides input_ids: the images in row order, and token types (1 at images)."""
    import torch
    return {"pixel_values": to_torch_pixels(pixel_values), "attention_mask": torch.tensor(mask),
            "token_type_ids": torch.tensor((np.asarray(ids) == IMAGE_TOKEN).astype(np.int64))}


# Qwen2.5-VL: images of any size as patches (14 pixels, 2 frames, merged 2x2), windows of 2x2 merged patches
# with full attention in layer 1, M-RoPE over head_dim 16 ([2, 3, 3] of its 8 frequencies)
QWEN_VL_TOKENS = dict(image_token_id=IMAGE_TOKEN, vision_start_token_id=IMAGE_TOKEN - 2,
                      vision_end_token_id=IMAGE_TOKEN - 1)


# (config class, text and vision fields): Qwen2.5-VL's windows of 2x2 merged patches with full attention in
# layer 1, M-RoPE's [2, 3, 3] in runs; Qwen3-VL's 16-pixel patches, learned positions on a 4x4 grid,
# DeepStack from vision layers 0 and 1 into decoder layers 0 and 1, the streams interleaved
_QWEN_VL_TEXT = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=2)
QWEN_VLS = {
    "qwen2_5_vl": ("Qwen2_5_VL", dict(num_hidden_layers=2, rope_parameters=dict(
        rope_type="default", rope_theta=10_000.0, mrope_section=[2, 3, 3])),
        dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64, window_size=56,
             fullatt_block_indexes=[1])),
    "qwen3_vl": ("Qwen3VL", dict(num_hidden_layers=3, rope_parameters=dict(
        rope_type="default", rope_theta=10_000.0, mrope_section=[2, 3, 3], mrope_interleaved=True)),
        dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64, patch_size=16,
             num_position_embeddings=16, deepstack_visual_indexes=[0, 1])),
}


def build_qwen_vl(name: str = "qwen2_5_vl", seed: int = 0, eos_token_id=None, tokens: dict | None = None):
    """A tiny random Qwen2.5-VL or Qwen3-VL (float32, eager attention); `tokens`: its image, vision start and
    end ids."""
    import torch
    import transformers
    stem, text, vision = QWEN_VLS[name]
    config = getattr(transformers, f"{stem}Config")(text_config=dict(_QWEN_VL_TEXT, eos_token_id=eos_token_id, **text),
                                                    vision_config=vision, **(tokens or QWEN_VL_TOKENS))
    config._attn_implementation = "eager"
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    model = getattr(transformers, f"{stem}ForConditionalGeneration")(config).to(torch.float32)
    return _randomise(model, seed)


def hf_qwen_vl_generate(model, rows, values, grids, max_new_tokens: int) -> np.ndarray:
    """transformers' greedy generation on left-padded rows with images of any size, padded to max_new_tokens."""
    import torch
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), **qwen_vl_kwargs(ids, mask, values, grids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=0)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])))


def qwen_vl_prompts(seed: int, grids_per_row, text_length: int = 4) -> list[np.ndarray]:
    """Rows of text, then per image its start token, a token per merged square of patches and its end token,
    then text: as Qwen2_5_VLProcessor lays them out."""
    rng = np.random.default_rng(seed)
    text = lambda: rng.integers(3, QWEN_VL_TOKENS["vision_start_token_id"], size=text_length)
    framed = lambda g: np.concatenate([[QWEN_VL_TOKENS["vision_start_token_id"]],
                                       np.full(int(np.prod(g)) // 4, IMAGE_TOKEN),
                                       [QWEN_VL_TOKENS["vision_end_token_id"]]])
    return [np.concatenate([text()] + [np.concatenate([framed(g), text()]) for g in grids]) for grids in grids_per_row]


def patch_values(seed: int, grids, patch: int = 14) -> np.ndarray:
    """Random patches float32[n, 3 * 2 * patch * patch] for images of `grids` (as the processor gives them)."""
    n = sum(int(np.prod(g)) for g in grids)
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3 * 2 * patch * patch)).astype(np.float32)


def qwen_vl_kwargs(ids: np.ndarray, mask: np.ndarray, values: np.ndarray, grids) -> dict:
    """What Qwen2_5_VLProcessor gives besides input_ids (its token types, 1 at image tokens, are what lets
    the model number positions with M-RoPE)."""
    import torch
    return {"attention_mask": torch.tensor(mask), "pixel_values": torch.from_numpy(values),
            "image_grid_thw": torch.tensor(np.asarray(grids)),
            "mm_token_type_ids": torch.tensor((np.asarray(ids) == IMAGE_TOKEN).astype(np.int64))}

