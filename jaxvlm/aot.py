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
import glob
import math
import os
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxvlm import checks, files, presets
from jaxvlm.checkpoint import abstract_params, param_axes
from jaxvlm.config import CONFIG_FILE, ModelConfig, QuantizationConfig
from jaxvlm.engine import decode_rows, insert
from jaxvlm.generate import MAX_CHUNK, DecodeState, cache_axes, decode, prefill, prompt_bucket, sampling_rules
from jaxvlm.kv_cache import KVCache
from jaxvlm.minimal_step import minimal_decode
from jaxvlm.patches import Patches, bucket
from jaxvlm.sharding import MeshRules, mesh_shape
from jaxvlm.train import TrainConfig, Trainer, TrainState

LIBTPU = "libtpu==0.0.42.*"  # the version jax 0.10.2 pins (what `pip install "jax[tpu]==0.10.2"` picks)
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}  # per chip
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# A model taking images of any size (Qwen-VL) is compiled with an image of this many patches a row: a
# 448 x 448 image, 256 tokens once merged
ANY_SIZE_IMAGE_PATCHES = 32 * 32


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
    """A preset's name (`jaxvlm.presets`), a checkpoint folder, converted or Hugging Face's (its config.json
    only: no weight is read), or a `ModelConfig`, as the config to compile."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        path = os.path.join(model, CONFIG_FILE)
        # transformers' config.json, not jaxvlm's: jaxvlm's names its decoder (None or not), and since it
        # records the family it was read as it has a model_type too
        if os.path.isfile(path) and "decoder" not in files.read_json(path):
            from convert.hf_config import model_config as hf_model_config  # (convert imports jaxvlm)
            return hf_model_config(os.fspath(model))[0]
        return ModelConfig.load(model)
    if isinstance(model, str):
        return presets.get(model)
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


def largest_temporary(dump: str) -> tuple[int, str] | None:
    """(bytes, shape) of the largest value among a program's temporaries in HBM, from the compiler's buffer
    assignment dumped into `dump` (its "preallocated-temp" allocations of the default memory space; the
    other colours are on-chip memories); None where the dump holds none."""
    paths = glob.glob(os.path.join(dump, "*buffer-assignment.txt"))
    if not paths:
        return None
    largest, temporary = (0, ""), False
    with open(max(paths, key=os.path.getmtime)) as f:
        for line in f:
            if line.startswith("allocation"):
                temporary = "preallocated-temp" in line and ", color " not in line
            elif temporary and (found := _VALUE.match(line)):
                largest = max(largest, (int(found.group(1)), found.group(2)))
    return largest


_VALUE = re.compile(r" value: <\d+ .+? @\d+> \(size=(\d+),offset=\d+\): (\S+)")


def _measure(lowered_fn, hbm: int, find_largest: bool) -> dict[str, Any]:
    """Compiles; the per-device memory, the cost model's counts and, if `find_largest`, the largest
    temporary (from the compiler's dump: seconds more for a large model). A program the chip cannot hold is
    reported as not fitting, with the compiler's words, rather than raised."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as dump:
        try:
            compiled = lowered_fn().compile(compiler_options={"xla_dump_to": dump} if find_largest else None)
        except Exception as e:  # noqa: BLE001 - only running out of memory is an answer; the rest is raised
            if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
                raise
            return dict(fits=False, compile_seconds=round(time.perf_counter() - start, 2),
                        error=next((line.strip() for line in str(e).splitlines() if "memory" in line.lower()),
                                   str(e).splitlines()[0]))
        seconds = time.perf_counter() - start
        largest = largest_temporary(dump) if find_largest else None
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
    if largest is not None:
        out.update(largest_temporary_bytes=largest[0], largest_temporary=largest[1])
    return out


PROGRAMS = ("prefill", "decode", "minimal_decode", "engine_insert", "engine_step", "train_step")


def report(model: str | os.PathLike | ModelConfig, topology: str = "v5e:2x2", batch: int = 8, cache: int = 4096,
           prompt: int = 1024, dtype: str = "bfloat16", quantize: str | None = None,
           mesh: str | dict[str, int] | None = None, rules=None, scan_layers: bool = False, steps: int = 1,
           programs: tuple[str, ...] = PROGRAMS, find_largest: bool = True, greedy: bool = False) -> dict:
    """Compiles jaxvlm's programs for `model` on `topology`, with `batch` rows, a `cache`-slot KV cache and
    `prompt`-token prompts, params in `dtype` (or int8 with `quantize="int8"`) split over `mesh`
    ("data=2,model=2" or {axis: size}; default every device on 'model') by `rules`:
    - prefill: the prompts (and an image a row for a vision-language model: one of `ANY_SIZE_IMAGE_PATCHES`
      patches where it takes images of any size) into a fresh cache; a prefix-LM's prompts with a prefix
      (PaliGemma's bidirectional image and prompt);
    - decode: a chunk of `steps` decode steps (`generate.decode`);
    - minimal_decode: the yardstick for decode (`jaxvlm.minimal_step`): each weight and cache entry read once;
    - engine_insert, engine_step: the serving engine writing one prefilled request into its running batch
      of `batch` slots, and decoding a chunk of all of them;
    - train_step: one training step over `batch` sequences of `prompt` tokens (float32 params and AdamW's
      moments, `dtype` activations; not with int8 weights, which are for inference).
    `greedy` compiles prefill, decode and the engine's step as a batch of greedy rows runs them (the argmax,
    no sampling filters or draw); by default as a batch with a sampled row does. `programs` picks some.
    Returns {"topology", "devices", "hbm_bytes", "programs": {name: {...}}}, each program with its
    per-device `arguments_bytes`, `outputs_bytes`, `temporaries_bytes`, `code_bytes`, `total_bytes`, `fits`
    (total within the chip's memory), `compile_seconds`, `flops`, `bytes_accessed` and, unless
    `find_largest=False` (quicker: no dump of the compiled program is read), its `largest_temporary_bytes`
    (and that value's shape, `largest_temporary`); or, where the compiler ran out of the chip's memory,
    `fits` False and its `error`."""
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
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise ValueError(f"programs: unknown {unknown[0]!r} (known: {', '.join(PROGRAMS)})")
    found = devices(topology)
    shard = MeshRules.create(mesh_of(found, mesh_shape(mesh) if isinstance(mesh, str) else mesh), rules)
    hbm = HBM_BYTES[topology.split(":")[0]]
    compute = DTYPES[dtype]
    float_config = config
    if quantize:
        config = dataclasses.replace(config, quantization=QuantizationConfig())
    params = abstract_params(config, compute, scan_layers)
    params = _abstract(params, shard.params(param_axes(config, scan_layers), params))
    config = config.computation
    rows = -(-batch // shard.batch_multiple) * shard.batch_multiple
    rules_ = sampling_rules(rows, [1], 0)
    put = lambda shape, dtype_, names: jax.ShapeDtypeStruct(shape, dtype_, sharding=shard.sharding(names, shape))
    row_flags = lambda n: put((n,), jnp.bool_, ("batch",))
    row_ints = lambda n: put((n,), jnp.int32, ("batch",))

    def cache_of(n: int, size: int) -> KVCache:
        tree = jax.eval_shape(lambda: KVCache.init(config.decoder, n, size, compute, scan_layers))
        kv = lambda x: put(x.shape, x.dtype, cache_axes(x))
        return KVCache(k=jax.tree.map(kv, tree.k), v=jax.tree.map(kv, tree.v), end=put((), jnp.int32, ()),
                       valid=put((n, size), jnp.bool_, ("batch", None)))

    def state_of(n: int, size: int, seen: bool) -> DecodeState:
        return DecodeState(cache=cache_of(n, size), token=row_ints(n), position=row_ints(n), done=row_flags(n),
                           step=row_ints(n),
                           seen=put((n, config.decoder.vocab_size), jnp.bool_, ("batch", None)) if seen else None)

    def pixels_of(n: int):  # an image a row
        size_ = config.vision.image_size
        if size_ is None:  # images of any size: one sequence of the batch's patches, on every device
            v = config.vision
            length = bucket(n * ANY_SIZE_IMAGE_PATCHES, v.merge_size ** 2)
            return Patches(put((length, v.patch_dim), jnp.float32, (None, None)),
                           put((length, 2), jnp.int32, (None, None)), put((length,), jnp.int32, (None,)),
                           put((length,), jnp.int32, (None,)))
        return put((n, size_, size_, 3), jnp.float32, ("batch", None, None, None))

    def prefill_of(n: int, length: int, size: int, penalize: bool):
        pixels = pixels_of(n) if config.is_vlm else None
        image_rows = None
        tokens = put((n, length), jnp.int32, ("batch", None))
        flags = lambda: put((n, length), jnp.bool_, ("batch", None))
        prefix = flags() if config.prefix_lm else None  # (PaliGemma's image and prompt: one bidirectional block)
        return prefill.lower(config, compute, penalize, size, shard, params, tokens, flags(), prefix, pixels,
                             image_rows, row_flags(n), row_ints(n), sampling_rules(n, [1], 0),
                             sampling=not greedy)

    def train_step():
        trainer = Trainer(float_config, TrainConfig(steps=1, compute_dtype=dtype), mesh=shard.mesh, rules=rules)
        master = abstract_params(float_config, jnp.float32, scan_layers)
        shardings = trainer.state_shardings(master)
        opt_state = jax.eval_shape(trainer.optimizer.init, master)
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
                           params=_abstract(master, shardings.params),
                           opt_state=_abstract(opt_state, shardings.opt_state))
        tokens = lambda dtype_: put((rows, prompt), dtype_, ("batch", None))
        batch_ = {"tokens": tokens(jnp.int32), "valid": tokens(jnp.bool_), "loss_mask": tokens(jnp.bool_)}
        if float_config.prefix_lm:
            batch_["prefix"] = tokens(jnp.bool_)
        if float_config.is_vlm:
            batch_["pixels"] = pixels_of(rows)
        return trainer.compile_step(state).lower(state, batch_, None, jax.ShapeDtypeStruct((), jnp.float32))

    engine_state = lambda: state_of(rows, cache, seen=True)
    one = shard.batch_multiple  # the engine prefills one request, padded to the devices the batch is split over
    lowerings = {
        "prefill": lambda: prefill_of(rows, prompt, cache, False),
        "decode": lambda: decode.lower(config, compute, False, steps, shard, params, state_of(rows, cache, False),
                                       rules_, sampling=not greedy),
        "minimal_decode": lambda: jax.jit(minimal_decode, static_argnums=(0, 1), donate_argnums=(3,)).lower(
            config.decoder, compute, params, cache_of(rows, cache), row_ints(rows)),
        "engine_insert": lambda: insert.lower(engine_state(), state_of(one, prompt_bucket(prompt), seen=True),
                                              jax.ShapeDtypeStruct((), jnp.int32)),
        "engine_step": lambda: decode_rows.lower(config, compute, False, MAX_CHUNK, rows, shard, params,
                                                 engine_state(), rules_, 0, not greedy,
                                                 run=jax.ShapeDtypeStruct((), jnp.int32)),
        "train_step": train_step,
    }
    chosen = [p for p in programs if not (p == "train_step" and quantize)]
    return dict(topology=topology, devices=len(found), hbm_bytes=hbm,
                programs={name: _measure(lowerings[name], hbm, find_largest) for name in chosen})


def largest_batch(model: str | os.PathLike | ModelConfig, topology: str = "v5e:2x2", most: int = 4096,
                  **settings) -> int:
    """The largest batch (a multiple of the devices the batch is split over, at most `most`) whose prefill
    and decode both fit (or the `programs` given; `report`'s `settings` otherwise); 0 where not even the
    smallest does. Doubles, then halves the gap: a few compilations."""
    settings.setdefault("programs", ("prefill", "decode"))
    settings.setdefault("find_largest", False)
    fits = lambda b: all(p["fits"] for p in report(model, topology, batch=b, **settings)["programs"].values())
    low, high = 0, 1
    while high <= most and fits(high):
        low, high = high, high * 2
    high = min(high, most + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
