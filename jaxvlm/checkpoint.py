"""Params on disk: an orbax checkpoint in `params/`, beside the model's `config.json` and a
`checksums.json` of every file, so a damaged folder is named at load instead of misread."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from types import MappingProxyType
from typing import Iterable, Mapping

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers

from jaxvlm import files, layers, layout, lora, quantize
from jaxvlm.config import ModelConfig, QuantizationConfig
from jaxvlm.files import FileError, error_line
from jaxvlm.patches import Patches
from jaxvlm.sharding import MeshRules
from jaxvlm.vlm import VisionLanguageModel

PARAMS_DIR = "params"


@functools.partial(jax.jit, static_argnames=("config", "dtype", "scan_layers"))
def _init_boxed(config: ModelConfig, key: jax.Array, dtype, scan_layers: bool):
    """Freshly initialised params, each still boxed with the logical names of its axes. One compiled
    program: run op by op, every initializer of every shape would compile on its own (a tiny model's
    ~190 programs took 19 s on 2 CPU cores; jitted, one program)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    if config.vision is not None and config.vision.image_size is None:  # one merged square of patches
        pixels = Patches.blank(config.vision)
    else:
        size = config.vision.image_size if config.vision is not None else 1
        pixels = jnp.zeros((1, size, size, 3), jnp.float32)
    model = VisionLanguageModel(config, dtype, scan_layers=scan_layers)
    return model.init(key, tokens, pixels, method="initialize")["params"]


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, scan_layers: bool = False):
    """Randomly initialised params (plain arrays), for training from scratch. With `scan_layers` each
    stack of layers is one [L, ...] subtree (see `jaxvlm.layout`)."""
    return nn.meta.unbox(_init_boxed(config, key, dtype, scan_layers))


def abstract_params(config: ModelConfig, dtype=jnp.float32, scan_layers: bool = False):
    """The params tree the config predicts, as ShapeDtypeStructs (nothing is allocated): `dtype` floats,
    and for a quantized config int8 weights with their float32 scales."""
    boxed = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0), dtype, scan_layers))
    tree = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), nn.meta.unbox(boxed))
    if config.lora is not None:
        tree = lora.attach(tree, _adapters(config, tree, scan_layers,
                                           lambda shape, name, role: jax.ShapeDtypeStruct(shape, dtype)))
    if config.quantization is None:
        return tree
    contracted, group_size = contracted_axes(config, scan_layers), config.quantization.group_size
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:  # a group size that does not divide,
        if (name := param_name(path)) in contracted:  # named here rather than from inside a trace
            quantize.scale_shape(leaf.shape, contracted[name], group_size, name)
    return jax.eval_shape(lambda t: quantize.quantize_params(t, contracted, group_size), tree)


def param_axes(config: ModelConfig, scan_layers: bool = False):
    """The params tree with, at each leaf, the logical names of the param's axes (a PartitionSpec such as
    P('embed', 'heads', 'head_dim'); stacked layers add a leading 'layers'), as the layers declare them.
    An int8 weight's scale is named as the weight."""
    boxed = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0), jnp.float32, scan_layers))
    axes = nn.get_partition_spec(boxed)
    if config.lora is not None:  # an adapter's axes are its kernel's inputs or outputs, and the rank
        named = {param_name(p): spec for p, spec in jax.tree_util.tree_flatten_with_path(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
        contracted = contracted_axes(config, scan_layers)

        def adapter(shape, name, role):
            inputs = {i % len(named[name]) for i in contracted[name]}
            kept = [a for i, a in enumerate(named[name]) if (i in inputs) == (role == "in")]
            return jax.sharding.PartitionSpec(*kept, None) if role == "in" else jax.sharding.PartitionSpec(None, *kept)
        axes = lora.attach(axes, _adapters(config, nn.meta.unbox(boxed), scan_layers, adapter))
    return axes if config.quantization is None else quantize.scale_axes(axes, contracted_axes(config, scan_layers))


def _adapters(config: ModelConfig, tree, scan_layers: bool, make) -> dict:
    """The LoRA adapters' tree that `config.lora` adds to the params `tree` (see `jaxvlm.lora.abstract`)."""
    if scan_layers:
        raise ValueError("LoRA adapters kept beside their kernels need unrolled layers (scan_layers=False); "
                         "merge them into the kernels (Model.merge_lora) to stack the layers")
    kernels = {param_name(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return lora.abstract(config.lora, contracted_axes(config, scan_layers), kernels, make)


def contracted_axes(config: ModelConfig, scan_layers: bool = False) -> dict[str, tuple[int, ...]]:
    """'decoder/layer_0/attn/q/kernel' -> the axes a product contracts, counted from the end (the
    weight's inputs), for every weight that a product contracts: each projection's kernel and the
    embedding. Norm scales, biases, position embeddings and the conv patch embedding are absent."""
    boxed = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0), jnp.float32, scan_layers))
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {param_name(path): box.contracted for path, box in flat
            if isinstance(box, layers.Weight) and box.contracted}


def param_name(path) -> str:
    """'decoder/layer_0/attn/q/kernel' for a tree path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


@jax.jit
def all_finite(tree) -> jax.Array:
    """bool[]: every value of every array of `tree` is finite (computed where the arrays live)."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def check_finite(params, where: str) -> None:
    """Refuses to write NaN or infinite weights, naming the first such param."""
    if all_finite(params):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jnp.isfinite(leaf).all():
            raise ValueError(f"{where}: param {param_name(path)} holds NaN or infinite values; not saved")


def check_scales(params, where: str) -> None:
    """Refuses int8 scales that are not finite and positive (a damaged or hand-edited folder), naming
    the first such scale."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = param_name(path)
        if name.endswith(quantize.SCALE_SUFFIX) and not _positive(leaf):
            raise FileError(f"{where}: int8 scale {name} holds values that are not finite and positive")


@jax.jit
def _positive(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x) & (x > 0))


def quantize_params(config: ModelConfig, params, group_size: int | None, shard: MeshRules | None = None):
    """Float params -> (the quantized config, int8 params with their scales; see `jaxvlm.quantize`),
    placed by `shard`'s rules on its mesh. Each weight is quantized alone, so the transient memory is
    that of one weight; the float params stay whole until the end (`jaxvlm convert --quantize int8`
    writes a folder that loads without them)."""
    quantized = dataclasses.replace(config, quantization=QuantizationConfig(group_size=group_size))
    stacked = layout.is_stacked(params)
    contracted = contracted_axes(config, stacked)
    abstract = abstract_params(quantized, jnp.float32, stacked)  # checks group_size against every weight
    params = quantize.quantize_params(params, contracted, group_size, one=quantize_one)
    if shard is not None:
        params = jax.device_put(params, shard.params(param_axes(quantized, stacked), abstract))
    return quantized, params


@functools.partial(jax.jit, static_argnames=("contracted", "group_size", "name"))
def quantize_one(w, contracted, group_size, name):
    """`jaxvlm.quantize.quantize`, compiled (once per shape)."""
    return quantize.quantize(w, contracted, group_size, name)


def quantize_host(w: np.ndarray, contracted: tuple[int, ...], group_size: int | None, name: str,
                  chunk_bytes: int = 2 ** 28) -> tuple[np.ndarray, np.ndarray]:
    """`quantize_one` on a host array, a slice of its outputs at a time (along its longest output axis),
    so that the float32 temporaries stay within `chunk_bytes` however large the weight (a 257k-token
    embedding is 2.1 GB in float32)."""
    inputs = {i % w.ndim for i in contracted}
    axis = max((i for i in range(w.ndim) if i not in inputs), key=lambda i: w.shape[i])
    step = max(1, chunk_bytes // (4 * (w.size // w.shape[axis])))
    q = np.empty(w.shape, np.int8)
    scale = np.empty(quantize.scale_shape(w.shape, contracted, group_size, name), np.float32)
    for start in range(0, w.shape[axis], step):
        part = (slice(None),) * axis + (slice(start, start + step),)
        q[part], scale[part] = map(np.asarray, quantize_one(w[part], contracted, group_size, name))
    return q, scale


def compare_trees(saved, expected, where: str, source: str = "this model") -> None:
    """A named error for the first param missing from either tree or of another shape."""
    flat_saved = {param_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    flat_now = {param_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    for key in sorted(set(flat_saved) | set(flat_now)):
        if key not in flat_now:
            raise ValueError(f"{where}: the checkpoint has param {key}, which {source} lacks")
        if key not in flat_saved:
            raise ValueError(f"{where}: the checkpoint lacks param {key}, which {source} has")
        if tuple(flat_saved[key].shape) != tuple(flat_now[key].shape):
            raise ValueError(f"{where}: param {key} has shape {tuple(flat_saved[key].shape)} in the checkpoint but "
                             f"{tuple(flat_now[key].shape)} in {source}")


def save_params(directory: str | os.PathLike, params, part: str | None = None) -> None:
    """Writes `params` as the orbax checkpoint `directory/params`, or, given `part` (see `part_of`), as
    the part `directory/params/<part>` of params written a part at a time (a converter writes each
    layer as soon as it is read, so the whole tree is never in memory)."""
    path = os.path.abspath(os.path.join(directory, PARAMS_DIR, *([part] if part else [])))
    # A synchronous save of arrays nobody changes meanwhile: host (numpy) arrays need no defensive copy,
    # which would double the memory a part takes.
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_SAVE_HANDLERS)
    with ocp.Checkpointer(handler) as ckptr:  # leaving the block waits for orbax's writer threads
        ckptr.save(path, ocp.args.PyTreeSave(params))


_SAVE_HANDLERS = type_handlers.create_type_handler_registry(
    (jax.Array, type_handlers.ArrayHandler()), (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)))


_LAYER = re.compile(r"layer_\d+|" + layout.STACKED)


def part_of(name: str) -> str:
    """The part of params written a part at a time that param `name` ('decoder/layer_3/attn/q/kernel')
    belongs to: its layer ('decoder.layer_3'), or else the module that holds it ('decoder.embedder')."""
    keys = name.split("/")
    return ".".join(keys[:2] if len(keys) > 2 and _LAYER.fullmatch(keys[1]) else keys[:max(1, len(keys) - 1)])


def write_files(directory: str, config: ModelConfig, copies: Mapping[str, bytes] = MappingProxyType({})) -> None:
    """Writes `config.json`, the files `copies` (name -> contents: the tokenizer and processor files a model
    was loaded with) and `checksums.json` into `directory`, whose params are written: the last step of a
    model folder."""
    config.save(directory)
    for name, data in copies.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    files.write_checksums(directory)


def write_model(directory: str, config: ModelConfig, params, copies: Mapping[str, bytes] = MappingProxyType({})) -> None:
    """Writes the params and then the files of `write_files` into the existing, empty folder `directory`.
    (The converter checks each tensor as it reads it; `save_model` checks the whole tree.)"""
    save_params(directory, params)
    write_files(directory, config, copies)


def save_model(directory: str | os.PathLike, config: ModelConfig, params,
               copies: Mapping[str, bytes] = MappingProxyType({})) -> str:
    """Writes a loadable model folder (see `write_model`) all at once: into a temporary folder renamed at
    the end, so an interrupted or failed save leaves nothing behind. Non-finite weights are refused."""
    check_finite(params, os.path.abspath(os.fspath(directory)))
    with files.writing(directory) as tmp:
        write_model(tmp, config, params, copies)
    return os.path.abspath(os.fspath(directory))


def params_path(directory: str | os.PathLike) -> str:
    """`directory/params`, checked to exist and to hold nothing that resolves outside `directory`."""
    directory = os.fspath(directory)
    path = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(path):
        raise FileError(f"{path}: no params checkpoint (convert a Hugging Face folder with `jaxvlm convert`)")
    if not any(names for _, _, names in os.walk(path)):
        raise FileError(f"{path}: the params folder is empty")
    return os.path.abspath(files.check_tree_inside(directory, PARAMS_DIR))


def _parts(directory: str | os.PathLike) -> list[str]:
    """The orbax checkpoints the params are stored in: `params` itself, or each part of params written a
    part at a time (`save_params(..., part=)`)."""
    path = params_path(directory)
    if os.path.exists(os.path.join(path, "_METADATA")):
        return [path]
    return sorted(os.path.join(path, name) for name in os.listdir(path) if os.path.isdir(os.path.join(path, name)))


def _merge(into: dict, tree: dict) -> dict:
    for key, value in tree.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def _restricted(tree, keep) -> dict:
    """The nested dict of the leaves of `tree` whose name `keep` accepts."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if keep(name := param_name(path)):
            node = out
            *parents, last = name.split("/")
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = leaf
    return out


def stored_metadata(directory: str | os.PathLike):
    """The saved params tree's shapes and dtypes, read without the data."""
    tree: dict = {}
    for path in _parts(directory):
        try:
            with ocp.StandardCheckpointer() as ckptr:
                meta = ckptr.metadata(path).item_metadata
        except Exception as e:  # orbax raises IndexError, KeyError, ValueError... for damaged folders
            raise FileError(f"{path}: not a readable params checkpoint ({error_line(e)})") from None
        part = getattr(meta, "tree", meta)  # orbax's TreeMetadata wraps the saved tree
        if not jax.tree.leaves(part):  # orbax only warns when it finds no metadata
            raise FileError(f"{path}: not a readable params checkpoint (its metadata is missing or damaged)")
        _merge(tree, dict(part))
    return tree


def stored_dtype(directory: str | os.PathLike):
    """The dtype the params were saved in: bfloat16 when every float array is (int8 weights' scales
    aside), else float32 (which holds the values of every other float dtype exactly)."""
    flat = jax.tree_util.tree_flatten_with_path(stored_metadata(directory))[0]
    dtypes = {jnp.dtype(leaf.dtype) for path, leaf in flat
              if jnp.dtype(leaf.dtype) != jnp.int8 and not param_name(path).endswith(quantize.SCALE_SUFFIX)}
    return jnp.dtype(jnp.bfloat16) if dtypes == {jnp.dtype(jnp.bfloat16)} else jnp.dtype(jnp.float32)


def load_params(directory: str | os.PathLike, config: ModelConfig, dtype, shard: MeshRules | None = None,
                scan_layers: bool | None = None):
    """Restores params as `dtype`, checking the tree against what `config` predicts. With `shard`, each
    param is read straight into its shards on the mesh: no whole copy on one device or on the host.
    `scan_layers` asks for stacked (True) or unrolled (False) layers, re-laid out after reading when the
    folder holds the other layout (None: as stored)."""
    path = params_path(directory)
    stored = stored_metadata(directory)
    stacked = layout.is_stacked(stored)
    target = abstract_params(config, dtype, stacked)
    compare_trees(stored, target, path, os.path.join(directory, "config.json"))
    want = stacked if scan_layers is None else scan_layers
    if shard is not None:
        shardings = shard.params(param_axes(config, stacked), target)
    else:  # a sharding asks orbax for device arrays, whatever the saved leaves were (numpy or jax)
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
    params: dict = {}
    for part in _parts(directory):
        wanted = target if part == path else _restricted(target, lambda n: part_of(n) == os.path.basename(part))
        try:
            with ocp.StandardCheckpointer() as ckptr:
                _merge(params, ckptr.restore(part, wanted))
        except Exception as e:
            raise FileError(f"{part}: unreadable params checkpoint ({error_line(e)})") from None
    if config.quantization is not None:
        check_scales(params, path)
    return _relayout(params, config, dtype, shard, stacked, want)


def _relayout(params, config: ModelConfig, dtype, shard: MeshRules | None, stacked: bool, want: bool):
    """`params` (stacked or not, as `stacked` says) in the layout `want` asks for."""
    if want == stacked:
        return params
    # The other layout: one stack at a time is held twice while it is re-laid out.
    relayout = functools.partial(layout.relayout, stacked=want)
    if shard is None:
        return jax.jit(relayout)(params)
    shardings = shard.params(param_axes(config, want), abstract_params(config, dtype, want))
    return jax.jit(relayout, out_shardings=shardings)(params)


def place_params(parts: Iterable[dict], config: ModelConfig, dtype, shard: MeshRules | None = None,
                 scan_layers: bool = False):
    """Params read a part at a time as host arrays (unrolled layers, e.g. by the converter's reader), put
    on the device, or each into its shards on the mesh, as each part arrives, so the host holds one part
    at a time; then laid out as `scan_layers` asks."""
    target = abstract_params(config, dtype, False)
    if shard is not None:
        shardings = shard.params(param_axes(config, False), target)
    else:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
    shardings = {param_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    params: dict = {}
    for part in parts:
        placed = jax.tree_util.tree_map_with_path(
            lambda k, x: jax.make_array_from_callback(x.shape, shardings[param_name(k)], lambda i, x=x: x[i]), part)
        _merge(params, placed)
    compare_trees(params, target, "the converted params", "the config")
    return _relayout(params, config, dtype, shard, False, scan_layers)
