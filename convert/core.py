"""Hugging Face checkpoint folder -> jaxvlm checkpoint folder (orbax params + config + tokenizer files)."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert import tables
from convert.families import tensor_rules
from convert.hf_config import model_config
from convert.readers import FLOAT_DTYPES, WEIGHT_FILES, CheckpointError, TensorReader
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
    and cast one at a time (see `HFCheckpoint`). Everything is written into a temporary folder beside
    `out_dir` that is renamed at the end, so a failed or interrupted conversion leaves nothing behind; that
    folder is made before any tensor is read, so an unwritable destination is reported first.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    with HFCheckpoint(hf_dir, dtype, quantize, group_size, before_reading=lambda: _check_new(out_dir)) as source, \
            checkpoint_files.writing(out_dir) as tmp, \
            tqdm(total=source.tensor_count, desc="converting", unit="tensor", disable=not progress) as bar:
        # Params are written a part at a time (a layer, or a module such as the embedding: see
        # `checkpoint.part_of`), each as soon as its tensors are read, so that memory holds one part.
        for part, params, tensors in source.parts():
            checkpoint.save_params(tmp, params, part=part)
            del params
            bar.update(tensors)
        checkpoint.write_files(tmp, source.config, source.copies)
    return out_dir


def _check_new(out_dir: str) -> None:
    if os.path.lexists(out_dir):
        raise CheckpointError(f"{out_dir}: output folder already exists")


def is_hf_folder(path: str) -> bool:
    """Whether `path` is an unconverted Hugging Face checkpoint folder (a config.json and weight files that
    transformers writes, no jaxvlm `params` folder) rather than a jaxvlm one."""
    return (os.path.lexists(os.path.join(path, "config.json"))
            and not os.path.lexists(os.path.join(path, checkpoint.PARAMS_DIR))
            and any(os.path.lexists(os.path.join(path, name)) for name in WEIGHT_FILES))


class HFCheckpoint:
    """A Hugging Face checkpoint folder read as jaxvlm params, a part at a time:

        with HFCheckpoint(hf_dir) as source:       # config read, every tensor's name, shape and dtype checked
            for part, params, tensors in source.parts():   # params: a nested dict of numpy arrays
                ...

    `source.config` is the jaxvlm config and `source.copies` the tokenizer and processor files to carry
    along. `dtype` (float32, bfloat16; default: bfloat16 for a bfloat16 checkpoint, else float32),
    `quantize` and `group_size` are as for `convert`. `before_reading` runs once everything but the
    tensors' values has been checked.
    """

    def __init__(self, hf_dir: str, dtype: str | None = None, quantize: str | None = None,
                 group_size: int | None = None, before_reading=lambda: None):
        hf_dir = os.fspath(hf_dir)
        if not os.path.isdir(hf_dir):
            raise CheckpointError(f"{hf_dir}: no such checkpoint folder")
        if dtype is not None and dtype not in DTYPES:
            raise CheckpointError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if quantize is not None and quantize not in QUANTIZE_MODES:
            raise CheckpointError(f"--quantize must be one of {list(QUANTIZE_MODES)}, got {quantize!r}")
        if group_size is not None and quantize is None:
            raise CheckpointError("--group-size is the int8 scales' group: give it with --quantize int8")
        before_reading()
        self.hf_dir, self.dtype, self.group_size = hf_dir, dtype, group_size
        config, self.text_family, self.layout = model_config(hf_dir)
        self.rules = tensor_rules(config)
        self.contracted = {}
        if quantize is not None:
            self.contracted = checkpoint.contracted_axes(config)
            config = dataclasses.replace(config, quantization=QuantizationConfig(mode=quantize, group_size=group_size))
            try:  # a group size that does not divide some weight's inputs, before any tensor is read
                checkpoint.abstract_params(config)
            except ValueError as e:
                raise CheckpointError(f"{hf_dir}: {e}") from None
        self.config = config
        self.copies = checkpoint_files.snapshot(hf_dir, TOKENIZER_FILES + PROCESSOR_FILES)
        self.tensor_count = len(self.rules)
        self._reader = None

    def __enter__(self) -> "HFCheckpoint":
        hf_dir, rules = self.hf_dir, self.rules
        self._reader = reader = TensorReader(hf_dir).__enter__()
        try:
            self._names = names = _match_names(hf_dir, reader, rules, self.config, self.text_family, self.layout)
            for name, rule in rules.items():
                file_name, stored = names[name], reader.dtype(names[name])
                if reader.shape(file_name) != rule.shape:
                    raise CheckpointError(f"{hf_dir}: tensor {file_name!r} has shape {list(reader.shape(file_name))}, "
                                          f"config.json predicts {list(rule.shape)}")
                if stored not in FLOAT_DTYPES.values():
                    raise CheckpointError(f"{reader.file(file_name)}: tensor {file_name!r} is stored as {stored}; "
                                          f"weights must be floats ({', '.join(FLOAT_DTYPES.values())})")
        except BaseException:
            reader.__exit__(None, None, None)
            raise
        # bfloat16 checkpoints stay bfloat16; any other mix becomes float32, which holds float16, bfloat16
        # and float32 values exactly (float64 ones are rounded).
        stored = {reader.dtype(names[n]) for n in rules}
        self.target = DTYPES[self.dtype or ("bfloat16" if stored == {"bfloat16"} else "float32")]
        return self

    def __exit__(self, *exc) -> None:
        self._reader.__exit__(*exc)

    def parts(self) -> Iterator[tuple[str, dict, int]]:
        """(part name, its params as a nested dict of numpy arrays, the tensors read for it), a part at a
        time; each tensor is checked to be finite after its cast."""
        reader, names, target = self._reader, self._names, self.target
        parts: dict[str, dict[str, list]] = {}  # part -> tensor -> its (path, transform) in the part
        for name, rule in self.rules.items():
            for path, transform in rule.targets:
                part = checkpoint.part_of(tables.stacked_slice(path)[0])
                parts.setdefault(part, {}).setdefault(name, []).append((path, transform))
        # Tensors are handed on as the numpy arrays read (converted in place where the dtype allows): a
        # part in memory is one copy of its tensors.
        for part, tensors in parts.items():
            values: dict[str, np.ndarray] = {}
            slices: dict[str, dict[int, np.ndarray]] = {}  # a stacked param's slices, one tensor each
            for name, targets in tensors.items():
                source = reader.get(names[name])
                for path, transform in targets:
                    value = np.asarray(transform(source), dtype=target)
                    # checked after the cast, which also catches float64 values past the target's range
                    if not np.isfinite(value).all():
                        raise CheckpointError(f"{reader.file(names[name])}: tensor {names[name]!r} holds NaN "
                                              f"or infinite values (as {np.dtype(target).name})")
                    base, index = tables.stacked_slice(path)
                    if index is None:
                        values[path] = value
                    else:
                        slices.setdefault(base, {})[index] = value
                del source, value
            params = self._tree(values, slices)
            del values, slices
            yield part, params, len(tensors)
            del params

    def _tree(self, values: dict[str, np.ndarray], slices: dict[str, dict[int, np.ndarray]]) -> dict:
        """A part's params as a nested dict: stacked params from their slices, int8 with their scales where
        quantized. (A function of its own, so that no local name keeps a tensor alive once the part is
        written.)"""
        for base, pieces in slices.items():
            values[base] = np.stack([pieces[i] for i in range(len(pieces))])
        params: dict = {}
        for path, value in values.items():
            if path in self.contracted:
                q, scale = quantize_host(value, self.contracted[path], self.group_size, path)
                _set(params, path, q)
                _set(params, path + SCALE_SUFFIX, scale)
            else:
                _set(params, path, value)
        return params


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
        model_type = text_family.model_type if layout == "text" else layout
        raise CheckpointError(f"{hf_dir}: unexpected tensor {_first_of(unexpected)} for this {model_type!r} "
                              "config.json")
    return names
