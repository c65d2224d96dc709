"""Hugging Face checkpoint folder -> jaxvlm checkpoint folder (orbax params + config + tokenizer files)."""

from __future__ import annotations

import dataclasses
import os

import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert import tables
from convert.hf_config import model_config
from convert.readers import FLOAT_DTYPES, CheckpointError, TensorReader
from jaxvlm import checkpoint
from jaxvlm.checkpoint import quantize_host
from jaxvlm.config import QUANTIZE_MODES, QuantizationConfig
from jaxvlm.quantize import SCALE_SUFFIX
from jaxvlm import files as checkpoint_files
from jaxvlm.images import PROCESSOR_FILES
from jaxvlm.tokenizer import TOKENIZER_FILES

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _first_of(names: list[str]) -> str:
    return repr(names[0]) + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def convert(hf_dir: str, out_dir: str, dtype: str | None = None, progress: bool = True, quantize: str | None = None,
            group_size: int | None = None) -> str:
    """Converts `hf_dir` into `out_dir` and returns `out_dir`.

    `quantize='int8'` stores every projection, the embedding and the output head as int8 with float32
    scales (per output channel, or per `group_size` inputs; see `jaxvlm.quantize`), each tensor quantized
    as it is read: the folder loads as int8 without the float weights ever being whole in memory.

    Tensors are read, checked against the shape the config predicts and for a float dtype, re-laid out
    and cast one at a time. Everything is written into a temporary folder beside `out_dir` that is renamed
    at the end, so a failed or interrupted conversion leaves nothing behind; that folder is made before
    any tensor is read, so an unwritable destination is reported first.
    """
    hf_dir, out_dir = os.fspath(hf_dir), os.path.abspath(os.fspath(out_dir))
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such checkpoint folder")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise CheckpointError(f"--quantize must be one of {list(QUANTIZE_MODES)}, got {quantize!r}")
    if group_size is not None and quantize is None:
        raise CheckpointError("--group-size is the int8 scales' group: give it with --quantize int8")
    if os.path.lexists(out_dir):
        raise CheckpointError(f"{out_dir}: output folder already exists")
    config, text_family, layout = model_config(hf_dir)
    rules = tables.expand(config, text_family)
    contracted = {}
    if quantize is not None:
        contracted = checkpoint.contracted_axes(config)
        config = dataclasses.replace(config, quantization=QuantizationConfig(mode=quantize, group_size=group_size))
        try:  # a group size that does not divide some weight's inputs, before any tensor is read
            checkpoint.abstract_params(config)
        except ValueError as e:
            raise CheckpointError(f"{hf_dir}: {e}") from None
    copies = [p for n in TOKENIZER_FILES + PROCESSOR_FILES if (p := checkpoint_files.optional_file(hf_dir, n))]

    with TensorReader(hf_dir) as reader:
        names = _match_names(hf_dir, reader, rules, config, text_family, layout)
        for name, rule in rules.items():
            file_name, stored = names[name], reader.dtype(names[name])
            if reader.shape(file_name) != rule.shape:
                raise CheckpointError(f"{hf_dir}: tensor {file_name!r} has shape {list(reader.shape(file_name))}, "
                                      f"config.json predicts {list(rule.shape)}")
            if stored not in FLOAT_DTYPES.values():
                raise CheckpointError(f"{reader.file(file_name)}: tensor {file_name!r} is stored as {stored}; "
                                      f"weights must be floats ({', '.join(FLOAT_DTYPES.values())})")
        # bfloat16 checkpoints stay bfloat16; any other mix becomes float32, which holds float16, bfloat16
        # and float32 values exactly (float64 ones are rounded).
        stored = {reader.dtype(names[n]) for n in rules}
        target = DTYPES[dtype or ("bfloat16" if stored == {"bfloat16"} else "float32")]

        # Params are written a part at a time (a layer, or a module such as the embedding: see
        # `checkpoint.part_of`), each as soon as its tensors are read, so that memory holds one part.
        parts: dict[str, dict[str, list]] = {}  # part -> tensor -> its (path, transform) in the part
        for name, rule in rules.items():
            for path, transform in rule.targets:
                parts.setdefault(checkpoint.part_of(path), {}).setdefault(name, []).append((path, transform))

        with checkpoint_files.writing(out_dir) as tmp, \
                tqdm(total=len(rules), desc="converting", unit="tensor", disable=not progress) as bar:
            # Tensors are handed to orbax as the numpy arrays read (converted in place where the dtype
            # allows): a part in memory is one copy of its tensors, and orbax's writing one more.
            for part, tensors in parts.items():
                params: dict = {}
                for name, targets in tensors.items():
                    source = reader.get(names[name])
                    for path, transform in targets:
                        value = np.asarray(transform(source), dtype=target)
                        # checked after the cast, which also catches float64 values past the target's range
                        if not np.isfinite(value).all():
                            raise CheckpointError(f"{reader.file(names[name])}: tensor {names[name]!r} holds NaN "
                                                  f"or infinite values (as {np.dtype(target).name})")
                        if path in contracted:
                            q, scale = quantize_host(value, contracted[path], group_size, path)
                            _set(params, path, q)
                            _set(params, path + SCALE_SUFFIX, scale)
                        else:
                            _set(params, path, value)
                    del source, value
                checkpoint.save_params(tmp, params, part=part)
                del params
                bar.update(len(tensors))
            checkpoint.write_files(tmp, config, copies)
    return out_dir


def _match_names(hf_dir, reader, rules, config, text_family, layout) -> dict[str, str]:
    """canonical name -> the file's name (errors quote the file's spelling), every predicted tensor
    present and none unexpected."""
    names, renames = {}, set()
    for n in reader.names():
        if not n.endswith(tables.IGNORED_SUFFIXES):
            canonical, rename = tables.canonical_name(n, layout)
            names[canonical] = n
            renames.update([rename] if rename else [])
    if config.decoder is not None and config.decoder.tie_embeddings:
        names.pop("lm_head.weight", None)  # some files carry the tied head anyway; it is the embedding
    missing = [tables.file_name(n, renames) for n in rules if n not in names]
    if missing:
        raise CheckpointError(f"{hf_dir}: missing tensor {_first_of(missing)}")
    unexpected = [file_name for n, file_name in names.items() if n not in rules]
    if unexpected:
        model_type = text_family if layout == "text" else layout
        raise CheckpointError(f"{hf_dir}: unexpected tensor {_first_of(unexpected)} for this {model_type!r} "
                              "config.json")
    return names
