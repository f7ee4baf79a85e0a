"""Orbax checkpoints of the training state (trainable parameters, optimizer state, step).

Only what training changes is saved: the frozen base comes from its source again on resume, and the
data position and dropout keys are pure functions of (seed, step). Orbax writes each step into a
temporary folder and renames it when complete, so a half-written checkpoint is never listed, and
`latest_step` only returns finished ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


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

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Start an asynchronous save when `step` is due (or `force`); returns whether it saved."""
        if not force and step % self.every:
            return False
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore `step` onto the shapes, dtypes and shardings of `abstract_state`."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`: a restore target allocating nothing."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
