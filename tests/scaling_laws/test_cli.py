"""`dictlearn fit` and `dictlearn select` end to end on a sweep directory written by the test."""

from __future__ import annotations

import json

import pytest
import yaml

from dictlearn.config import load_config
from dictlearn.train.config import TrainConfig
from launch.cli import main
from scaling_laws.laws import FitResult
from scaling_laws.results import flops_per_token
from tests.scaling_laws.synthetic import (
    BATCH,
    D_MODEL,
    WIDTHS,
    K,
    draw_trials,
    true_loss,
    true_lr,
    write_sweep,
    write_trial,
)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A noiseless sweep with one failed and one unfinished trial, fitted by the CLI."""
    root = tmp_path_factory.mktemp("sweep")
    specs = draw_trials()
    write_sweep(root, specs[2:])
    write_trial(root, specs[0], status="failed", error="host preempted 3 times")
    write_trial(root, specs[1], final_eval=False)
    code = main(["fit", str(root), "--n-boot", "16", "--holdout-largest"])
    return root, code


def test_fit_writes_fits_table_and_plots(fitted, capsys):
    root, code = fitted
    assert code == 0
    out = root / "fits"
    fits = FitResult.model_validate_json((out / "fits.json").read_text())
    assert fits.loss_law.alpha == pytest.approx(0.4, abs=1e-3)
    assert fits.d_model == D_MODEL and fits.k == K and fits.architecture == "topk"
    assert {e.status for e in fits.excluded} == {"failed", "incomplete"}
    assert len(fits.trials) == len(draw_trials()) - 2
    assert fits.holdout is not None and all(abs(r.rel_error) < 0.01 for r in fits.holdout)
    table = (out / "table.txt").read_text()
    assert "alpha" in table and "holdout" in table and "host preempted 3 times" in table
    for name in ("loss_vs_n.png", "loss_vs_lr.png", "lr_vs_n.png", "compute_frontier.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_prints_the_table_and_warns_about_left_out_trials(tmp_path, capsys):
    specs = draw_trials(widths=WIDTHS[:3], lr_factors=(0.5, 1.0, 2.0))
    write_sweep(tmp_path, specs[1:])
    write_trial(tmp_path, specs[0], status="failed", error="boom")
    assert main(["fit", str(tmp_path), "--n-boot", "4", "--out", str(tmp_path / "f")]) == 0
    captured = capsys.readouterr()
    assert "E + A·N^-alpha" in captured.out
    assert "dictlearn fit: warning: 1 trial(s) left out" in captured.err
    assert "boom" in captured.err


def test_select_writes_a_valid_train_config_with_the_prediction(fitted, tmp_path, capsys):
    root, _ = fitted
    out = tmp_path / "big.yaml"
    n, tokens = 65536, 2**30
    code = main(
        [
            "select",
            str(root / "fits" / "fits.json"),
            f"n_features={n}",
            f"tokens={tokens}",
            "data.path=gs://bucket/acts",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    config = load_config(TrainConfig, out)
    assert config.sae.n_features == n and config.sae.k == K
    assert config.train.steps * config.train.batch_size == tokens
    assert config.train.batch_size == BATCH
    assert config.optimizer.lr == pytest.approx(float(true_lr(n, tokens)), rel=1e-2)
    assert config.data.path == "gs://bucket/acts"
    assert config.optimizer.warmup_steps == 50 and config.optimizer.decay_fraction == 0.2
    assert config.sae.k_aux == D_MODEL // 2
    assert config.sae.dead_window_tokens >= 1000 * n // K
    text = out.read_text()
    assert text.startswith("# Chosen by `dictlearn select`")
    sidecar = json.loads(out.with_suffix(".json").read_text())
    predicted = sidecar["predicted_eval_fvu"]
    assert predicted == pytest.approx(float(true_loss(n, tokens)), rel=1e-3)
    lo, hi = sidecar["eval_fvu_interval_80"]
    assert lo <= predicted <= hi
    assert f"predicted held-out FVU {predicted:.4f}" in text
    assert yaml.safe_load(text)["sae"]["n_features"] == n  # the header is only comments
    assert "selected: n_features 65536" in capsys.readouterr().out


def test_select_from_a_compute_budget(fitted, tmp_path):
    root, _ = fitted
    n, flops = 32768, 1e17
    out = tmp_path / "c.yaml"
    assert main(["select", str(root / "fits" / "fits.json"), f"n_features={n}", f"flops={flops}",
                 "--out", str(out)]) == 0  # fmt: skip
    config = load_config(TrainConfig, out)
    tokens = config.train.steps * config.train.batch_size
    assert tokens == pytest.approx(flops / flops_per_token("topk", D_MODEL, n, K), abs=BATCH)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["n_features=4096"], "give exactly one of tokens=T or flops=C"),
        (["n_features=4096", "tokens=1e9", "flops=1e18"], "give exactly one of"),
        (["tokens=1e9"], "give n_features=N"),
        (["n_features=4096", "tokens=1e9", "optimizer.lr=-1"], "optimizer.lr"),
    ],
)
def test_select_bad_input_is_one_line_and_exit_2(fitted, args, message, capsys):
    root, _ = fitted
    assert main(["select", str(root / "fits" / "fits.json"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dictlearn select: error: ") and message in err


def test_fit_with_too_few_widths_is_one_line_and_exit_2(tmp_path, capsys):
    write_sweep(
        tmp_path, [s for s in draw_trials(lr_factors=(1.0,)) if s.n_features in (1024, 2048)]
    )
    assert main(["fit", str(tmp_path), "--n-boot", "4"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "dictlearn fit: error: the loss law needs ≥ 3 widths with finished trials, found 2: "
        "1024, 2048"
    )
    assert not (tmp_path / "fits").exists()


def test_fit_on_a_directory_that_is_not_a_sweep(tmp_path, capsys):
    assert main(["fit", str(tmp_path)]) == 2
    assert "is not a sweep directory" in capsys.readouterr().err


def test_select_without_an_lr_law_needs_a_learning_rate(tmp_path, capsys):
    write_sweep(tmp_path, draw_trials(widths=WIDTHS[:3], lr_factors=(1.0,)))
    assert main(["fit", str(tmp_path), "--n-boot", "4"]) == 0
    fits = str(tmp_path / "fits" / "fits.json")
    assert main(["select", fits, "n_features=8192", "tokens=1e9"]) == 2
    err = capsys.readouterr().err
    assert "no learning-rate law" in err and "optimizer.lr=" in err
    out = tmp_path / "s.yaml"
    assert main(["select", fits, "n_features=8192", "tokens=1e9", "optimizer.lr=1e-4",
                 "--out", str(out)]) == 0  # fmt: skip
    assert load_config(TrainConfig, out).optimizer.lr == 1e-4
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["lr"] == 1e-4 and "set by hand" in sidecar["notes"][0]


def test_selected_config_starts_fresh_even_from_a_branched_trial(fitted):
    """Sweep trials may branch from a trunk's checkpoint; the large run must not."""
    from scaling_laws.select import select_config

    root, _ = fitted
    fits = FitResult.model_validate_json((root / "fits" / "fits.json").read_text())
    branched = fits.template_config | {
        "init": {"from_checkpoint": str(root / "trunks" / "t" / "checkpoints"), "step": 3},
        "checkpoint": fits.template_config.get("checkpoint", {}) | {"keep_steps": [3, 7]},
    }
    fits = fits.model_copy(update={"template_config": branched})
    selection = select_config(fits, 4 * max(WIDTHS), tokens=2**22)
    config = TrainConfig.model_validate(selection.config)
    assert config.init is None and config.checkpoint.keep_steps == []
