"""Logical axis names -> a device mesh.

Every weight and cache array carries logical axis names (declared once, in `layers.py` /
`model.py`). One small rules table maps each logical name to a mesh axis: tensor parallelism over
heads and the MLP hidden dimension on the "model" axis, data parallelism over batch rows (decode
slots) on the "data" axis. A dimension is only sharded when the mesh axis divides it and no other
dimension of the same array already uses that axis; otherwise it is replicated (so an MQA model's
single kv head is replicated on a tensor-parallel mesh instead of failing).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("embed", None),
    ("head_dim", None),
    ("cache_seq", None),
    ("stack", None),
)


def make_mesh(data: int = 1, model: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh; `model` defaults to every device not used by `data`."""
    devices = list(devices if devices is not None else jax.devices())
    if model is None:
        model = len(devices) // data
    if data * model != len(devices):
        raise ValueError(f"mesh {data}x{model} does not match {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def logical_to_spec(axes: Iterable[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one array with logical `axes` and `shape` on `mesh` (by `RULES`)."""
    table = dict(RULES)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        if (mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape
                or size % mesh.shape[mesh_axis]):
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def tree_shardings(axes_tree, shape_tree, mesh: Mesh):
    """NamedShardings for a tree of arrays (`shape_tree`: anything with .shape) given their axes."""
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)),
        axes_tree, shape_tree, is_leaf=lambda a: isinstance(a, tuple))
