"""Params on disk: an orbax checkpoint in `params/`, beside the model's `config.json`."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxvlm.config import ModelConfig
from jaxvlm.vlm import VisionLanguageModel

PARAMS_DIR = "params"


def abstract_params(config: ModelConfig, dtype=jnp.float32):
    """The params tree the config predicts, as ShapeDtypeStructs (nothing is allocated)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    size = config.vision.image_size if config.vision is not None else 1
    pixels = jnp.zeros((1, size, size, 3), jnp.float32)
    init = lambda: VisionLanguageModel(config, dtype).init(jax.random.key(0), tokens, pixels,
                                                           method="initialize")["params"]
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), jax.eval_shape(init))


def save_params(directory: str | os.PathLike, params) -> None:
    path = os.path.abspath(os.path.join(directory, PARAMS_DIR))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)
        ckptr.wait_until_finished()


def save_model(directory: str | os.PathLike, config: ModelConfig, params, files: Iterable[str] = ()) -> str:
    """Writes a loadable model folder: `config.json`, the params and copies of `files` (tokenizer and
    processor files). It is written into a temporary folder beside `directory` and renamed at the end,
    so an interrupted save leaves no half-written model behind."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        raise FileExistsError(f"{directory}: output folder already exists")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any folder
        save_params(tmp, params)
        config.save(tmp)
        for path in files:
            shutil.copy2(path, tmp)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def stored_dtype(directory: str | os.PathLike):
    """The dtype the params were saved in (taken from the first array)."""
    path = os.path.abspath(os.path.join(directory, PARAMS_DIR))
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata
    return jnp.dtype(jax.tree.leaves(meta)[0].dtype)


def load_params(directory: str | os.PathLike, config: ModelConfig, dtype):
    """Restores params as `dtype`, checking the tree against what `config` predicts."""
    path = os.path.abspath(os.path.join(directory, PARAMS_DIR))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no params checkpoint (convert a Hugging Face folder with `jaxvlm convert`)")
    target = abstract_params(config, dtype)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(path, target)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: params do not match {os.path.join(directory, 'config.json')}: {e}") from None
