"""Hugging Face checkpoint folder -> jaxvlm checkpoint folder (orbax params + config + tokenizer files)."""

from __future__ import annotations

import os

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert import tables
from convert.hf_config import model_config
from convert.readers import CheckpointError, TensorReader
from jaxvlm import checkpoint
from jaxvlm.tokenizer import TOKENIZER_FILES

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Carried along for reference: their content is already in the jaxvlm config.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _first_of(names: list[str]) -> str:
    return repr(names[0]) + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def convert(hf_dir: str, out_dir: str, dtype: str | None = None, progress: bool = True) -> str:
    """Converts `hf_dir` into `out_dir` and returns `out_dir`.

    Tensors are read, checked against the shape the config predicts, re-laid out and cast one at a time.
    Everything is written into a temporary folder beside `out_dir` that is renamed at the end, so a failed
    conversion leaves nothing behind.
    """
    hf_dir, out_dir = os.fspath(hf_dir), os.path.abspath(os.fspath(out_dir))
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such checkpoint folder")
    if os.path.exists(out_dir):
        raise CheckpointError(f"{out_dir}: output folder already exists")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config, text_family, layout = model_config(hf_dir)
    rules = tables.expand(config, text_family)

    with TensorReader(hf_dir) as reader:
        # canonical name -> the file's name: errors quote the file's spelling
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
        for name, rule in rules.items():
            if reader.shape(names[name]) != rule.shape:
                raise CheckpointError(f"{hf_dir}: tensor {names[name]!r} has shape {list(reader.shape(names[name]))}, "
                                      f"config.json predicts {list(rule.shape)}")
        # By default bfloat16 checkpoints stay bfloat16 and everything else becomes float32.
        target = DTYPES[dtype or ("bfloat16" if reader.is_bfloat16(names[next(iter(rules))]) else "float32")]

        # Each tensor is copied (so the output owns its memory and the source, often memory-mapped, can
        # go) straight into a host-side jax array, the form orbax writes: saving makes no second copy.
        cpu = jax.devices("cpu")[0]
        params: dict = {}
        for name, rule in tqdm(rules.items(), desc="converting", unit="tensor", disable=not progress):
            source = reader.get(names[name])
            for path, transform in rule.targets:
                _set(params, path, jax.device_put(np.array(transform(source), dtype=target), cpu))
            del source

    files = [os.path.join(hf_dir, n) for n in TOKENIZER_FILES + PROCESSOR_FILES
             if os.path.isfile(os.path.join(hf_dir, n))]
    checkpoint.save_model(out_dir, config, params, files)
    return out_dir
