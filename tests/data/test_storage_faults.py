"""Injected storage faults: fake-gcs-server behind a proxy that fails a fraction of requests.

The proxy (``tests/fault_proxy.py``) answers 503 or 429, or resets the connection before or
after forwarding, on a set fraction of requests, for a bounded number of faults. Runs through it
must give exactly what a fault-free run gives; an outage (every request failing, without end)
must end in one line naming the object.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from dictlearn.data import (
    ActivationDataset,
    BatchStream,
    PlantedConfig,
    storage,
    write_planted_dataset,
)
from launch.cli import main as cli_main
from sharding.distributed import free_port
from tests.fault_proxy import FAULT_KINDS, FaultProxy
from tests.gcs_emulator import BUCKET, emulator, endpoint

PLANTED = PlantedConfig(
    d_model=16, n_features=32, n_tokens=6000, mean_active=3, seed=0, shard_tokens=2048
)


@dataclass
class FaultyGcs:
    proxy: FaultProxy
    bucket: str  # gs://bucket, reached through the proxy


@pytest.fixture(scope="module")
def faulty_gcs() -> Iterator[FaultyGcs]:
    """A fake GCS of its own whose only way in is the fault proxy (upload URLs included)."""
    port = free_port()
    with (
        FaultProxy(f"http://127.0.0.1:{port}", seed=1) as proxy,
        emulator(port, external_url=proxy.url),
        endpoint(proxy.url),
    ):
        yield FaultyGcs(proxy, f"gs://{BUCKET}")


def _read_everything(url: str) -> list[np.ndarray]:
    dataset = ActivationDataset.open(url)
    dataset.validate(deep=True)
    with BatchStream(dataset, global_batch=64, seed=3, block_rows=64, shuffle_blocks=4) as s:
        return list(itertools.islice(s, 40))


def test_dataset_written_and_read_through_faults_is_exact(faulty_gcs: FaultyGcs) -> None:
    reference = f"{faulty_gcs.bucket}/reference"
    write_planted_dataset(reference, PLANTED)
    expected = _read_everything(reference)
    assert faulty_gcs.proxy.injected == {}

    faulted = f"{faulty_gcs.bucket}/faulted"
    faulty_gcs.proxy.arm(rate=0.25, kinds=FAULT_KINDS, max_faults=12)
    write_planted_dataset(faulted, PLANTED)
    got = _read_everything(faulted)
    injected = dict(faulty_gcs.proxy.injected)
    faulty_gcs.proxy.disarm()

    assert sum(injected.values()) == 12 and set(injected) == set(FAULT_KINDS), injected
    assert (
        ActivationDataset.open(faulted).manifest.shards
        == ActivationDataset.open(reference).manifest.shards
    )
    for batch, want in zip(got, expected, strict=True):
        np.testing.assert_array_equal(batch, want)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["503", "reset"])
def test_outage_ends_in_one_line_naming_the_object(
    faulty_gcs: FaultyGcs,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"{faulty_gcs.bucket}/outage-{kind}"
    write_planted_dataset(url, PLANTED)
    # gcsfs's own 6 tries (~30 s) are kept; our pauses are cut so the test ends in a minute.
    monkeypatch.setattr(storage, "RETRY_PAUSES", (0.5,))
    faulty_gcs.proxy.arm(rate=1.0, kinds=[kind], max_faults=None)
    try:
        status = cli_main(["validate", url])
    finally:
        faulty_gcs.proxy.disarm()
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1, err
    assert err.startswith(f"dictlearn validate: error: {url}/manifest.json: storage still failing")
    assert "after 2 tries" in err and "re-run: finished work is kept" in err
