"""The generation ledger is a strict pydantic model that reads the ledgers already on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dictlearn.activations import GenerationLedger
from dictlearn.activations.generate import LEDGER_NAME, _check_or_write_ledger
from dictlearn.data import DatasetError

SETTINGS = {"hooks": ["resid_post.6"], "context_length": 128, "weights": "w", "corpus_plan": "p"}


def _as_first_written(root: Path, fingerprint: str = "f" * 64) -> dict:
    """A ledger exactly as the untyped dict of the first version wrote it."""
    record = {
        "format": "dictlearn.generation",
        "version": 1,
        "fingerprint": fingerprint,
        "n_shards": 8,
        "datasets": {"resid_post.6": f"{root}/resid_post.6"},
        "settings": SETTINGS,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / LEDGER_NAME).write_text(json.dumps(record, indent=1))
    return record


def test_reads_a_ledger_written_before_the_model(tmp_path: Path) -> None:
    record = _as_first_written(tmp_path)
    ledger = GenerationLedger.model_validate_json((tmp_path / LEDGER_NAME).read_text())
    assert ledger.model_dump(mode="json") == record
    outputs = record["datasets"]
    assert _check_or_write_ledger(str(tmp_path), outputs, SETTINGS, "f" * 64, 8).endswith(
        LEDGER_NAME
    )


def test_writes_the_same_layout(tmp_path: Path) -> None:
    outputs = {"resid_post.6": f"{tmp_path}/resid_post.6"}
    _check_or_write_ledger(str(tmp_path), outputs, SETTINGS, "a" * 64, 8)
    written = json.loads((tmp_path / LEDGER_NAME).read_text())
    assert written == {
        "format": "dictlearn.generation",
        "version": 1,
        "fingerprint": "a" * 64,
        "n_shards": 8,
        "datasets": outputs,
        "settings": SETTINGS,
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("fingerprint"), "fingerprint: Field required"),
        (lambda r: r.update(version=2), "version"),
        (lambda r: r.update(datasets=["x"]), "datasets"),
        (lambda r: r.update(extra=1), "extra: Extra inputs are not permitted"),
    ],
)
def test_a_broken_ledger_names_the_field(tmp_path: Path, edit, message: str) -> None:
    record = _as_first_written(tmp_path)
    edit(record)
    (tmp_path / LEDGER_NAME).write_text(json.dumps(record))
    with pytest.raises(DatasetError, match="not a generation ledger") as err:
        _check_or_write_ledger(str(tmp_path), {}, SETTINGS, "f" * 64, 8)
    assert message in str(err.value)


def test_a_ledger_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / LEDGER_NAME).write_text("{not json")
    with pytest.raises(DatasetError, match="not a generation ledger"):
        _check_or_write_ledger(str(tmp_path), {}, SETTINGS, "f" * 64, 8)
