"""Orbax checkpoints of the training state: what is saved, how, and how to read it back.

Only what training changes is saved (`TrainState`: trainable parameters, optimizer state, step):
the frozen base comes from its source again on resume, and the data position, step shapes and
dropout keys are pure functions of (seed, step), so the step number is all the position there is.
Orbax writes each step into a temporary folder and renames it when complete, so a half-written
checkpoint is never listed, and `latest_step` only returns finished ones. Inference reads the
trainable parameters alone (`restore_params`), without building an optimizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import struct

STATE = "state"  # the item of a step's folder that holds the TrainState


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: updates done (micro-steps, with gradient accumulation)
    params: dict  # the trainable parameters (LoRA adapters, or all), a pure dict
    opt: Any  # the optimizer's state


class Checkpointer:
    """Saves every `every` steps (and on demand), keeps the last `keep`, restores the latest.

    `read_only` opens an existing folder without creating it (export, evaluation: readers of a
    workdir leave it as it was)."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, read_only: bool = False):
        self.every = every
        self._manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            # create=False is all a reader needs (orbax's read_only mode only adds warnings).
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=not read_only, enable_async_checkpointing=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        """Start an asynchronous save of `state` when its step is due (or `force`); returns
        whether it saved."""
        step = int(state.step)
        if not force and step % self.every:
            return False
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state)}, meta=ocp.args.JsonSave({"step": step})
            ),
            force=True,
        )

    def restore(self, step: int, like: TrainState) -> TrainState:
        """Restore `step` onto the shapes, dtypes and shardings of `like`'s arrays (which are
        not read: a restore target may be abstract)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_like(like))})
        )
        return restored[STATE]

    def restore_params(self, step: int, like: dict) -> dict:
        """The trainable parameters of `step` alone, onto the shapes, dtypes and shardings of
        `like` (the freshly built model's): no optimizer state is read or needed."""
        target = {"params": abstract_like(like)}
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
        restored = ocp.PyTreeCheckpointer().restore(
            self._manager.directory / str(step) / STATE,
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            ),
        )
        return restored["params"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def latest_step(directory: str | Path) -> int | None:
    """The latest finished checkpoint in `directory`, read without creating or changing anything;
    None when there is none (or no such folder)."""
    if not Path(directory).is_dir():
        return None
    reader = Checkpointer(directory, every=1, keep=1 << 30, read_only=True)
    try:
        return reader.latest_step()
    finally:
        reader.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`: a restore target allocating nothing."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
