"""jaxvlm model -> Hugging Face checkpoint folder (config.json, safetensors, tokenizer and processor files)
that transformers' `from_pretrained` loads.

The tensors come from the converter's own tables run backwards. Every table transform is a pure re-layout
(transpose, reshape, a slice of rows), a linear map whose transpose is its inverse; a tensor split into
several params (Phi-3's fused qkv) is the sum of its pieces' transposes, each zero outside its rows. So no
inverse is written by hand, and a table that converts is a table that exports.

The Hugging Face family is the record (`convert.families`) the config was read as (its `model_type`s);
for a config made in code, the one family whose fixed behaviours it has (the decoder's norms, embedding
scale, post-norms and q/k norms; a vision-language model's wiring). A behaviour the family cannot
express is refused, naming it.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from convert import tables
from convert.families import (ConfigError, TextFamily, tensor_rules, text_family_of, vision_family_of,
                              vision_language_family_of)
from jaxvlm import checkpoint, files, layout
from jaxvlm.config import DecoderConfig, ImageProcessing, ModelConfig, RopeConfig, VisionConfig

MAX_SHARD_BYTES = 5 * 2 ** 30  # past this, the weights are split into shards with an index
HEAD_SUFFIXES = {"sequence_classification": "ForSequenceClassification",
                 "token_classification": "ForTokenClassification"}
ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "gelu": "gelu", "quick_gelu": "quick_gelu"}
# canonical tensor names (convert.tables) -> the names transformers' save_pretrained writes (a
# vision-language family's: its record's `file_names`)
FILE_NAMES = {"vision": ((tables.VIT, "vision_model."),), "text": ()}


class ExportError(ValueError):
    pass


def _refuse(ok: bool, family: str, what: str) -> None:
    if not ok:
        raise ExportError(f"a {family} checkpoint cannot hold {what}")


def _rope(d: DecoderConfig, rope: RopeConfig) -> dict:
    params = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.rotary_fraction != 1.0:
        params["partial_rotary_factor"] = rope.rotary_fraction
    if rope.linear_factor != 1.0:
        params.update(rope_type="linear", factor=rope.linear_factor)
    if rope.smoothing is not None:
        s = rope.smoothing
        params.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                      high_freq_factor=s.high_freq_factor, original_max_position_embeddings=rope.original_max_position)
    if rope.mrope_section is not None:
        params["mrope_section"] = list(rope.mrope_section)
        if rope.mrope_interleaved:
            params["mrope_interleaved"] = True
    if rope.is_longrope:
        params.update(rope_type="longrope", short_factor=list(rope.short_factor), long_factor=list(rope.long_factor),
                      original_max_position_embeddings=rope.original_max_position,
                      factor=d.max_position_embeddings / rope.original_max_position,
                      attention_factor=rope.attention_factor)
    return params


# DecoderConfig fields only some families' config.json can set
OPTIONAL_NUMBERS = {"query_pre_attn_scalar": "a query_pre_attn_scalar", "attn_logit_softcap": "soft-capped logits",
                    "final_logit_softcap": "soft-capped logits"}


def decoder_config(config: ModelConfig, family: TextFamily) -> dict:
    d, tokens, name = config.decoder, config.tokens, family.model_type
    eos = list(tokens.eos_ids)
    out = dict(model_type=name, vocab_size=d.vocab_size, hidden_size=d.width, intermediate_size=d.mlp_dim,
               num_hidden_layers=d.depth, num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads,
               head_dim=d.head_dim, rms_norm_eps=d.norm_eps, max_position_embeddings=d.max_position_embeddings,
               tie_word_embeddings=d.tie_embeddings, rope_parameters=_rope(d, d.rope), bos_token_id=tokens.bos_id,
               eos_token_id=eos[0] if len(eos) == 1 else (eos or None), pad_token_id=tokens.pad_id)
    out[family.activation_field] = ACTIVATIONS[d.mlp_activation]
    if "qkv_bias" not in family.behaviours:  # (a family that fixes its biases has them checked with the rest)
        _refuse(d.qkv_bias == d.out_bias, name, "biases on q, k, v but not on the output, or the reverse")
        _refuse(family.attention_bias or not d.qkv_bias, name, "attention biases")
        if family.attention_bias:
            out["attention_bias"] = d.qkv_bias
    for field, what in OPTIONAL_NUMBERS.items():
        _refuse(getattr(d, field) is None or field in family.numbers.values(), name, what)
    for hf_name, field in family.numbers.items():
        value = getattr(d, field)
        if field == "query_pre_attn_scalar":  # an integer in transformers' configs; None means the head dim
            value = value or d.head_dim
            value = int(value) if value == int(value) else value
        out[hf_name] = value
    local = [d.window(i) is not None for i in range(d.depth)]
    try:
        out.update(family.window_fields(d, local))
    except ConfigError as e:
        raise ExportError(str(e)) from None
    _refuse(d.moe is None or family.moe_fields is not None, name, "a mixture of experts")
    if d.moe is not None:
        out.update(family.moe_fields(d.moe, d.depth))
    if d.local_rope is not None:  # one entry per layer type, as transformers 5 writes them
        _refuse(family.local_rope, name, "a rotary embedding of the local layers' own")
        out["rope_parameters"] = {"full_attention": _rope(d, d.rope), "sliding_attention": _rope(d, d.local_rope)}
    if d.rope.is_longrope:  # Phi-3 reads the pre-training length from the top level first
        out["original_max_position_embeddings"] = d.rope.original_max_position
    return out


def vision_config(v: VisionConfig) -> dict:
    family = _family(vision_family_of, v)
    return dict(model_type=family.model_type, **family.write(v), hidden_act=ACTIVATIONS[v.activation])


def _family(find, config):
    """The family record `find` gives for `config`, its refusal an ExportError."""
    try:
        return find(config)
    except ConfigError as e:
        raise ExportError(str(e)) from None


def hf_config(config: ModelConfig) -> tuple[dict, TextFamily | None, str]:
    """(config.json's content, the decoder's family, the tensor-name layout) for a jaxvlm config."""
    if config.decoder is None:  # an image encoder alone
        data = vision_config(config.vision)
        return {"architectures": [vision_family_of(config.vision).architecture(config.vision)], **data}, None, "vision"
    family = _family(text_family_of, config.decoder)
    text = decoder_config(config, family)
    if not config.is_vlm:
        suffix = "ForCausalLM" if config.head is None else HEAD_SUFFIXES[config.head.kind]
        data = {"architectures": [family.architecture + suffix], **text}
        if config.head is not None:
            labels = config.head.labels
            data.update(id2label={str(i): label for i, label in enumerate(labels)},
                        label2id={label: i for i, label in enumerate(labels)})
        return data, family, "text"
    vlm = _family(vision_language_family_of, config)
    _refuse(vlm.text_types is None or family.model_type in vlm.text_types, vlm.model_type,
            f"a {family.model_type} decoder")
    data = {"architectures": [vlm.architecture], "model_type": vlm.model_type,
            "image_token_index": config.image_token_id, "text_config": text,
            "vision_config": vision_config(config.vision), "tie_word_embeddings": config.decoder.tie_embeddings,
            "vocab_size": config.decoder.vocab_size, "bos_token_id": text["bos_token_id"],
            "eos_token_id": text["eos_token_id"], "pad_token_id": text["pad_token_id"]}
    for key, value in vlm.write(config).items():  # (its fields of the sub-configs join theirs)
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return data, family, "vlm"


def preprocessor_config(p: ImageProcessing, processor: str, processor_type: str | None = None) -> dict:
    """`preprocessor_config.json` for the image processing the config records (a "clip" or "siglip" processor,
    or the vision-language family's own `processor_type`)."""
    pan_and_scan = {} if p.pan_and_scan is None else {
        "do_pan_and_scan": True, "pan_and_scan_min_crop_size": p.pan_and_scan.min_crop_size,
        "pan_and_scan_max_num_crops": p.pan_and_scan.max_crops,
        "pan_and_scan_min_ratio_to_activate": p.pan_and_scan.min_ratio}
    if processor_type is None:
        processor_type = "CLIPImageProcessor" if processor == "clip" else "SiglipImageProcessor"
    statistics = {"resample": p.resample, "do_rescale": p.rescale_factor is not None,
                  "rescale_factor": p.rescale_factor or 1 / 255, "do_normalize": p.mean is not None,
                  "image_mean": list(p.mean or (0.5,) * 3), "image_std": list(p.std or (0.5,) * 3),
                  "do_convert_rgb": True}
    if p.patches is not None:  # Qwen2VLImageProcessor: each image's own size within a pixel range
        g = p.patches
        return {"image_processor_type": processor_type, "do_resize": True, **statistics,
                "size": {"shortest_edge": g.min_pixels, "longest_edge": g.max_pixels}, "min_pixels": g.min_pixels,
                "max_pixels": g.max_pixels, "patch_size": g.patch_size, "temporal_patch_size": g.temporal_patch_size,
                "merge_size": g.merge_size}
    return {"image_processor_type": processor_type, **pan_and_scan,
            "do_resize": p.size is not None or p.shortest_edge is not None,
            "size": {"shortest_edge": p.shortest_edge} if p.shortest_edge is not None
            else {"height": p.size[0], "width": p.size[1]} if p.size is not None else None,
            "do_center_crop": p.crop_size is not None,
            **({"crop_size": {"height": p.crop_size[0], "width": p.crop_size[1]}} if p.crop_size else {}),
            **statistics}


def _file_name(canonical: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        if canonical.startswith(old):
            return new + canonical[len(old):]
    return canonical


def hf_tensors(config: ModelConfig, params, layout_kind: str):
    """(file name, numpy tensor) for every tensor of the Hugging Face checkpoint, in the tables' order."""
    flat = {checkpoint.param_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    renames = vision_language_family_of(config).file_names if layout_kind == "vlm" else FILE_NAMES[layout_kind]
    for name, rule in tensor_rules(config).items():
        pieces = [(*tables.stacked_slice(path), transform) for path, transform in rule.targets]
        dtype = flat[pieces[0][0]].dtype
        source = jax.ShapeDtypeStruct(rule.shape, dtype)
        total = None
        for path, index, transform in pieces:
            value = np.asarray(flat[path]) if index is None else np.asarray(flat[path][index])
            (part,) = jax.linear_transpose(lambda w, t=transform: t(w), source)(value)
            total = part if total is None else total + part
        yield _file_name(name, renames), np.asarray(total)


def export(model, out_dir: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Writes `model` (a `jaxvlm.Model`) as a Hugging Face checkpoint folder `out_dir` and returns its path:
    config.json, model.safetensors (or shards past `max_shard_bytes`, with their index), the tokenizer and
    processor files it was loaded with (a preprocessor_config.json from its image processing when it has
    none). LoRA adapters are merged first; stacked layers are unrolled. All or nothing, like `convert`."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ExportError(f"max_shard_bytes must be a positive int (bytes per safetensors file), got {max_shard_bytes!r}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir):
        raise ExportError(f"{out_dir}: already exists; export into a new folder")
    if model.config.quantization is not None:
        raise ExportError("this model's weights are int8; export the float checkpoint it was quantized from")
    if model.config.lora is not None:
        model = model.merge_lora()
    config, params = model.config, model.params
    if layout.is_stacked(params):
        params = jax.jit(lambda p: layout.relayout(p, stacked=False))(params)
    data, family, layout_kind = hf_config(config)
    data["dtype"] = np.dtype(model.dtype).name
    copies = {} if model.tokenizer is None else model.tokenizer.files  # as read when the model was loaded
    with files.writing(out_dir) as tmp:
        _write_tensors(tmp, hf_tensors(config, params, layout_kind), max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(data, f, indent=2)
        for name, content in copies.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(content)
        # transformers' AutoProcessor reads the processor's settings (image tokens per image, ...) from these
        vl_family = vision_language_family_of(config) if config.is_vlm else None
        processor, image_processor = vl_family.processor(config) if vl_family else ({}, {})
        if config.image_processing is not None and "preprocessor_config.json" not in copies:
            processor_type = vl_family.image_processor_type if vl_family else None
            with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
                json.dump({**preprocessor_config(config.image_processing, vision_family_of(config.vision).processor,
                                                 processor_type), **image_processor}, f, indent=2)
        if config.generation is not None:  # the sampling defaults it was loaded with, as transformers reads them
            g = config.generation
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump({"do_sample": g.do_sample, "temperature": g.temperature, "top_k": g.top_k or 0,
                           "top_p": g.top_p, "repetition_penalty": g.repetition_penalty,
                           "min_new_tokens": g.min_new_tokens,
                           **({"max_new_tokens": g.max_new_tokens} if g.max_new_tokens else {}),
                           "eos_token_id": list(config.tokens.eos_ids), "pad_token_id": config.tokens.pad_id,
                           **({"bos_token_id": config.tokens.bos_id} if config.tokens.bos_id is not None else {})},
                          f, indent=2)
        if processor and "processor_config.json" not in copies:
            with open(os.path.join(tmp, "processor_config.json"), "w") as f:
                json.dump(processor, f, indent=2)
    return out_dir


def _write_tensors(folder: str, tensors, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards of at most `max_shard_bytes` (a larger
    tensor alone in its shard) with model.safetensors.index.json."""
    from safetensors.numpy import save_file
    size, total, written = 0, 0, []
    pending: dict[str, np.ndarray] = {}

    def flush():
        if pending:
            name = f"shard-{len(written)}.tmp"
            save_file(dict(pending), os.path.join(folder, name), metadata={"format": "pt"})
            written.append((name, list(pending)))
            pending.clear()

    for name, tensor in tensors:
        if pending and size + tensor.nbytes > max_shard_bytes:
            flush()
            size = 0
        pending[name] = np.ascontiguousarray(tensor)
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    if len(written) == 1:
        os.replace(os.path.join(folder, written[0][0]), os.path.join(folder, "model.safetensors"))
        return
    weight_map = {}
    for i, (tmp_name, names) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(os.path.join(folder, tmp_name), os.path.join(folder, final))
        weight_map.update({n: final for n in names})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
