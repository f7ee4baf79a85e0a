"""Device mesh and sharding rules: sharding is data, not code.

Every parameter and activation carries *logical* axis names ("embed", "mlp", "batch", ...). One rule
table maps logical names to mesh axes (`data`, `fsdp`, `tensor`), so a layout change is an edit of
the table or of the mesh shape in the config, never of the model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jax_iclemb.errors import BadValue

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or a tuple of mesh axes, or None = replicated).
# Parameters are stored in Hugging Face's layout, e.g. a projection weight is (out, in).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),  # rows of a packed batch
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("sequences", ("data", "fsdp")),  # one embedding per query/passage
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),  # heads * head_dim, fused as in HF
    ("kv_heads", "tensor"),
    ("norm", None),
    ("lora_rank", None),
    ("layers", None),  # leading axis of the stacked decoder layers: a scan step each, not split
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry may be -1 for "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise BadValue(f"mesh shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise BadValue(f"at most one mesh axis may be -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            layout = dict(zip(MESH_AXES, shape))
            raise BadValue(f"{len(devices)} devices cannot fill mesh {layout}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise BadValue(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"{len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_RULES,
) -> PartitionSpec:
    """PartitionSpec for logical axes under `rules`.

    With `shape` and `mesh`, mesh axes that do not divide a dimension are dropped (the dimension is
    replicated over them instead), so small test models work on any mesh. A mesh axis is used at
    most once per array.
    """
    table = dict(rules)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        size = 1
        for axis in axes:
            if axis in used:
                continue
            if mesh is not None and axis not in mesh.shape:
                continue
            axis_size = mesh.shape[axis] if mesh is not None else 1
            if shape is not None and mesh is not None and shape[i] % (size * axis_size):
                continue
            kept.append(axis)
            size *= axis_size
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split (the number of distinct row shards)."""
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


@functools.lru_cache(maxsize=64)  # asked every step, for the few shapes a run has
def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """Global index along axis 0 of each row of this process's local data, as
    `jax.make_array_from_process_local_data` places it: the process's distinct shards of axis 0
    in the order of their start, one contiguous block of local rows each. One block at
    process_index × local rows on a host-major mesh (CPU, GPU); several interleaved blocks where
    the mesh orders devices otherwise (a TPU torus, a permuted device list)."""
    indices = sharding.addressable_devices_indices_map(global_shape).values()
    blocks = sorted({(i[0].start or 0, i[0].stop or global_shape[0]) for i in indices})
    rows = np.concatenate([np.arange(start, stop) for start, stop in blocks])
    rows.setflags(write=False)  # shared by every caller of the cache
    return rows
