"""The one module that talks to Orbax.

A checkpoint holds, together and atomically: the train state (sharded arrays), the data position
(how many global batches were consumed) and the resolved config. Restoring goes through an
abstract target that carries shardings, so a checkpoint written on one mesh restores onto any
other (without it: topology-mismatch errors, and optax namedtuples coming back as dicts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax
import orbax.checkpoint as ocp

from dictlearn.errors import MissingInputError

STATE = "state"
DATA = "data"
CONFIG = "config"


@dataclass(frozen=True)
class Restored:
    """What a restore gives back."""

    step: int
    state: Any
    data_position: int
    config: dict[str, Any]


class Checkpointer:
    """Save / restore train state + data position + config; keeps the newest ``keep``.

    Args:
        directory: checkpoint root (local path or ``gs://`` URL).
        keep: how many checkpoints to keep.
        async_save: write in a background thread (``wait`` / ``close`` before exiting).
        keep_steps: steps whose checkpoints are never deleted, besides the newest ``keep`` (the
            branch points a sweep's token budgets restore from).
    """

    def __init__(
        self,
        directory: str,
        keep: int = 3,
        async_save: bool = True,
        keep_steps: tuple[int, ...] = (),
    ):
        # Orbax (tensorstore) accepts only absolute local paths; URLs (gs://...) pass as is.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        if keep_steps:
            retention: dict[str, Any] = {
                "preservation_policy": ocp.checkpoint_managers.AnyPreservationPolicy(
                    [
                        ocp.checkpoint_managers.LatestN(keep),
                        ocp.checkpoint_managers.CustomSteps(list(keep_steps)),
                    ]
                )
            }
        else:
            retention = {"max_to_keep": keep}
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                enable_async_checkpointing=async_save,
                create=True,
                **retention,
            ),
            item_names=(STATE, DATA, CONFIG),
        )

    def latest_step(self) -> int | None:
        """Newest committed checkpoint step (a half-written one is never reported)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_position: int, config: dict[str, Any]) -> None:
        """Start saving (returns before the write finishes when async)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: ocp.args.JsonSave({"position": int(data_position)}),
                    CONFIG: ocp.args.JsonSave(config),
                }
            ),
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> Restored:
        """Restore ``step`` (default: latest) onto the shardings in ``abstract_state``.

        Raises:
            FileNotFoundError: no checkpoint exists in the directory.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise MissingInputError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardRestore(abstract_state),
                    DATA: ocp.args.JsonRestore(),
                    CONFIG: ocp.args.JsonRestore(),
                }
            ),
        )
        return Restored(
            step=step,
            state=restored[STATE],
            data_position=int(restored[DATA]["position"]),
            config=restored[CONFIG],
        )

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        """Only the config saved with a checkpoint (no arrays are read)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise MissingInputError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
        )
        return restored[CONFIG]

    def delete(self, step: int) -> None:
        """Delete the checkpoint of ``step`` (e.g. one a resume from an older step supersedes)."""
        self._manager.delete(step)

    def wait(self) -> None:
        """Block until any background save has committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """Abstract (shape, dtype, sharding) version of a concrete pytree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
