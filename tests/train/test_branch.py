"""Branching a run from another run's checkpoint (``TrainConfig.init``): a sweep's token budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from dictlearn.tracking import read_metrics
from dictlearn.train.trainer import checkpoint_dir_of, main, run_dir_of
from tests.train.helpers import (
    assert_trees_equal,
    make_planted,
    restore_final,
    tiny_config,
    with_overrides,
)

BUDGETS = (24, 40)  # steps of the two branches (batch 64: 1,536 and 2,560 tokens)
DECAY = 0.25


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url)
    return url


def _config(tmp_path: Path, url: str, name: str, steps: int, decay: float, **sections):
    checkpoint = {"every_steps": 1000, "async_save": False, "keep": 1}
    # A window no run here reaches: the tiny SAE's derived one (2,048 tokens) lies between the
    # trunk's 30 steps and the 40-step runs, so only these would compile the dead-latent switch
    # (TrainProgram.dead_latents_possible), and the two programs round differently.
    sae = {"dead_window_tokens": 1 << 16} | sections.pop("sae", {})
    return tiny_config(
        tmp_path,
        url,
        sae=sae,
        data={"eval_fraction": 0.125},
        optimizer={"lr": 3e-3, "warmup_steps": 4, "decay_fraction": decay},
        train={"steps": steps, "log_every": 4, "eval_batches": 2},
        checkpoint=checkpoint | sections.pop("checkpoint", {}),
        run={"output_dir": str(tmp_path / "runs"), "name": name},
        **sections,
    )


def test_branches_equal_runs_from_scratch(tmp_path: Path, planted_url: str) -> None:
    points = [round(t * (1 - DECAY)) for t in BUDGETS]  # 18, 30
    trunk = _config(
        tmp_path, planted_url, "trunk", max(points), 0.0, checkpoint={"keep_steps": points}
    )
    main(trunk)
    for budget, point in zip(BUDGETS, points, strict=True):
        scratch = main(_config(tmp_path, planted_url, f"scratch-{budget}", budget, DECAY))
        branch_cfg = _config(
            tmp_path,
            planted_url,
            f"branch-{budget}",
            budget,
            DECAY,
            init={"from_checkpoint": checkpoint_dir_of(trunk), "step": point},
        )
        branch = main(branch_cfg)
        print(
            f"budget {budget} steps: eval fvu scratch {scratch.eval_metrics['fvu']:.6f} "
            f"branch {branch.eval_metrics['fvu']:.6f}"
        )
        assert branch.steps == budget
        assert abs(branch.eval_metrics["fvu"] / scratch.eval_metrics["fvu"] - 1) < 0.01
        # In fact the same run: the lr schedules agree up to the branch point, and the data
        # position comes with the state.
        _, a = restore_final(branch_cfg)
        _, b = restore_final(with_overrides(branch_cfg, f"run.name=scratch-{budget}", "init=null"))
        assert_trees_equal(a.state, b.state)
        # The branch's metrics start after the branch point.
        steps = [r["step"] for r in read_metrics(run_dir_of(branch_cfg)) if "loss" in r]
        assert steps[0] > point and steps[-1] == budget


def test_branch_refuses_another_config_or_a_decaying_trunk(tmp_path: Path, planted_url: str):
    trunk = _config(tmp_path, planted_url, "trunk", 16, 0.5, checkpoint={"keep_steps": [6, 12]})
    main(trunk)
    init = {"from_checkpoint": checkpoint_dir_of(trunk), "step": 6}
    other = _config(tmp_path, planted_url, "b1", 16, 0.25, init=init, sae={"k": 8})
    with pytest.raises(ValueError, match=r"another config:\n  sae\.k: checkpoint has 4"):
        main(other)
    late = _config(tmp_path, planted_url, "b2", 24, 0.25, init=init | {"step": 12})
    with pytest.raises(ValueError, match=r"past the start of .*lr decay \(step 8\)"):
        main(late)
    missing = _config(tmp_path, planted_url, "b3", 16, 0.25, init=init | {"step": 5})
    with pytest.raises(ValueError, match=r"no checkpoint at that step \(it has \[6, 12, 16\]"):
        main(missing)
