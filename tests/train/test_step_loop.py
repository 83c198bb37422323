"""The training loop reads metrics back only at log steps (AuxK revival: test_auxk_revival.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dictlearn.tracking import read_metrics
from dictlearn.train import inflight
from dictlearn.train.trainer import main, run_dir_of
from tests.train.helpers import make_planted, tiny_config

D_MODEL = 16


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url, d_model=D_MODEL)
    return url


def test_metrics_are_read_only_at_log_steps_one_step_late(
    tmp_path: Path, planted_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps are dispatched back to back: the host reads a log step's metrics after it has
    dispatched the next step, and reads nothing at other steps (no per-step device read to
    choose AuxK either: the dead window is short, so latents die and AuxK runs)."""
    events: list[tuple[str, int]] = []
    add, read = inflight.DeferredMetrics.add, inflight.DeferredMetrics.read

    def spy_add(self, step, metrics):
        events.append(("dispatched", step))
        return add(self, step, metrics)

    def spy_read(self, upto):
        events.append(("read", upto))
        return read(self, upto)

    monkeypatch.setattr(inflight.DeferredMetrics, "add", spy_add)
    monkeypatch.setattr(inflight.DeferredMetrics, "read", spy_read)
    config = tiny_config(
        tmp_path,
        planted_url,
        sae={"dead_window_tokens": 128},
        train={"steps": 12, "log_every": 4},
        checkpoint={"every_steps": 6},
    )
    main(config)
    expected = []
    for step in range(1, 13):
        expected.append(("dispatched", step))
        if step - 1 in (4, 8):  # log steps: read after the next dispatch
            expected.append(("read", step - 1))
        if step in (6, 12):  # checkpoints: every loss checked before the save
            expected.append(("read", step))
    assert events == expected
    rows = [r for r in read_metrics(run_dir_of(config)) if "loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert rows[-1]["dead_fraction"] > 0 and rows[-1]["aux_loss"] > 0


def test_step_schedule_reads_before_every_save_eval_and_stop() -> None:
    """The decision both loops (single run and group) make after each step."""
    schedule = inflight.StepSchedule(
        steps=20, log_every=4, eval_every=10, checkpoint_every=6, keep_steps=frozenset({7})
    )

    def due(done: int, stopping: bool = False, last_saved: int | None = None) -> set[str]:
        actions = schedule.after(done, stopping, last_saved)
        return {name for name, on in vars(actions).items() if on}

    assert due(1) == set()
    assert due(4) == {"read_next_step"}  # a log step alone is read one step late
    assert due(6) == {"save", "read_now"}
    assert due(7) == {"save", "read_now"}  # a kept step is saved
    assert due(10) == {"evaluate", "read_now"}
    assert due(12) == {"save", "read_now"}  # logged and saved: read at once
    assert due(20) == {"evaluate", "save", "read_now"}
    assert due(3, stopping=True) == {"save", "stop", "read_now"}
    assert due(6, stopping=True, last_saved=6) == {"save", "stop", "read_now"}
    assert due(9, stopping=True, last_saved=9) == {"stop", "read_now"}  # no second save
    assert [s for s in range(1, 21) if schedule.logs(s)] == [4, 8, 12, 16, 20]
