"""One model over many devices: logical axis names -> the axes of a `jax.sharding.Mesh`.

Every param names its axes (`jaxvlm.layers`), and so do the activations this module places (`batch`);
rules map each name to mesh axes, and `MeshRules.spec` turns a param's names and shape into a
PartitionSpec. That is the whole of it: no per-family or per-module table.

Mesh axes are `data` (splits the batch), `fsdp` (splits each weight's other axis, and the batch: a
training layout), `model` (tensor parallel: query and kv heads, the MLP's hidden axis, the vocabulary)
and `expert` (a mixture's experts, each device holding E / n of them).
A dimension that a mesh axis does not divide stays whole on that axis (MQA's one kv head on four devices
is replicated), and a mesh axis splits at most one dimension of an array.

The mesh runs with Auto axes whatever the caller's mesh says (`jax.make_mesh` makes Explicit ones by
default): XLA's partitioner places the activations between the params' and the cache's shardings.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxvlm.patches import Patches

MESH_AXES = ("data", "fsdp", "model", "expert")

Rules = Mapping[str, "str | Sequence[str] | None"]

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "heads": ("model",),
    "kv_heads": ("model",),
    "mlp": ("model",),
    "vocab": ("model",),
    "embed": ("fsdp",),
    "experts": ("expert",),
}


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A mesh and the rules that place each logical axis on it; hashable, so a static argument under jit."""

    mesh: Mesh
    rules: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def create(cls, mesh, rules: Rules | None = None) -> "MeshRules":
        """Checks `mesh` (axes named from data, fsdp, model) and `rules` (logical name -> mesh axis, axes
        or None; they update the defaults) and returns them with the mesh's axes made Auto."""
        if not isinstance(mesh, Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((2, 4), ('data', 'model'))), "
                             f"got {type(mesh).__name__}")
        unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"mesh: unknown axis name {unknown[0]!r}; jaxvlm's mesh axes are {', '.join(MESH_AXES)}")
        merged = dict(DEFAULT_RULES)
        if rules is not None:
            if not isinstance(rules, Mapping):
                raise ValueError(f"rules must map logical axis names to mesh axes, got {type(rules).__name__}")
            for name, axes in rules.items():
                axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
                if not isinstance(name, str) or not isinstance(axes, (tuple, list)) or \
                        not all(isinstance(a, str) for a in axes):
                    raise ValueError(f"rules: {name!r}: {axes!r} is not a logical name mapped to mesh axis names")
                for axis in axes:
                    if axis not in mesh.axis_names:
                        raise ValueError(f"rules: {name!r} names mesh axis {axis!r}, which the mesh lacks (its axes: "
                                         f"{', '.join(mesh.axis_names)})")
                merged[name] = tuple(axes)
        # Default rules may name axes this mesh does not have: those are simply not used.
        merged = {name: tuple(a for a in axes if a in mesh.axis_names) for name, axes in merged.items()}
        auto = mesh if all(t == AxisType.Auto for t in mesh.axis_types) else \
            Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        return cls(auto, tuple(sorted(merged.items())))

    @property
    def size(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    def spec(self, names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        """The PartitionSpec of an array of `shape` whose axes are called `names`."""
        rules, used, spec = dict(self.rules), set(), []
        for name, dim in zip(names, shape):
            axes, split = [], 1
            for axis in rules.get(name, ()):
                n = self.size[axis]
                if n > 1 and axis not in used and dim % (split * n) == 0:
                    axes.append(axis)
                    used.add(axis)
                    split *= n
            spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
        return PartitionSpec(*spec)

    def sharding(self, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_multiple(self) -> int:
        """Rows split evenly over the mesh axes the batch is split on: batches are padded to a multiple."""
        return int(np.prod([self.size[a] for a in dict(self.rules).get("batch", ())]))

    def params(self, axes_tree, abstract_tree):
        """A tree of NamedShardings for params: `axes_tree` holds each param's logical names (as
        `checkpoint.param_axes` gives them), `abstract_tree` its shape."""
        return jax.tree.map(lambda names, x: self.sharding(tuple(names), x.shape), axes_tree, abstract_tree,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))

    def put(self, value, names: Sequence[str | None] = ()) -> jax.Array:
        """A host array (the same on every process) placed on the mesh as `names` say (replicated along the
        unnamed axes). Each process supplies only its own devices' pieces, so this works across hosts."""
        value = np.asarray(value)
        names = tuple(names) + (None,) * (value.ndim - len(names))
        return jax.make_array_from_callback(value.shape, self.sharding(names, value.shape), lambda index: value[index])

    def constrain(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        """Inside jit: x laid out as `names` say."""
        return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))


def check_distributed(where: str) -> None:
    """Refuses to start in a process of a multi-host job (as `JAX_COORDINATOR_ADDRESS` marks one) before
    `jax.distributed.initialize`: jax could no longer be initialized once this process had used it, and
    alone it would see only its own devices."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and not jax.distributed.is_initialized():
        raise RuntimeError(f"{where}: this process is part of a multi-host job (JAX_COORDINATOR_ADDRESS is set) but "
                           "jax.distributed.initialize() has not been called; call it first, in every process")


def mesh_shape(text: str, what: str = "--mesh") -> dict[str, int]:
    """{axis: size} from text such as "data=2,model=4" (axes named from MESH_AXES, each once)."""
    shape: dict[str, int] = {}
    for part in text.split(","):
        name, equals, size = part.strip().partition("=")
        if not equals or name not in MESH_AXES or not size.isdigit() or int(size) < 1 or name in shape:
            raise ValueError(f"{what} {text!r}: give each axis once as name=size, comma-separated, the names from "
                             f"{', '.join(MESH_AXES)} (e.g. data=2,model=4)")
        shape[name] = int(size)
    return shape


def parse_mesh(text: str, what: str = "--mesh") -> jax.sharding.Mesh:
    """A mesh over this host's devices from text such as "data=2,model=4" (`mesh_shape`; sizes multiplying to
    the device count)."""
    shape = mesh_shape(text, what)
    if int(np.prod(list(shape.values()))) != jax.device_count():
        raise ValueError(f"{what} {text!r}: {int(np.prod(list(shape.values())))} devices, but there are "
                         f"{jax.device_count()}")
    return jax.make_mesh(tuple(shape.values()), tuple(shape))


def mesh_rules(mesh, rules: Rules | None) -> MeshRules | None:
    """The `mesh=` and `rules=` arguments of `load` and `Trainer` as a MeshRules (None without a mesh)."""
    if rules is not None and mesh is None:
        raise ValueError("rules: they place params on a mesh; give mesh= too")
    return None if mesh is None else MeshRules.create(mesh, rules)


def place(shard: MeshRules | None, x, names: Sequence[str | None] = ("batch",)):
    """A host array on the mesh as `names` say (`MeshRules.put`); on one device, as it is. `Patches` (the
    batch's images of any size, one sequence with no batch axis) are copied whole to every device."""
    if shard is None or x is None:
        return x
    if isinstance(x, Patches):
        return jax.tree.map(lambda a: shard.put(a, ()), x)
    return shard.put(x, names)
