"""The pipeline's config: embedded defaults, merging, validation and stage versions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dictlearn.config import ConfigError
from dictlearn.train.config import GroupTrainConfig, TrainConfig
from launch.pipeline import (
    TRAIN_EXECUTION_FIELDS,
    PipelineConfig,
    load_pipeline_config,
    plan_stages,
)

REPO = Path(__file__).resolve().parents[2]


def _versions(*overrides: str) -> dict[str, str]:
    plans = plan_stages(load_pipeline_config(None, list(overrides)))
    return {name: plan.version for name, plan in plans.items()}


def test_checked_in_default_config_is_the_embedded_defaults() -> None:
    from_file = load_pipeline_config(str(REPO / "launch/configs/pipeline_default.yaml"), [])
    assert from_file == PipelineConfig() == load_pipeline_config(None, [])


def test_plan_wires_train_to_the_generated_dataset() -> None:
    config = load_pipeline_config(None, ["output_dir=/tmp/x", "name=demo", "mesh.model=2"])
    plans = plan_stages(config)
    gen, train = plans["generate"], plans["train"]
    assert gen.directory == f"/tmp/x/demo/generate-{gen.version}"
    assert gen.config.output.path == gen.directory
    assert train.config.data.path == f"{gen.directory}/resid_post.6"
    assert train.config.run.output_dir == "/tmp/x/demo"
    assert train.config.run.name == f"train-{train.version}"
    assert train.config.mesh.model == 2
    assert train.inputs == {"generate": gen.version, "hook": "resid_post.6"}


def test_execution_details_do_not_change_versions() -> None:
    base = _versions()
    same = _versions(
        "mesh.model=2",
        "generate.ray.num_workers=3",
        "generate.batch_size=4",
        "train.checkpoint.every_steps=7",
        "train.train.log_every=3",
        "train.tracker.wandb_mode=disabled",
    )
    assert same == base


def test_result_fields_change_the_right_versions() -> None:
    base = _versions()
    sae = _versions("train.sae.k=16")
    assert sae["generate"] == base["generate"] and sae["train"] != base["train"]
    for override in ("train.train.steps=500", "train.optimizer.lr=3e-4", "train.train.seed=1"):
        changed = _versions(override)
        assert changed["train"] != base["train"], override
    branched = _versions("train.init={from_checkpoint: /runs/trunk/checkpoints, step: 10}")
    assert branched["train"] != base["train"]
    upstream = _versions("generate.max_tokens=1000")
    assert upstream["generate"] != base["generate"] and upstream["train"] != base["train"]


def test_train_execution_fields_name_real_fields() -> None:
    """A renamed TrainConfig field must not silently drop out of (or into) the version hash."""
    for dotted in TRAIN_EXECUTION_FIELDS:
        if dotted in ("hook", "hook_workers"):  # the pipeline's own fields, not TrainConfig's
            continue
        model: type = TrainConfig
        for part in dotted.split("."):
            assert part in model.model_fields, dotted
            model = model.model_fields[part].annotation  # type: ignore[assignment]


def test_other_architecture_replaces_the_default_sae_section() -> None:
    config = load_pipeline_config(None, ["train.sae.architecture=jumprelu"])
    assert config.train.sae.architecture == "jumprelu"
    partial = load_pipeline_config(None, ["train.train.steps=10"])
    assert partial.train.train.batch_size == PipelineConfig().train.train.batch_size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.mesh.model=2"], "top-level mesh"),
        (["train.hook=resid_post.2"], "not one of generate.hooks"),
        (["stages=[train, generate]"], "in the order"),
        (["train.sae.kk=3"], "train.sae.topk.kk: unknown key"),
        (["generate.hooks=[resid_post.x]"], "generate.hooks"),
    ],
)
def test_bad_pipeline_configs_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config(None, overrides)


def test_config_file_is_merged_onto_defaults(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "train": {"sae": {"n_features": 512}}}))
    config = load_pipeline_config(str(path), ["train.sae.k=8"])
    assert (config.name, config.train.sae.n_features, config.train.sae.k) == ("mine", 512, 8)
    assert config.generate == PipelineConfig().generate


def test_widths_plan_a_group_per_hook() -> None:
    overrides = ["output_dir=/tmp/x", "name=demo", "generate.hooks=[resid_post.2, resid_post.6]"]
    single = plan_stages(load_pipeline_config(None, overrides))
    assert sorted(single) == ["eval", "generate", "train"]  # without widths: one SAE
    assert single["eval"].config.sae == single["train"].directory
    assert single["eval"].needs == ("train",)

    config = load_pipeline_config(None, [*overrides, "train.widths=[1024, 4096]"])
    plans = plan_stages(config)
    assert sorted(k for k in plans if not k.startswith("eval")) == [
        "generate",
        "train:resid_post.2",
        "train:resid_post.6",
    ]
    gen = plans["generate"]
    versions = set()
    for hook in ("resid_post.2", "resid_post.6"):
        plan = plans[f"train:{hook}"]
        assert isinstance(plan.config, GroupTrainConfig)
        assert plan.directory == f"/tmp/x/demo/train-{plan.version}"
        assert plan.inputs == {"generate": gen.version, "hook": hook}
        members = plan.config.members()
        assert [m.run_name for m in members] == ["topk-1024", "topk-4096"]
        assert [m.sae.n_features for m in members] == [1024, 4096]
        assert {m.data.path for m in members} == {f"{gen.directory}/{hook}"}
        assert {m.run.output_dir for m in members} == {plan.directory}
        for member in members:  # every SAE of the group is evaluated spliced into the LM
            evaluation = plans[f"eval:{hook}:{member.run_name}"]
            assert evaluation.config.sae == f"{plan.directory}/{member.run_name}"
            assert evaluation.needs == (f"train:{hook}",)
        versions.add(plan.version)
    assert len(versions) == 2
    # train.hook picks one hook; the widths change the version of its stage.
    one = plan_stages(
        load_pipeline_config(None, [*overrides, "train.widths=[1024]", "train.hook=resid_post.6"])
    )
    assert sorted(one) == ["eval:resid_post.6:topk-1024", "generate", "train:resid_post.6"]
    assert one["train:resid_post.6"].version not in versions
    with pytest.raises(ConfigError, match="distinct positive"):
        load_pipeline_config(None, ["train.widths=[1024, 1024]"])
