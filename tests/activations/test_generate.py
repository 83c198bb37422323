"""``dictlearn.activations.main`` end to end on a real local Ray cluster and the real Gemma 3 270M.

One Ray cluster serves the whole module (starting one takes ~10 s). It is started after the fake
GCS server so that its workers inherit the emulator's environment, which the gs:// test needs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray

from dictlearn.activations import GenerateResult, main
from dictlearn.config import ConfigError
from dictlearn.corpus import CorpusError
from dictlearn.data import ActivationDataset, DatasetError
from dictlearn.ray_cluster import local_ray_cluster
from dictlearn.train.trainer import main as train_main
from tests.train.helpers import tiny_config

from .helpers import expected_rows, tiny

pytest_plugins = ["tests.gcs_emulator"]


@pytest.fixture(scope="module")
def ray_cluster(gcs_bucket: str) -> Iterator[None]:
    with local_ray_cluster(num_cpus=4):
        yield


def _files(url: str) -> list[str]:
    return sorted(p.name for p in (Path(url) / "shards").iterdir())


def _check_against_reference(result: GenerateResult, config) -> None:
    for shard in range(config.corpus.n_shards):
        want = expected_rows(config, shard)
        for hook, url in result.datasets.items():
            ds = ActivationDataset.open(url)
            got = ds.read_rows(shard, 0, ds.manifest.shards[shard].n_tokens)
            np.testing.assert_array_equal(got, want[hook], err_msg=f"{hook} shard {shard}")


def test_two_workers_match_direct_forward_and_rerun_skips(ray_cluster, tmp_path: Path) -> None:
    config = tiny(str(tmp_path / "acts"))
    result = main(config)
    assert (result.shards_written, result.shards_skipped, result.workers) == (3, 0, 2)
    assert result.lm_tokens == 30 * 64
    assert set(result.datasets) == {"resid_post.3", "attn_out.1"}
    for hook, url in result.datasets.items():
        ds = ActivationDataset.open(url)
        ds.validate(deep=True)
        m = ds.manifest
        assert (m.hook, m.layer, m.source_model, m.d_model) == (
            hook,
            int(hook[-1]),
            "gemma3-270m",
            640,
        )
        assert m.n_tokens == result.tokens
        assert _files(url) == [f"shard-{i:05d}.{ext}" for i in range(3) for ext in ("bin", "json")]
    # 30 contexts of 64 tokens minus BOS at position 0 and the separator BOS between documents.
    assert 30 * 63 - 30 < result.tokens < 30 * 63
    _check_against_reference(result, config)

    # A finished dataset is a no-op: nothing is started or rewritten.
    bins = Path(result.datasets["resid_post.3"]) / "shards" / "shard-00001.bin"
    before = bins.stat().st_mtime_ns
    again = main(config)
    assert (again.shards_written, again.shards_skipped, again.workers) == (0, 3, 0)
    assert again.tokens == result.tokens
    assert bins.stat().st_mtime_ns == before

    # An interrupted run (shard 1 committed for one hook only, no manifests): only shard 1 is
    # redone, by one worker, with the same bytes.
    crc = ActivationDataset.open(result.datasets["attn_out.1"]).manifest.shards[1].crc32
    (Path(result.datasets["resid_post.3"]) / "shards" / "shard-00001.json").unlink()
    for url in result.datasets.values():
        (Path(url) / "manifest.json").unlink()
    resumed = main(config)
    assert (resumed.shards_written, resumed.shards_skipped, resumed.workers) == (1, 2, 1)
    assert ActivationDataset.open(result.datasets["attn_out.1"]).manifest.shards[1].crc32 == crc
    _check_against_reference(resumed, config)


def test_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    # No Ray needed: the ledger is checked before any worker starts.
    from dictlearn.activations.generate import plan_generation
    from dictlearn.data import write_shard

    config = tiny(str(tmp_path / "acts"))
    first = plan_generation(config)
    assert plan_generation(config).fingerprint == first.fingerprint  # same settings: fine
    # Nothing written yet under the old settings: new ones simply replace them.
    shorter = tiny(str(tmp_path / "acts"), context_length=32)
    assert plan_generation(shorter).fingerprint != first.fingerprint
    write_shard(plan_generation(config).outputs["attn_out.1"], 0, np.ones((4, 640)), "float32")
    # Now a shard exists: other settings are refused, naming what differs.
    with pytest.raises(DatasetError, match=r"other settings \(differing: context_length\)"):
        main(shorter)
    with pytest.raises(DatasetError, match=r"differing: corpus\)"):
        main(tiny(str(tmp_path / "acts"), corpus={"seed": 1}))


def test_output_holding_another_dataset_is_refused(tmp_path: Path) -> None:
    from dictlearn.data import PlantedConfig, write_planted_dataset

    root = tmp_path / "acts"
    write_planted_dataset(
        str(root / "resid_post.3"),
        PlantedConfig(d_model=8, n_features=8, n_tokens=256, mean_active=2, shard_tokens=256),
    )
    with pytest.raises(DatasetError, match="not written by dictlearn generate"):
        main(tiny(str(root), hooks=["resid_post.3"]))


def test_shard_of_another_width_in_the_dataset_is_refused(tmp_path: Path) -> None:
    from dictlearn.activations.generate import plan_generation
    from dictlearn.data import write_shard

    config = tiny(str(tmp_path / "acts"), hooks=["resid_post.3"])
    plan = plan_generation(config)  # what a first run does before its workers start
    write_shard(plan.outputs["resid_post.3"], 0, np.ones((8, 16), np.float32), "float32")
    # Refused before any worker starts (this test has no Ray cluster).
    with pytest.raises(DatasetError, match=r"shard-00000.json: d_model 16 .* d_model 640"):
        main(config)


def test_worker_sigkill_mid_shard_is_restarted(ray_cluster, tmp_path: Path) -> None:
    # One worker, two shards of 10 batches each, both queued on it at once.
    config = tiny(
        str(tmp_path / "acts"),
        hooks=["resid_post.3"],
        corpus={"n_shards": 2},
        batch_size=2,
        max_tokens=64 * 20 * 2,
        ray={"num_workers": 1, "max_in_flight": 2},
    )
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = main(config)
        except BaseException as err:  # re-raised in the test thread below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    try:
        actor = _find_worker(timeout=120)
        deadline = time.monotonic() + 120
        while True:
            status = ray.get(actor.status.remote(), timeout=60)
            if status["shard"] is not None and status["batches"] >= 2:
                break
            assert time.monotonic() < deadline, f"worker never got into a shard: {status}"
            time.sleep(0.02)
        pid = ray.get(actor.pid.remote(), timeout=60)
        os.kill(pid, signal.SIGKILL)
        killed_in = status
    finally:
        thread.join(timeout=300)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    result: GenerateResult = outcome["result"]  # type: ignore[assignment]
    # Both shards run on the worker at once (their forwards take turns, in whichever order the
    # two calls reach the lock): the kill came in the middle of one shard's forwards.
    assert killed_in["shard"] in (0, 1) and killed_in["batches"] < 10, killed_in
    assert result.worker_restarts == 1
    assert (result.shards_written, result.shards_skipped) == (2, 0)
    url = result.datasets["resid_post.3"]
    assert _files(url) == [f"shard-{i:05d}.{ext}" for i in range(2) for ext in ("bin", "json")]
    ds = ActivationDataset.open(url)
    ds.validate(deep=True)
    _check_against_reference(result, config)


def _find_worker(timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [n for n in ray.util.list_named_actors() if n.startswith("dictlearn-generate-")]
        if names:
            return ray.get_actor(names[0])
        time.sleep(0.05)
    raise AssertionError("no generate worker appeared")


def test_bad_jsonl_line_names_the_file_and_line(ray_cluster, tmp_path: Path) -> None:
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "fine words here, and more of them"}\n{"text": 3}\n')
    config = tiny(
        str(tmp_path / "acts"),
        hooks=["resid_post.0"],
        corpus={"paths": [str(corpus)], "n_shards": 1},
        max_tokens=None,
        ray={"num_workers": 1},
    )
    # Raised on the worker, re-raised here as itself (not wrapped in Ray's RayTaskError).
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: field 'text' is int") as info:
        main(config)
    assert not isinstance(info.value, ray.exceptions.RayTaskError)


def test_generate_to_gcs_then_train_reads_it(ray_cluster, gcs_url: str, tmp_path: Path) -> None:
    config = tiny(gcs_url, hooks=["resid_post.3"], output={"dtype": "bfloat16"})
    result = main(config)
    url = result.datasets["resid_post.3"]
    assert url == f"{gcs_url}/resid_post.3"
    ds = ActivationDataset.open(url)
    ds.validate(deep=True)
    assert ds.manifest.dtype == "bfloat16" and ds.manifest.n_tokens == result.tokens
    assert main(config).shards_skipped == 3  # the ledger and manifests are read back from GCS

    train = tiny_config(
        tmp_path,
        url,
        train={"steps": 4, "batch_size": 64},
        checkpoint={"every_steps": 4},
    )
    trained = train_main(train)
    assert trained.steps == 4
    assert np.isfinite(trained.metrics["loss"])


def test_config_errors_before_ray(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"hooks: layer 18 is out of range.*valid indices 0\.\.17"
    ):
        main(tiny(str(tmp_path / "a"), hooks=["resid_post.18"]))
    with pytest.raises(ConfigError, match=r"fewer than corpus\.n_shards=3"):
        main(tiny(str(tmp_path / "a"), max_tokens=64 * 2))
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf does not exist"):
        main(tiny(str(tmp_path / "a"), model={"gguf": str(tmp_path / "nope.gguf")}))
    assert not (tmp_path / "a").exists()  # nothing written for a bad config
