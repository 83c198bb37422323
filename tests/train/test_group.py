"""Several SAEs on one batch stream: equal to each trained alone, resumable, strict config."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from dictlearn.config import ConfigError, load_config, validate
from dictlearn.tracking import read_metrics
from dictlearn.train import group as group_trainer
from dictlearn.train.config import GroupTrainConfig, TrainConfig, load_train_config
from dictlearn.train.trainer import main, run_dir_of
from tests.train.helpers import (
    assert_no_traceback,
    assert_trees_equal,
    cli_env,
    committed_steps,
    make_planted,
    restore_final,
    run_cli,
    tiny_config_dict,
    write_config,
)

# Two same-shape TopK members that differ in learning rate and init seed, and a JumpReLU of
# another width: side by side in one step.
MEMBERS: list[dict[str, Any]] = [
    {"name": "topk-lr1e-3", "optimizer": {"lr": 1e-3}},
    {"name": "topk-lr3e-3", "optimizer": {"lr": 3e-3}, "seed": 7},
    {
        "name": "jumprelu-32",
        "sae": {"architecture": "jumprelu", "n_features": 32, "l0_coef": 0.01},
    },
    # Its threshold is calibrated after the last step, on batches the group reads once.
    {"name": "batchtopk-32", "sae": {"architecture": "batchtopk", "n_features": 32, "k": 4}},
]


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url)
    return url


def _group_config(tmp_path: Path, planted_url: str, **overrides: Any) -> GroupTrainConfig:
    members = overrides.pop("group", MEMBERS)
    data = tiny_config_dict(tmp_path, planted_url, **overrides)
    data["run"]["name"] = "sweep"
    return validate(GroupTrainConfig, data | {"group": members})


def test_members_resolve_to_single_sae_configs(tmp_path: Path, planted_url: str) -> None:
    config = _group_config(tmp_path, planted_url)
    members = config.members()
    assert [m.run_name for m in members] == [m["name"] for m in MEMBERS]
    assert [m.optimizer.lr for m in members] == [1e-3, 3e-3, 1e-3, 1e-3]
    assert [m.sae.architecture for m in members] == ["topk", "topk", "jumprelu", "batchtopk"]
    assert members[2].sae.n_features == 32 and members[0].sae.n_features == 64
    # Another architecture starts from its own defaults, keeping the shared width.
    other = validate(
        GroupTrainConfig,
        tiny_config_dict(tmp_path, planted_url)
        | {"group": [{"name": "j", "sae": {"architecture": "jumprelu"}}]},
    ).members()[0]
    assert (other.sae.architecture, other.sae.n_features) == ("jumprelu", 64)
    assert "k" not in other.sae.model_dump()
    # A member's seed seeds its init only; the data order stays the group's.
    assert [m.train.param_seed for m in members] == [0, 7, 0, 0]
    assert {m.train.seed for m in members} == {0}
    # Every member shares the output directory; a single-SAE dump has no init_seed key.
    assert {m.run.output_dir for m in members} == {config.run.output_dir}
    assert "init_seed" not in members[0].model_dump(mode="json")["train"]
    assert members[1].model_dump(mode="json")["train"]["init_seed"] == 7


def test_a_dumped_group_config_resolves_to_the_same_members(
    tmp_path: Path, planted_url: str
) -> None:
    """A dump (every field written, as a submitted job's or a run directory's) reloads to the
    same members: a member of another architecture keeps the shared common fields that differ
    from the shared architecture's defaults (n_features 64) and takes its own defaults for the
    rest (JumpReLU's decoder_init_norm 0.1, not TopK's 1.0), whether or not the file set them."""
    config = _group_config(tmp_path, planted_url)
    reloaded = validate(GroupTrainConfig, config.model_dump(mode="json"))
    assert [m.model_dump() for m in reloaded.members()] == [
        m.model_dump() for m in config.members()
    ]
    jumprelu = config.members()[2]
    assert jumprelu.sae.architecture == "jumprelu"
    assert (jumprelu.sae.n_features, jumprelu.sae.decoder_init_norm) == (32, 0.1)
    other = validate(
        GroupTrainConfig,
        tiny_config_dict(tmp_path, planted_url)
        | {"group": [{"name": "j", "sae": {"architecture": "jumprelu"}}]},
    ).members()[0]
    assert (other.sae.n_features, other.sae.decoder_init_norm) == (64, 0.1)


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ([{"name": "a"}, {"name": "a"}], "names must be unique; repeated: a"),
        ([{"name": "a", "sae": {"kk": 3}}], "group.0 (a): sae.topk.kk"),
        ([{"name": "a", "optimizer": {"lr": -1}}], "group.0 (a): optimizer.lr"),
        ([{"name": "a", "sae": {"n_features": 63}}], None),  # caught when the mesh is known
        ([], "group: List should have at least 1 item"),
        ([{"name": "../up"}], "group.0.name"),
    ],
)
def test_bad_group_configs_name_the_field(
    tmp_path: Path, planted_url: str, group: list, message: str | None
) -> None:
    if message is None:
        config = _group_config(tmp_path, planted_url, group=group)
        with pytest.raises(ValueError, match=r"n_features=63 must be divisible by mesh\.model=2"):
            group_trainer.main(config)
        return
    with pytest.raises(ConfigError) as info:
        _group_config(tmp_path, planted_url, group=group)
    assert message in str(info.value)


def test_group_equals_each_member_trained_alone(tmp_path: Path, planted_url: str) -> None:
    config = _group_config(tmp_path / "group", planted_url, data={"eval_fraction": 0.1})
    result = group_trainer.main(config)
    assert list(result.members) == [m["name"] for m in MEMBERS]
    assert result.tokens_per_s and result.tokens_per_s > 0
    for member in config.members():
        alone = TrainConfig.model_validate(
            member.model_dump(mode="json")
            | {"run": {"output_dir": str(tmp_path / "alone"), "name": member.run_name}}
        )
        alone_result = main(alone)
        _, together = restore_final(member)
        _, single = restore_final(alone)
        assert together.step == single.step == config.train.steps
        assert together.data_position == single.data_position
        # Bit-identical: the same computation, scheduled in one program.
        assert_trees_equal(together.state, single.state)
        rows = [r for r in read_metrics(result.members[member.run_name].run_dir) if "loss" in r]
        single_rows = [r for r in read_metrics(run_dir_of(alone)) if "loss" in r]
        assert [r["loss"] for r in rows] == [r["loss"] for r in single_rows]
        assert result.members[member.run_name].eval_metrics == alone_result.eval_metrics
        # The member's run directory holds its own single-SAE config (what export reads).
        assert load_config(TrainConfig, f"{run_dir_of(member)}/config.yaml") == member


def test_resumed_group_is_bit_identical(tmp_path: Path, planted_url: str) -> None:
    config = _group_config(
        tmp_path,
        planted_url,
        checkpoint={"every_steps": 4, "keep": 2, "keep_steps": [3]},
        train={"steps": 8},
    )
    group_trainer.main(config)
    expected = {m.run_name: restore_final(m)[1] for m in config.members()}
    for member in config.members():  # a kept step is saved and kept by every member
        assert committed_steps(Path(run_dir_of(member)) / "checkpoints") == [3, 4, 8]

    # Stop after step 4: drop every later checkpoint, leaving what a run stopped there leaves.
    # One member keeps its step-8 checkpoint, as when a stop lands between members' saves:
    # the group resumes all of them from the newest step they share.
    members = config.members()
    for member in members[1:]:
        shutil.rmtree(Path(run_dir_of(member)) / "checkpoints" / "8")
    resumed = group_trainer.main(config)
    assert not resumed.preempted
    for member in members:
        _, final = restore_final(member)
        assert final.step == 8 and final.data_position == 8
        assert_trees_equal(final.state, expected[member.run_name].state)
        steps = [r["step"] for r in read_metrics(run_dir_of(member)) if "loss" in r]
        assert steps == list(range(1, 9))  # each once: the rows after step 4 were dropped

    # A finished group re-run trains nothing and reports each member's last metrics.
    again = group_trainer.main(config)
    assert {r.steps for r in again.members.values()} == {8}


def test_cli_trains_a_group_and_exports_a_member(tmp_path: Path, planted_url: str) -> None:
    config_dict = tiny_config_dict(tmp_path, planted_url)
    config_dict["tracker"] = {"wandb_mode": "offline"}
    config_dict["run"]["name"] = "sweep"
    config_dict["group"] = [
        {"name": "narrow"},
        {"name": "wide", "sae": {"n_features": 128}, "optimizer": {"lr": 3e-3}},
    ]
    config_path = write_config(tmp_path / "group.yaml", config_dict)
    env = cli_env(WANDB_DIR=str(tmp_path / "wandb"), WANDB_CACHE_DIR=str(tmp_path / "cache"))
    trained = run_cli("train", config_path, "train.steps=4", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert_no_traceback(trained.stderr)
    assert "group sweep: 2 SAEs on one batch stream" in trained.stdout
    assert trained.stdout.count("training done: 4 steps, 256 tokens") == 2

    config = load_train_config(config_path, ["train.steps=4"])
    assert isinstance(config, GroupTrainConfig)
    for member in config.members():
        run_dir = Path(run_dir_of(member))
        assert load_config(TrainConfig, run_dir / "config.yaml") == member
        assert committed_steps(run_dir / "checkpoints") == [4]
        # Each member is its own W&B run (one offline run directory each).
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1

    wide = Path(run_dir_of(config.members()[1]))
    exported = run_cli(
        "export", wide, "--format", "native", "--out", tmp_path / "export", "--density-tokens", "0"
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "d_sae 128" in exported.stdout


def test_preempted_group_checkpoints_every_member_and_resumes_bit_identical(
    tmp_path: Path, planted_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _group_config(tmp_path, planted_url, checkpoint={"every_steps": 100})
    reference = validate(
        GroupTrainConfig,
        config.model_dump(mode="json") | {"run": {"output_dir": str(tmp_path / "reference")}},
    )
    group_trainer.main(reference)

    # The processes agree on a SIGTERM at step 3: every member writes a checkpoint there and
    # the run reports itself preempted.
    monkeypatch.setattr(group_trainer.PreemptionVote, "__call__", lambda self, step, _: step == 3)
    stopped = group_trainer.main(config)
    assert stopped.preempted and {r.steps for r in stopped.members.values()} == {3}
    for member in config.members():
        assert committed_steps(Path(run_dir_of(member)) / "checkpoints") == [3]

    monkeypatch.undo()
    resumed = group_trainer.main(config)
    assert not resumed.preempted
    for member, expected in zip(config.members(), reference.members(), strict=True):
        _, final = restore_final(member)
        _, want = restore_final(expected)
        assert final.step == want.step == config.train.steps
        assert_trees_equal(final.state, want.state)
