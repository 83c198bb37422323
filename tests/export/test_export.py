"""Exports: every architecture in every format it fits, loaded back; reproducible bytes; bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn.data import ActivationDataset
from dictlearn.errors import UserError
from dictlearn.export import (
    ExportConfig,
    ExportError,
    InferenceSAE,
    export_sae,
    load_run_sae,
    load_sae,
)
from dictlearn.sae import get_architecture
from dictlearn.train.checkpoint import Checkpointer
from dictlearn.train.config import TrainConfig
from dictlearn.train.step import TrainProgram
from dictlearn.train.trainer import main as train_main
from launch.cli import main as cli_main
from sharding import MeshConfig, make_mesh
from tests.train.helpers import ARCHITECTURES, make_planted, restore_final, tiny_config

pytest_plugins = ["tests.gcs_emulator"]

FORMATS_OF = {
    "topk": ("saelens", "native"),
    "batchtopk": ("saelens", "gemmascope", "native"),
    "jumprelu": ("saelens", "gemmascope", "native"),
    "relu_l1": ("saelens", "gemmascope", "native"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple]:
    """One tiny trained run per architecture on a planted dataset with a non-trivial scale."""
    tmp = tmp_path_factory.mktemp("export-runs")
    data = tmp / "data"
    # scale != 1 so a missing normalisation fold cannot pass unnoticed.
    make_planted(data, offset_scale=3.0)
    out = {}
    for arch in ARCHITECTURES:
        cfg = tiny_config(tmp / arch, data, sae={"architecture": arch}, mesh={"model": 2})
        train_main(cfg)
        out[arch] = (cfg, data)
    return out


def _raw_rows(data: Path, n: int = 256) -> np.ndarray:
    return ActivationDataset.open(str(data)).read_rows(0, 0, n)


def _reference(cfg, data: Path, x_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latents and reconstruction from the TRAINING code path on normalised inputs."""
    _program, restored = restore_final(cfg)
    params = jax.device_get(restored.state.params)
    arch_state = jax.device_get(restored.state.arch_state)
    dataset = ActivationDataset.open(str(data))
    arch = get_architecture(cfg.sae, dataset.d_model)
    s = dataset.norm_scale
    latents = arch.encode(params, jnp.asarray(x_raw) * s, arch_state)
    recon = arch.decode(params, latents) / s
    return np.asarray(latents), np.asarray(recon)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folded_sae_matches_the_training_code_on_raw_activations(runs, arch):
    cfg, data = runs[arch]
    sae, provenance = load_run_sae(f"{cfg.run.output_dir}/{cfg.run_name}")
    x = _raw_rows(data)
    latents, recon = _reference(cfg, data, x)
    np.testing.assert_allclose(np.asarray(sae.encode(x)), latents, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sae.reconstruct(x)), recon, rtol=1e-5, atol=1e-5)
    assert sae.metadata["trained_architecture"] == arch
    assert provenance["tokens_trained"] == cfg.train.steps * cfg.train.batch_size
    assert provenance["dataset"]["norm_scale"] != pytest.approx(1.0)


@pytest.mark.parametrize(
    "arch,fmt", [(a, f) for a in ARCHITECTURES for f in FORMATS_OF[a]], ids=lambda v: str(v)
)
def test_export_round_trip_and_same_bytes(runs, tmp_path, arch, fmt):
    cfg, data = runs[arch]
    run_dir = f"{cfg.run.output_dir}/{cfg.run_name}"
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        export_sae(ExportConfig(source=run_dir, format=fmt, out=str(out), density_tokens=1024))
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs"

    original, _ = load_run_sae(run_dir)
    loaded = load_sae(str(first))
    x = _raw_rows(data)
    # Gemma Scope's bias convention shifts b_enc by b_dec @ W_enc and back: float rounding.
    np.testing.assert_allclose(
        np.asarray(loaded.encode(x)), np.asarray(original.encode(x)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(loaded.reconstruct(x)), np.asarray(original.reconstruct(x)), rtol=1e-5, atol=1e-5
    )
    if fmt != "gemmascope":
        assert loaded.metadata["hook_name"] == original.metadata["hook_name"]
        assert loaded.log_feature_density is not None
        assert loaded.log_feature_density.shape == (loaded.d_sae,)


def test_export_reads_a_run_whose_optimizer_state_this_code_lays_out_differently(runs, tmp_path):
    """A run trained before a default that shapes the optax chain changed (JumpReLU's
    threshold_lr_scale: 1 then, 10 now) still exports: export reads the parameters alone."""
    cfg, data = runs["jumprelu"]
    run_dir = tmp_path / "old-run"
    shutil.copytree(f"{cfg.run.output_dir}/{cfg.run_name}", run_dir)
    saved = run_dir / "checkpoints" / str(cfg.train.steps) / "config" / "metadata"
    config = json.loads(saved.read_text())
    assert config["sae"]["threshold_lr_scale"] == 10.0  # trained with a 3-element chain
    config["sae"]["threshold_lr_scale"] = 1.0  # rebuilt, the chain has 2
    saved.write_text(json.dumps(config))
    restored_config = TrainConfig.model_validate(config)
    d_model = ActivationDataset.open(str(data)).d_model
    program = TrainProgram(
        get_architecture(restored_config.sae, d_model),
        restored_config.resolved_optimizer(d_model),
        total_steps=cfg.train.steps,
        global_batch=cfg.train.batch_size,
        mesh=make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1]),
        norm_scale=1.0,
    )
    checkpointer = Checkpointer(str(run_dir / "checkpoints"), async_save=False)
    try:  # the whole state no longer restores: the case is real
        with pytest.raises(UserError, match=r"laid out differently.*threshold_lr_scale") as e:
            checkpointer.restore(program.abstract_state())
        # The message names the step's directory as it is on disk.
        assert str(e.value).startswith(f"{run_dir / 'checkpoints' / str(cfg.train.steps)}:")
    finally:
        checkpointer.close()

    old, _ = load_run_sae(str(run_dir))
    current, _ = load_run_sae(f"{cfg.run.output_dir}/{cfg.run_name}")
    x = _raw_rows(data)
    np.testing.assert_array_equal(np.asarray(old.encode(x)), np.asarray(current.encode(x)))
    np.testing.assert_array_equal(old.W_dec, current.W_dec)


def test_native_export_carries_provenance(runs, tmp_path):
    cfg, data = runs["topk"]
    export_sae(
        ExportConfig(
            source=f"{cfg.run.output_dir}/{cfg.run_name}", format="native", out=str(tmp_path)
        )
    )
    info = json.loads((tmp_path / "sae.json").read_text())
    prov = info["provenance"]
    manifest = (data / "manifest.json").read_bytes()
    assert prov["dataset"]["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert prov["config"]["sae"]["k"] == cfg.sae.k
    assert prov["metrics"]["train"]["fvu"] > 0
    assert prov["checkpoint_step"] == cfg.train.steps
    assert info["metadata"]["model_name"] == "planted"
    assert info["k"] == cfg.sae.k and prov["code_version"]


def test_saelens_config_fields(runs, tmp_path):
    cfg, _ = runs["jumprelu"]
    export_sae(
        ExportConfig(
            source=f"{cfg.run.output_dir}/{cfg.run_name}/checkpoints",
            format="saelens",
            out=str(tmp_path),
            step=4,
        )
    )
    saelens_cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert saelens_cfg["architecture"] == "jumprelu"
    assert saelens_cfg["normalize_activations"] == "none"
    assert saelens_cfg["d_sae"] == cfg.sae.n_features
    assert saelens_cfg["metadata"]["hook_name"] == "planted"


def test_gemma_scope_release_file_loads_with_its_bias_convention(tmp_path):
    """A params.npz as Gemma Scope ships it: pre = x @ W_enc + b_enc (no b_dec subtracted)."""
    rng = np.random.default_rng(0)
    d_in, d_sae = 8, 24
    arrays = {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_enc": rng.normal(size=d_sae).astype(np.float32),
        "b_dec": rng.normal(size=d_in).astype(np.float32),
        "threshold": np.abs(rng.normal(size=d_sae)).astype(np.float32),
    }
    np.savez(tmp_path / "params.npz", **arrays)
    sae = load_sae(str(tmp_path / "params.npz"))
    x = rng.normal(size=(5, d_in)).astype(np.float32)
    pre = x @ arrays["W_enc"] + arrays["b_enc"]
    expected = np.where(pre > arrays["threshold"], pre, 0.0)
    np.testing.assert_allclose(np.asarray(sae.encode(x)), expected, rtol=1e-5, atol=1e-5)
    assert load_sae(str(tmp_path)).digest == sae.digest  # the directory works too


def test_export_on_gcs(runs, gcs_url):
    cfg, _ = runs["topk"]
    run_dir = f"{cfg.run.output_dir}/{cfg.run_name}"
    export_sae(ExportConfig(source=run_dir, format="saelens", out=gcs_url, density_tokens=512))
    loaded = load_sae(gcs_url)
    original, _ = load_run_sae(run_dir)
    assert loaded.digest == original.digest


def test_run_on_gcs_exports(runs, tmp_path, gcs_url):
    """A run trained to gs:// is read back (parameters only) from there."""
    _, data = runs["jumprelu"]
    cfg = tiny_config(
        tmp_path,
        data,
        sae={"architecture": "jumprelu"},
        run={"output_dir": gcs_url, "name": "on-gcs"},
    )
    train_main(cfg)
    sae, provenance = load_run_sae(f"{gcs_url}/on-gcs")
    x = _raw_rows(data)
    latents, recon = _reference(cfg, data, x)
    np.testing.assert_allclose(np.asarray(sae.encode(x)), latents, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sae.reconstruct(x)), recon, rtol=1e-5, atol=1e-5)
    assert provenance["checkpoint_step"] == cfg.train.steps


def test_cli_export_and_bad_input(runs, tmp_path, capsys):
    cfg, _ = runs["topk"]
    run_dir = f"{cfg.run.output_dir}/{cfg.run_name}"
    out = tmp_path / "out"
    assert cli_main(["export", run_dir, "--format", "saelens", "--out", str(out)]) == 0
    assert "exported step 8" in capsys.readouterr().out

    def fails(*argv: str) -> str:
        assert cli_main(list(argv)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") >= 1
        return err

    assert "gemmascope format holds JumpReLU SAEs only" in fails(
        "export", run_dir, "--format", "gemmascope", "--out", str(tmp_path / "g")
    )
    assert not (tmp_path / "g" / "params.npz").exists()
    assert "no checkpoint at step 3" in fails(
        "export", run_dir, "--format", "native", "--out", str(tmp_path / "n"), "--step", "3"
    )
    assert "not a training run" in fails(
        "export", str(tmp_path), "--format", "native", "--out", str(tmp_path / "n")
    )

    # A truncated weights file is named, not a traceback from safetensors.
    weights = out / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ExportError, match=r"sae_weights\.safetensors is truncated or corrupt"):
        load_sae(str(out))
    with pytest.raises(ExportError, match="unknown SAE format 'onnx'"):
        load_sae(str(out), fmt="onnx")
    with pytest.raises(ExportError, match="holds no SAE"):
        load_sae(str(tmp_path / "empty"))


def test_input_width_is_checked():
    sae = InferenceSAE(
        architecture="relu",
        W_enc=np.zeros((4, 6), np.float32),
        b_enc=np.zeros(6, np.float32),
        W_dec=np.zeros((6, 4), np.float32),
        b_dec=np.zeros(4, np.float32),
        metadata={"hook_name": "resid_post.3"},
    )
    with pytest.raises(ExportError, match=r"width 5, the SAE reads d_in 4 \(hook resid_post.3\)"):
        sae.encode(np.zeros((2, 5), np.float32))
    with pytest.raises(ExportError, match="W_dec has shape"):
        InferenceSAE(
            architecture="relu",
            W_enc=np.zeros((4, 6), np.float32),
            b_enc=np.zeros(6, np.float32),
            W_dec=np.zeros((4, 6), np.float32),
            b_dec=np.zeros(4, np.float32),
        )
