"""Low-rank adapters (LoRA): beside a projection's kernel W, two small params `lora_a` and `lora_b` whose
product is added to it, y = W x + B (A x), and which alone are trained.

Their shapes come from the kernel's named input axes (`layers.Weight`), as int8 scales' do: for the
query kernel [D, N, H] of 'BTD,DNH->BTNH' (input D), `lora_a` is [D, r] and `lora_b` [r, N, H]; for the
attention output [N, H, D] (inputs N, H), [N, H, r] and [r, D]. A module holding them adds their product
(`layers.Einsum`); `merge` folds it into the kernel, after which the model is plain again.

Built here rather than on qwix: qwix 0.1.8's LoRA intercepts linen einsums by setting an attribute on the
calling module, which flax 0.12.8 refuses for compact modules (SetAttributeFrozenModuleError on
`Einsum`), and it knows nothing of the axes' names that sharding, int8 scales and the converter share.

`lora_a` starts random and `lora_b` at zero, so training starts from the base model exactly. The
trainer holds the raw pair; the model is given `lora_a` times `alpha / rank` (`scaled`), which is also what
a saved model stores, so that a loaded model needs no scale.
"""

from __future__ import annotations

import math
import re
import string

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.config import LoraConfig

A, B = "lora_a", "lora_b"
KERNEL = "kernel"


def _module(name: str) -> str:
    return name[:-len("/" + KERNEL)]


def targets(lora: LoraConfig, contracted: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The kernels (param name -> input axes) whose module path ends with one of `lora.targets`, each a
    path or a regular expression over paths; a target that matches no projection is an error naming it."""
    kernels = {n: c for n, c in contracted.items() if n.endswith("/" + KERNEL)}
    chosen = {}
    for target in lora.targets:
        try:
            pattern = re.compile(rf"(^|/)(?:{target})$")
        except re.error as e:
            raise ValueError(f"LoRA target {target!r} is not a valid pattern ({e})") from None
        matched = {n: c for n, c in kernels.items() if pattern.search(_module(n))}
        if not matched:
            names = sorted({"/".join(_module(n).split("/")[2:]) or _module(n) for n in kernels})
            raise ValueError(f"LoRA target {target!r} names no projection of this model (its projections: "
                             f"{', '.join(names)})")
        chosen |= matched
    return chosen


def adapter_shapes(shape: tuple[int, ...], contracted: tuple[int, ...], rank: int,
                   name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lora_a's shape, lora_b's) for a kernel of `shape` whose inputs are `contracted` (from the end)."""
    inputs = sorted(i % len(shape) for i in contracted)
    in_shape = tuple(shape[i] for i in inputs)
    out_shape = tuple(n for i, n in enumerate(shape) if i not in inputs)
    limit = min(math.prod(in_shape), math.prod(out_shape))
    if rank > limit:
        raise ValueError(f"LoRA rank {rank} is larger than {name} allows (inputs {list(in_shape)}, outputs "
                         f"{list(out_shape)}: at most {limit})")
    return in_shape + (rank,), (rank,) + out_shape


def init(params, lora: LoraConfig, contracted: dict[str, tuple[int, ...]], key: jax.Array) -> dict:
    """Fresh adapters for `params` (a nested dict of arrays, unrolled layers): a nested dict holding only
    `lora_a` (normal, 1 / sqrt(inputs)) and `lora_b` (zeros) beside each target kernel."""
    flat = {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    adapters: dict = {}
    for i, (name, inputs) in enumerate(sorted(targets(lora, contracted).items())):
        a_shape, b_shape = adapter_shapes(flat[name].shape, inputs, lora.rank, name)
        fan_in = math.prod(a_shape[:-1])
        a = jax.random.normal(jax.random.fold_in(key, i), a_shape, jnp.float32) / math.sqrt(fan_in)
        node = _node(adapters, _module(name))
        node[A], node[B] = a, jnp.zeros(b_shape, jnp.float32)
    return adapters


def abstract(lora: LoraConfig, contracted: dict[str, tuple[int, ...]], kernels: dict[str, tuple], make) -> dict:
    """The adapters' tree for kernels of the given shapes (name -> shape): `make(shape, kernel name, role)`
    at each leaf, role being "in" for lora_a and "out" for lora_b."""
    tree: dict = {}
    for name, inputs in targets(lora, contracted).items():
        a_shape, b_shape = adapter_shapes(kernels[name], inputs, lora.rank, name)
        node = _node(tree, _module(name))
        node[A], node[B] = make(a_shape, name, "in"), make(b_shape, name, "out")
    return tree


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def scaled(adapters, scale: float):
    """The adapters as the model uses them: `lora_a` times `scale` (alpha / rank)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: x * scale if _name(p).endswith(A) else x, adapters)


def attach(params, adapters) -> dict:
    """`params` with the adapters' leaves added beside their kernels (a new tree; arrays are shared)."""
    out = dict(params)
    for key, value in adapters.items():
        out[key] = attach(params.get(key, {}), value) if isinstance(value, dict) else value
    return out


def split(params) -> tuple[dict, dict]:
    """(params without adapters, the adapters alone)."""
    base, adapters = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            b, a = split(value)
            base[key] = b
            if a:
                adapters[key] = a
        elif key in (A, B):
            adapters[key] = value
        else:
            base[key] = value
    return base, adapters


def delta(a: jax.Array, b: jax.Array, contracted: tuple[int, ...]) -> jax.Array:
    """The kernel-shaped product of `lora_a` [inputs..., r] and `lora_b` [r, outputs...] for a kernel whose
    input axes are `contracted` (from the end)."""
    ndim = a.ndim + b.ndim - 2
    inputs = sorted(i % ndim for i in contracted)
    outputs = [i for i in range(ndim) if i not in inputs]
    product = jnp.tensordot(a, b, axes=1)  # [inputs..., outputs...]
    return jnp.transpose(product, np.argsort(inputs + outputs))


def apply(spec: str, x: jax.Array, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """B (A x) for a projection spelled `spec` ('BTD,DNH->BTNH'), without forming the kernel-sized product."""
    x_letters, rest = spec.split(",")
    kernel, out = rest.split("->")
    r = _rank_letter(spec)
    inputs = "".join(c for c in kernel if c not in out)
    outputs = "".join(c for c in kernel if c in out)
    middle = "".join(c for c in x_letters if c not in inputs) + r
    h = jnp.einsum(f"{x_letters},{inputs}{r}->{middle}", x, a.astype(dtype))
    return jnp.einsum(f"{middle},{r}{outputs}->{out}", h, b.astype(dtype))


def merge(params, contracted: dict[str, tuple[int, ...]]) -> dict:
    """`params` with each adapter pair folded into its kernel (kernel + lora_a lora_b, in float32, cast back
    to the kernel's dtype) and removed: a plain model. `contracted` gives each kernel's input axes."""
    base, adapters = split(params)
    flat = {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(base)[0]}
    pairs = {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    for module in sorted({n.rsplit("/", 1)[0] for n in pairs}):
        name = f"{module}/{KERNEL}"
        d = delta(jnp.asarray(pairs[f"{module}/{A}"], jnp.float32), jnp.asarray(pairs[f"{module}/{B}"], jnp.float32),
                  contracted[name])
        flat[name] = (jnp.asarray(flat[name], jnp.float32) + d).astype(flat[name].dtype)
    out: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        _node(out, "/".join(parents))[last] = leaf
    return out


def _rank_letter(spec: str) -> str:
    return next(c for c in "RZYXWQ" + string.ascii_uppercase if c not in spec)


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _node(tree: dict, path: str) -> dict:
    for key in path.split("/") if path else []:
        tree = tree.setdefault(key, {})
    return tree
