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
