"""One marking decides what a field changes (dictlearn.config.Effect); every rule follows it.

A field is hashed by a pipeline stage, covered by a generation's fingerprint, ignored by a resume
or a sweep re-run exactly as its marking says: each test below changes every field in turn.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from dictlearn.activations import GenerateConfig
from dictlearn.config import (
    ConfigError,
    Effect,
    differences,
    effect_of,
    iter_fields,
    validate,
    without_fields,
)
from dictlearn.train.config import TrainConfig
from dictlearn.train.trainer import BRANCH_CHANGES, RESUMABLE_CHANGES, _config_differences
from launch.pipeline import (
    TRAIN_EXECUTION_FIELDS,
    PipelineConfig,
    PipelineDataConfig,
    load_pipeline_config,
    plan_stages,
)
from scaling_laws.sweep import SWEEP_EXECUTION_FIELDS, SweepConfig

UNHASHED_IN_PIPELINE_TRAIN = {Effect.EXECUTION, Effect.EVALUATION}


def _effects(cls: type[BaseModel]) -> dict[str, Effect]:
    """Every dotted field's effect; a field inside a marked section has the section's."""
    effects: dict[str, Effect] = {}
    for dotted, field, _ in iter_fields(cls):
        parent = effects.get(dotted.rsplit(".", 1)[0], Effect.RESULT) if "." in dotted else None
        own = effect_of(field)
        effects[dotted] = own if own is not Effect.RESULT or parent is None else parent
    return effects


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changed(value: Any) -> Any:
    """Another valid-looking value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1 if value != -1 else 2
    if isinstance(value, float):
        changed = value * 0.5 + 0.25
        return changed if changed != value else 0.75  # 0.5 is this map's fixed point
    if isinstance(value, str):
        return {"topk": "batchtopk", "offline": "disabled", "auto": "never"}.get(value, value + "x")
    if value is None:
        return 3
    if isinstance(value, list):
        return [*value, *value[-1:]] if value else [5]
    return {"CPU_X": 1.0}


def _variants(cls: type[BaseModel], base: dict[str, Any], skip: tuple[str, ...] = ()):
    """(dotted field, its effect, a valid dict differing from ``base`` in that field alone)."""
    effects = _effects(cls)
    tried = 0
    for dotted, value in _leaves(base).items():
        if dotted.startswith(skip) or dotted not in effects:
            continue
        data = json.loads(json.dumps(base))
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = _changed(value)
        try:
            cls.model_validate(data)
        except (ValidationError, ConfigError):
            continue  # e.g. a list whose entries must be distinct: not a variant to test
        tried += 1
        yield dotted, effects[dotted], data
    assert tried >= 15, f"only {tried} fields of {cls.__name__} could be varied"


def test_pipeline_train_version_hashes_exactly_the_hashed_fields() -> None:
    base = PipelineConfig().model_dump(mode="json")
    version = plan_stages(PipelineConfig())["train"].version
    wrong = []
    for dotted, effect, data in _variants(PipelineConfig, base, skip=("generate", "eval", "name")):
        if not dotted.startswith("train."):
            continue
        changed = plan_stages(PipelineConfig.model_validate(data))["train"].version != version
        if changed != (effect not in UNHASHED_IN_PIPELINE_TRAIN):
            wrong.append(f"{dotted} ({effect.value}): version changed={changed}")
    assert not wrong, wrong


def test_generation_fingerprint_covers_exactly_the_result_fields() -> None:
    base = PipelineConfig().generate.model_dump(mode="json")
    base["output"]["path"] = "/tmp/out"
    fingerprint = GenerateConfig.model_validate(base).fingerprint_fields()
    wrong = []
    for dotted, effect, data in _variants(GenerateConfig, base):
        changed = GenerateConfig.model_validate(data).fingerprint_fields() != fingerprint
        if changed != (effect is not Effect.EXECUTION):
            wrong.append(f"{dotted} ({effect.value}): fingerprint changed={changed}")
    assert not wrong, wrong


def _train_dict() -> dict[str, Any]:
    data = PipelineConfig().train.model_dump(
        mode="json", exclude={"hook", "widths", "hook_workers"}
    )
    data["data"]["path"] = "/data/acts"
    return data


def test_resume_accepts_exactly_the_fields_not_marked_result() -> None:
    base = _train_dict()
    wrong = []
    for dotted, effect, data in _variants(TrainConfig, base, skip=("init",)):
        refused = bool(_config_differences(base, data))
        if refused != (effect is Effect.RESULT):
            wrong.append(f"{dotted} ({effect.value}): resume refused={refused}")
    assert not wrong, wrong


def test_branch_accepts_execution_evaluation_and_length_only() -> None:
    base = _train_dict()
    wrong = []
    for dotted, effect, data in _variants(TrainConfig, base, skip=("init",)):
        diffs = differences(
            without_fields(base, BRANCH_CHANGES), without_fields(data, BRANCH_CHANGES)
        )
        refused = bool(diffs)
        allowed = effect in (Effect.EXECUTION, Effect.EVALUATION, Effect.LENGTH)
        if refused == allowed:
            wrong.append(f"{dotted} ({effect.value}): branch refused={refused}")
    assert not wrong, wrong


def test_sweep_rerun_accepts_exactly_the_execution_fields() -> None:
    base = SweepConfig.model_validate(
        {
            "base": _train_dict() | {"data": {"path": "/d", "eval_fraction": 0.1}},
            "grid": {"n_features": [64], "lr": [1e-3], "tokens": [2048]},
        }
    ).model_dump(mode="json")
    wrong = []
    for dotted, effect, data in _variants(SweepConfig, base, skip=("base.init",)):
        diffs = differences(
            without_fields(base, SWEEP_EXECUTION_FIELDS),
            without_fields(data, SWEEP_EXECUTION_FIELDS),
        )
        if bool(diffs) != (effect is not Effect.EXECUTION):
            wrong.append(f"{dotted} ({effect.value}): re-run refused={bool(diffs)}")
    assert not wrong, wrong


def test_a_field_redefined_in_a_subclass_keeps_its_marking() -> None:
    """E.g. the pipeline's generate.output.path (filled in by the pipeline) is execution, as
    generate's own output.path is: a redefinition that dropped the marking would hash it."""
    # The one deliberate exception: in a pipeline the dataset is hashed as the generate
    # stage's version (an input), so train.data.path is execution there.
    exceptions = {(PipelineDataConfig, "path")}
    wrong = []
    for root in (PipelineConfig, SweepConfig, GenerateConfig, TrainConfig):
        for dotted, field, owner in iter_fields(root):
            name = dotted.rsplit(".", 1)[-1].removesuffix("[]")
            for parent in owner.__mro__[1:]:
                inherited = getattr(parent, "model_fields", {}).get(name)
                if inherited is None or (owner, name) in exceptions:
                    continue
                if effect_of(inherited) is not effect_of(field):
                    wrong.append(f"{owner.__name__}.{name} vs {parent.__name__}")
    assert not wrong, wrong


def test_derived_lists() -> None:
    assert set(RESUMABLE_CHANGES) == {
        "checkpoint", "data.prefetch", "data.read_threads", "mesh", "optimizer.decay_fraction",
        "optimizer.lr", "optimizer.warmup_steps", "ray", "run", "tracker", "train.eval_batches",
        "train.eval_every", "train.log_every", "train.steps",
    }  # fmt: skip
    assert set(TRAIN_EXECUTION_FIELDS) == {
        "checkpoint", "data.path", "data.prefetch", "data.read_threads", "hook_workers", "mesh",
        "ray", "run", "tracker", "train.eval_batches", "train.eval_every", "train.log_every",
    }  # fmt: skip
    assert set(SWEEP_EXECUTION_FIELDS) == {
        "ray", "retries", "base.checkpoint", "base.data.prefetch", "base.data.read_threads",
        "base.mesh", "base.ray", "base.run", "base.tracker", "base.train.log_every",
    }  # fmt: skip


# Version hashes of finished pipelines on disk: the pipeline skips a stage by them, so deriving
# the hashed fields from the marking must not change them (values from before the marking).
# Each case sets the lr those pipelines ran with (1e-3; the default is now the fitted law), and
# TopK's b_dec, AuxK gradient and AuxK weight as they ran (learned, through the ReLU, 1/32; now
# kept, straight through, 0.5).
PINNED_VERSIONS = {
    (): {"generate": "51bf5611a2df", "train": "2c4865d42c8e", "eval": "d187addc8b5a"},
    ("mesh.model=2", "train.train.eval_batches=9"): {
        "generate": "51bf5611a2df", "train": "2c4865d42c8e", "eval": "d187addc8b5a",
    },
    ("generate.output.dtype=float32", "generate.mesh={data: 1, model: 1}"): {
        "generate": "06391a9bfef3", "train": "8dc0427bbc3e", "eval": "73028732ae26",
    },
    ("train.optimizer.decay_fraction=0.3",): {
        "generate": "51bf5611a2df", "train": "ea30789a4842", "eval": "024ec1949307",
    },
    ("train.init={from_checkpoint: /x, step: 10}",): {
        "generate": "51bf5611a2df", "train": "8c4b53f11132", "eval": "62703991cef0",
    },
    ("train.widths=[1024,4096]", "generate.hooks=[resid_post.2, resid_post.6]"): {
        "generate": "30a5ec5e78f5",
        "train:resid_post.2": "476207413856",
        "train:resid_post.6": "ec7ed17db709",
        "eval:resid_post.2:topk-1024": "173077d5f8a0",
        "eval:resid_post.2:topk-4096": "3fdc3f989562",
        "eval:resid_post.6:topk-1024": "a2c1bf3fd7a3",
        "eval:resid_post.6:topk-4096": "718989e53aaa",
    },
}  # fmt: skip


@pytest.mark.parametrize("overrides", list(PINNED_VERSIONS))
def test_version_hashes_are_unchanged(overrides: tuple[str, ...]) -> None:
    ran_with = [
        "train.optimizer.lr=0.001",
        "train.sae.learn_b_dec=true",
        "train.sae.aux_gradient=relu",
        "train.sae.aux_coef=0.03125",
    ]
    config = load_pipeline_config(None, [*ran_with, *overrides])
    plans = plan_stages(config)
    assert {name: plan.version for name, plan in plans.items()} == PINNED_VERSIONS[overrides]


def test_a_run_from_before_new_fields_resumes_only_with_their_old_values() -> None:
    """A checkpoint's config written before ``sae.learn_b_dec`` / ``sae.aux_gradient`` existed
    (no such keys) equals a config that sets their old values, and differs, by those two fields,
    from today's defaults; a config dump round-trips the non-default values."""
    current = validate(TrainConfig, {"data": {"path": "/d"}}).model_dump(mode="json")
    before = {**current, "sae": dict(current["sae"])}
    del before["sae"]["learn_b_dec"], before["sae"]["aux_gradient"]
    old_values = validate(
        TrainConfig,
        {
            "data": {"path": "/d"},
            "sae": {"architecture": "topk", "learn_b_dec": True, "aux_gradient": "relu"},
        },
    )
    assert _config_differences(before, old_values.model_dump(mode="json")) == []
    assert [d.split(":")[0] for d in _config_differences(before, current)] == [
        "sae.aux_gradient",
        "sae.learn_b_dec",
    ]
    assert validate(TrainConfig, old_values.model_dump(mode="json")) == old_values


def test_a_batchtopk_run_from_before_auxk_and_calibration_resumes_with_their_old_values() -> None:
    """BatchTopK gained AuxK (``sae.k_aux`` / ``aux_coef`` / ``aux_gradient``, fields TopK always
    had) and ``sae.threshold_calibration_batches``, and its b_dec is fixed by default: a
    checkpoint's config without the new fields (b_dec learned) equals a config with AuxK off
    (aux_coef 0, the old gradient), no calibration and a learned b_dec, and differs from
    today's BatchTopK defaults by exactly those fields. A TopK config's aux_coef 0 stays a
    value of its own (the BatchTopK-only marker does not apply to it)."""
    sae = {"architecture": "batchtopk"}
    current = validate(TrainConfig, {"data": {"path": "/d"}, "sae": sae}).model_dump(mode="json")
    # Such a run also learned b_dec (BatchTopK's default until then).
    before = {**current, "sae": dict(current["sae"]) | {"learn_b_dec": True}}
    for field in ("k_aux", "aux_coef", "aux_gradient", "threshold_calibration_batches"):
        del before["sae"][field]
    old_values = validate(
        TrainConfig,
        {
            "data": {"path": "/d"},
            "sae": sae
            | {
                "aux_coef": 0.0,
                "aux_gradient": "relu",
                "threshold_calibration_batches": 0,
                "learn_b_dec": True,
            },
        },
    )
    assert _config_differences(before, old_values.model_dump(mode="json")) == []
    assert [d.split(":")[0] for d in _config_differences(before, current)] == [
        "sae.aux_coef",
        "sae.aux_gradient",
        "sae.learn_b_dec",
        "sae.threshold_calibration_batches",
    ]
    topk = validate(
        TrainConfig, {"data": {"path": "/d"}, "sae": {"architecture": "topk", "aux_coef": 0.0}}
    )
    topk_dump = topk.model_dump(mode="json")
    without_coef = {**topk_dump, "sae": dict(topk_dump["sae"])}
    del without_coef["sae"]["aux_coef"]
    assert [d.split(":")[0] for d in _config_differences(without_coef, topk_dump)] == [
        "sae.aux_coef"
    ]


def test_a_jumprelu_run_from_before_the_threshold_lr_resumes_with_its_old_values() -> None:
    """JumpReLU gained ``sae.threshold_lr_scale`` and ``sae.revive_coef``, and its decoder now
    starts at norm 0.1: a checkpoint's config without the new fields (and the decoder norm it
    dumped, 1.0) equals a config with the threshold at the lr (scale 1) and no pull, and differs
    from today's JumpReLU defaults by exactly the decoder norm and the threshold's lr."""
    sae = {"architecture": "jumprelu"}
    current = validate(TrainConfig, {"data": {"path": "/d"}, "sae": sae}).model_dump(mode="json")
    before = {**current, "sae": dict(current["sae"]) | {"decoder_init_norm": 1.0}}
    for field in ("threshold_lr_scale", "revive_coef"):
        del before["sae"][field]
    old_values = validate(
        TrainConfig,
        {
            "data": {"path": "/d"},
            "sae": sae | {"decoder_init_norm": 1.0, "threshold_lr_scale": 1.0, "revive_coef": 0.0},
        },
    )
    assert _config_differences(before, old_values.model_dump(mode="json")) == []
    assert [d.split(":")[0] for d in _config_differences(before, current)] == [
        "sae.decoder_init_norm",
        "sae.threshold_lr_scale",
    ]
