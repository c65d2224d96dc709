"""Compiling jaxvlm's programs for a TPU slice on a machine without one, and what the compiler reports.

With `libtpu` installed at the version jax pins, jax describes a TPU topology's devices on any machine and
compiles for them, as MaxText's `train_compile.py` does to check that a model fits before a slice is
booked. Here the params are abstract (`jax.ShapeDtypeStruct`s with their shardings): nothing is allocated
and no weight is read. Each program's report holds, per device, the bytes of its arguments, outputs,
temporaries and generated code against the chip's memory, and the compiler's count of flops and of bytes
accessed. These are the compiler's figures, not a run's: the cost model counts on-chip copies too, so judge
a program's bytes accessed against a minimal reference compiled the same way, not against its weights.

    from jaxvlm import aot
    aot.report("gemma-2-2b", topology="v5e:2x2", batch=8, cache=4096)["programs"]["decode"]["total_bytes"]
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxvlm import checks, presets
from jaxvlm.checkpoint import abstract_params, param_axes
from jaxvlm.config import ModelConfig, QuantizationConfig
from jaxvlm.generate import DecodeState, cache_axes, decode, prefill, sampling_rules
from jaxvlm.kv_cache import KVCache
from jaxvlm.sharding import MeshRules, mesh_shape

LIBTPU = "libtpu==0.0.42.*"  # the version jax 0.10.2 pins (what `pip install "jax[tpu]==0.10.2"` picks)
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}  # per chip
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def devices(topology: str) -> list:
    """The devices of a TPU topology such as "v5e:2x2" or "v5p:2x2x1" (chip, then its chips' layout)."""
    if not isinstance(topology, str) or topology.split(":")[0] not in HBM_BYTES or ":" not in topology:
        raise ValueError(f"topology {topology!r}: unknown; give a chip and its layout, one of "
                         f"{', '.join(HBM_BYTES)} (e.g. v5e:2x2, v6e:4x4, v5p:2x2x1, v4:2x2x1)")
    try:
        import libtpu  # (its start-up is kept quiet by jaxvlm/__init__.py)
    except ImportError:
        raise ValueError(f"compiling for TPU needs libtpu: pip install '{LIBTPU}' (or jaxvlm[tpu-compile])") from None
    del libtpu  # only its presence matters here: jax loads it
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # noqa: BLE001 - libtpu's message names what it cannot lay out
        raise ValueError(f"topology {topology!r}: libtpu cannot lay it out ({str(e).splitlines()[0]})") from None


def model_config(model: str | os.PathLike | ModelConfig) -> ModelConfig:
    """A preset's name (`jaxvlm.presets`), a converted checkpoint folder (its config.json only: no weight is
    read) or a `ModelConfig`, as the config to compile."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        return ModelConfig.load(model)
    if isinstance(model, str):
        return ModelConfig(decoder=presets.get(model))
    raise ValueError(f"model must be a preset name, a checkpoint folder or a ModelConfig, got {type(model).__name__}")


def mesh_of(topology_devices: list, mesh: dict[str, int] | None) -> Mesh:
    """The devices as a mesh of `mesh`'s axes and sizes (default: every device on 'model')."""
    shape = {"model": len(topology_devices)} if mesh is None else dict(mesh)  # (axis names: MeshRules.create)
    for axis, size in shape.items():
        checks.integer(f"mesh {axis}", size, 1)
    if math.prod(shape.values()) != len(topology_devices):
        raise ValueError(f"mesh {shape} holds {math.prod(shape.values())} devices; the topology has "
                         f"{len(topology_devices)}")
    return Mesh(np.array(topology_devices).reshape(tuple(shape.values())), tuple(shape))


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _measure(lowered_fn, hbm: int) -> dict[str, Any]:
    """Compiles; the per-device memory and the cost model's counts. A program the chip cannot hold is
    reported as not fitting, with the compiler's words, rather than raised."""
    start = time.perf_counter()
    try:
        compiled = lowered_fn().compile()
    except Exception as e:  # noqa: BLE001 - only running out of memory is an answer; the rest is raised
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        return dict(fits=False, compile_seconds=round(time.perf_counter() - start, 2),
                    error=next((line.strip() for line in str(e).splitlines() if "memory" in line.lower()),
                               str(e).splitlines()[0]))
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out = dict(arguments_bytes=int(memory.argument_size_in_bytes), outputs_bytes=int(memory.output_size_in_bytes),
               temporaries_bytes=int(memory.temp_size_in_bytes), code_bytes=int(memory.generated_code_size_in_bytes),
               alias_bytes=int(memory.alias_size_in_bytes))
    # donated arguments alias their outputs: they are held once
    out["total_bytes"] = (out["arguments_bytes"] + out["outputs_bytes"] - out["alias_bytes"]
                          + out["temporaries_bytes"] + out["code_bytes"])
    out.update(fits=out["total_bytes"] <= hbm, compile_seconds=round(seconds, 2), flops=float(cost.get("flops", 0.0)),
               bytes_accessed=float(cost.get("bytes accessed", 0.0)))
    return out


def report(model: str | os.PathLike | ModelConfig, topology: str = "v5e:2x2", batch: int = 8, cache: int = 4096,
           prompt: int = 1024, dtype: str = "bfloat16", quantize: str | None = None,
           mesh: str | dict[str, int] | None = None, rules=None, scan_layers: bool = False, steps: int = 1) -> dict:
    """Compiles prefill (`prompt` tokens a row, and an image a row for a vision-language model) and a decode
    chunk (`steps` steps) of `model` for `batch` rows and a `cache`-slot KV cache on `topology`, params in
    `dtype` (or int8 with `quantize="int8"`), split over `mesh` ("data=2,model=2" or {axis: size}; default
    every device on 'model') by `rules`; returns {"topology", "devices", "hbm_bytes", "programs": {"prefill":
    {...}, "decode": {...}}}, each program with its per-device `arguments_bytes`, `outputs_bytes`,
    `temporaries_bytes`, `code_bytes`, `total_bytes`, `fits` (total within the chip's memory),
    `compile_seconds`, `flops` and `bytes_accessed` (or, where the compiler ran out of the chip's memory,
    `fits` False and its `error`)."""
    config = model_config(model)
    if config.decoder is None:
        raise ValueError("model: an image encoder alone has no generation programs to compile")
    batch, cache, prompt = (checks.integer(n, v, 1) for n, v in (("batch", batch), ("cache", cache),
                                                                 ("prompt", prompt)))
    checks.integer("steps", steps, 1)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if prompt > cache:
        raise ValueError(f"prompt={prompt} is longer than cache={cache}")
    found = devices(topology)
    shard = MeshRules.create(mesh_of(found, mesh_shape(mesh) if isinstance(mesh, str) else mesh), rules)
    hbm = HBM_BYTES[topology.split(":")[0]]
    if quantize:
        config = dataclasses.replace(config, quantization=QuantizationConfig())
    compute = DTYPES[dtype]
    params = abstract_params(config, compute, scan_layers)
    params = _abstract(params, shard.params(param_axes(config, scan_layers), params))
    config = config.computation
    rows = -(-batch // shard.batch_multiple) * shard.batch_multiple
    rules_ = sampling_rules(rows, [1], 0)
    spec = lambda x, names: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard.sharding(names, x.shape))
    put = lambda shape, dtype_, names: jax.ShapeDtypeStruct(shape, dtype_, sharding=shard.sharding(names, shape))

    cache_tree = jax.eval_shape(lambda: KVCache.init(config.decoder, rows, cache, compute, scan_layers))
    kv = lambda x: spec(x, cache_axes(x))
    cache_tree = KVCache(k=jax.tree.map(kv, cache_tree.k), v=jax.tree.map(kv, cache_tree.v),
                         end=spec(cache_tree.end, ()), valid=spec(cache_tree.valid, ("batch", None)))
    state = DecodeState(cache=cache_tree, token=put((rows,), jnp.int32, ("batch",)),
                        position=put((rows,), jnp.int32, ("batch",)), done=put((rows,), jnp.bool_, ("batch",)),
                        step=put((rows,), jnp.int32, ("batch",)))
    tokens = put((rows, prompt), jnp.int32, ("batch", None))
    valid = put((rows, prompt), jnp.bool_, ("batch", None))
    row_flags = put((rows,), jnp.bool_, ("batch",))
    row_steps = put((rows,), jnp.int32, ("batch",))
    pixels = None
    if config.is_vlm:
        size = config.vision.image_size
        pixels = put((rows, size, size, 3), jnp.float32, ("batch", None, None, None))
    programs = {
        "prefill": _measure(lambda: prefill.lower(config, compute, False, cache, shard, params, tokens, valid, None,
                                                  pixels, None, row_flags, row_steps, rules_), hbm),
        "decode": _measure(lambda: decode.lower(config, compute, False, steps, shard, params, state, rules_), hbm),
    }
    return dict(topology=topology, devices=len(found), hbm_bytes=hbm, programs=programs)


def largest_batch(model: str | os.PathLike | ModelConfig, topology: str = "v5e:2x2", most: int = 4096,
                  **settings) -> int:
    """The largest batch (a multiple of the devices the batch is split over, at most `most`) whose prefill
    and decode both fit (`report`'s `settings` otherwise); 0 where not even the smallest does. Doubles, then
    halves the gap: a few compilations."""
    fits = lambda b: all(p["fits"] for p in report(model, topology, batch=b, **settings)["programs"].values())
    low, high = 0, 1
    while high <= most and fits(high):
        low, high = high, high * 2
    high = min(high, most + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
