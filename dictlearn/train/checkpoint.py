"""The one module that talks to Orbax.

A checkpoint holds, together and atomically: the train state (sharded arrays), the data position
(how many global batches were consumed) and the resolved config. Restoring goes through an
abstract target that carries shardings, so a checkpoint written on one mesh restores onto any
other (without it: topology-mismatch errors, and optax namedtuples coming back as dicts).

A save that fails for lack of space (or any OS-level write error) raises
:class:`CheckpointWriteFailed`, one line naming the step, the OS error and the checkpoint a re-run
resumes from. Orbax writes a step under a temporary name and commits it last, so the failed step
is never reported as committed; the trainer's checkpointer removes the leftovers on its next start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp

from dictlearn.data.storage import WriteFailed, describe_os_error
from dictlearn.errors import MissingInputError, UserError

if TYPE_CHECKING:
    from dictlearn.train.config import CheckpointConfig

STATE = "state"
DATA = "data"
CONFIG = "config"


class CheckpointWriteFailed(WriteFailed):
    """A checkpoint could not be written (e.g. the disk is full); the previous one stands."""


# tensorstore reports the OS error of a failed write as text inside a ValueError.


class _RaisedAgainByWait(logging.Filter):
    """Drops the tracebacks Orbax's background save threads log for a failed write.

    The same error reaches :meth:`Checkpointer.wait` (and the next save), which raises it as one
    :class:`CheckpointWriteFailed` line naming the step and the checkpoint left intact; the
    threads' copies (two or three tracebacks per failed save) only bury that line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.exc_info
            and record.levelno >= logging.ERROR
            and f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in record.pathname
        )


# Orbax logs through absl, whose logger reports the calling Orbax module as the record's path.
logging.getLogger("absl").addFilter(_RaisedAgainByWait())

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _os_error_of(error: BaseException) -> OSError | None:
    """The OS-level write error behind a failed save, if that is what it was."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        match = _OS_ERROR_CODE.search(str(current))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None


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
        writer: this process writes the run (the trainer): removes a failed save's temporary
            leftovers on start. Readers (export, status) must not, or they could delete a
            save in progress.
    """

    @classmethod
    def run_writer(cls, directory: str, settings: CheckpointConfig) -> Checkpointer:
        """The checkpointer a training run writes with, from its ``checkpoint`` settings."""
        return cls(
            directory,
            keep=settings.keep,
            async_save=settings.async_save,
            keep_steps=tuple(settings.keep_steps),
            writer=True,
        )

    def __init__(
        self,
        directory: str,
        keep: int = 3,
        async_save: bool = True,
        keep_steps: tuple[int, ...] = (),
        writer: bool = False,
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
        self._pending: int | None = None  # the step of the last save started
        # Given to the manager, and asked by restore_model where a step's files are.
        self._step_names = ocp.step.standard_name_format()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                step_name_format=self._step_names,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=writer,
                **retention,
            ),
            item_names=(STATE, DATA, CONFIG),
        )

    def latest_step(self) -> int | None:
        """Newest committed checkpoint step (a half-written one is never reported)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    @contextlib.contextmanager
    def _reporting_write_failure(self, step: int | None) -> Iterator[None]:
        try:
            yield
        except CheckpointWriteFailed:
            raise
        except Exception as e:
            cause = _os_error_of(e)
            if cause is None or cause.errno == errno.ENOENT:
                raise
            # The manager's own view can include the step that just failed.
            committed = [s for s in self.all_steps() if s != step]
            what = f"checkpoint step {step}" if step is not None else "a checkpoint"
            kept = (
                f"the latest committed checkpoint, step {max(committed)}, is intact: free space "
                "(or fix the storage) and re-run to resume from it"
                if committed
                else "no checkpoint was committed before: free space (or fix the storage) and "
                "re-run to start over"
            )
            raise CheckpointWriteFailed(
                f"could not write {what} in {self.directory}: {describe_os_error(cause)}; {kept}"
            ) from e

    def save(self, step: int, state: Any, data_position: int, config: dict[str, Any]) -> None:
        """Start saving (returns before the write finishes when async).

        Raises:
            CheckpointWriteFailed: this save or a background one before it failed to write.
        """
        # Orbax finishes the previous background save first: report its failure as its own.
        self.wait()
        self._pending = step
        with self._reporting_write_failure(step):
            self._save(step, state, data_position, config)

    def _save(self, step: int, state: Any, data_position: int, config: dict[str, Any]) -> None:
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

    def _step_or_latest(self, step: int | None) -> int:
        """``step``, or the latest committed one; :class:`MissingInputError` if there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise MissingInputError(f"no checkpoint in {self.directory}")
        return step

    def _step_dir(self, step: int) -> Any:
        """The directory of checkpoint ``step`` on disk (an ``epath.Path``), as Orbax names it."""
        return self._step_names.find_step(self.directory, step).path

    def restore(self, abstract_state: Any, step: int | None = None) -> Restored:
        """Restore ``step`` (default: latest) onto the shardings in ``abstract_state``.

        Raises:
            MissingInputError: no checkpoint exists in the directory.
            UserError: the checkpoint's state is laid out differently from ``abstract_state``
                (names the mismatch and the fix; :meth:`restore_model` still reads it).
        """
        step = self._step_or_latest(step)
        try:
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
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            detail = " ".join(" ".join(str(e).splitlines()[1:4]).split())
            raise UserError(
                f"{self._step_dir(step)}: the checkpoint's state is laid out differently from "
                f"the state this code builds for its config ({detail}). A default that shapes "
                "the optimizer or architecture state (e.g. sae.threshold_lr_scale, "
                "optimizer.grad_clip) may have changed since it was written: set that field "
                "as the run had it to resume. `dictlearn export` reads such a run as it is."
            ) from None
        return Restored(
            step=step,
            state=restored[STATE],
            data_position=int(restored[DATA]["position"]),
            config=restored[CONFIG],
        )

    def restore_model(self, abstract_state: Any, step: int | None = None) -> tuple[Any, Any]:
        """Only ``(params, arch_state)`` of ``step`` (default: latest), onto the shardings in
        ``abstract_state``; the optimizer state is not read.

        What export needs. It also reads a run whose optimizer state this code would lay out
        differently: a run trained before a default that shapes the optax chain changed
        (JumpReLU's ``threshold_lr_scale`` adds an element) restores its parameters all the
        same, where :meth:`restore` stops at the tree mismatch.

        Raises:
            MissingInputError: no checkpoint exists in the directory.
        """
        step = self._step_or_latest(step)
        item = {"params": abstract_state.params, "arch_state": abstract_state.arch_state}
        # Not through the manager: its composite restore wants the whole state's tree.
        restored = ocp.PyTreeCheckpointer().restore(
            self._step_dir(step) / STATE,
            args=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            ),
        )
        return restored["params"], restored["arch_state"]

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        """Only the config saved with a checkpoint (no arrays are read)."""
        step = self._step_or_latest(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
        )
        return restored[CONFIG]

    def delete(self, step: int) -> None:
        """Delete the checkpoint of ``step`` (e.g. one a resume from an older step supersedes)."""
        self._manager.delete(step)

    def wait(self) -> None:
        """Block until any background save has committed.

        Raises:
            CheckpointWriteFailed: the background save failed to write.
        """
        with self._reporting_write_failure(self._pending):
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
            # A writer's manager starts deleting stale temporary directories in a background
            # thread; Orbax's close() does not wait for it, and a process that exits first (a
            # refused run directory, a UserError) gets a traceback from that thread at shutdown.
            await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
            if await_cleanup is not None:
                await_cleanup()
        finally:
            self._manager.close()


def abstract_like(tree: Any) -> Any:
    """Abstract (shape, dtype, sharding) version of a concrete pytree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
