"""`dictlearn config`, the README's generated field tables, unknown-key suggestions, set-up."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dictlearn.activations import GenerateConfig
from dictlearn.config import ConfigError, iter_fields, load_config
from dictlearn.train.config import GroupTrainConfig, load_train_config
from launch.cli import build_parser, main
from launch.config_docs import README_BEGIN, README_END, TOPICS, readme_tables, update_readme
from launch.pipeline import PipelineConfig, load_pipeline_config
from scaling_laws.sweep import SweepConfig

REPO = Path(__file__).resolve().parents[2]
ROOTS = {
    "train": GroupTrainConfig,
    "generate": GenerateConfig,
    "pipeline": PipelineConfig,
    "sweep": SweepConfig,
}


def _generated_block(text: str) -> str:
    begin, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    return text[begin:end]


def test_readme_tables_are_up_to_date() -> None:
    readme = (REPO / "README.md").read_text()
    assert _generated_block(readme) == readme_tables(), (
        "README.md's config tables are stale: run `uv run --frozen dictlearn config --readme "
        "README.md`"
    )


def test_readme_command_rewrites_a_stale_block(tmp_path: Path, capsys) -> None:
    stale = f"intro\n{README_BEGIN}\n| old | table |\n{README_END}\noutro\n"
    (tmp_path / "R.md").write_text(stale)
    assert main(["config", "--readme", str(tmp_path / "R.md")]) == 0
    text = (tmp_path / "R.md").read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n")
    assert _generated_block(text) == readme_tables()
    assert not update_readme(str(tmp_path / "R.md"))  # now up to date: nothing rewritten


@pytest.mark.parametrize("topic", list(TOPICS))
def test_config_prints_every_field(topic: str, capsys) -> None:
    assert main(["config", topic]) == 0
    text = capsys.readouterr().out
    names = {line.split()[0] for line in text.splitlines() if line and not line[0].isspace()}
    skipped = ("base.",) if topic == "sweep" else ()  # a sweep's base: `dictlearn config train`
    expected = {
        dotted for dotted, _, _ in iter_fields(ROOTS[topic]) if not dotted.startswith(skipped)
    }
    # A section's own row only appears when it is optional or a list; its fields always do.
    sections = {n for n in expected if any(m.startswith(n + ".") for m in expected)}
    assert expected - sections <= names, sorted(expected - sections - names)
    assert names <= expected, sorted(names - expected)


def test_config_shows_embedded_pipeline_defaults_and_per_architecture_ones(capsys) -> None:
    assert main(["config", "pipeline"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^train\.train\.steps +int > 0 += 240 +\[length\]$", out, re.M)
    assert re.search(r"^train\.sae\.n_features .*= topk: 4096, batchtopk: 16384", out, re.M)
    assert main(["config", "train", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert "| `sae.k_aux` | int >= 0 | `256` | result | (topk, batchtopk) Dead latents" in table
    assert "| `optimizer.lr` | float \\| null > 0 | `null` | recovery |" in table


def test_a_union_field_documented_differently_per_architecture_names_each_text(capsys) -> None:
    # sparse_l0_bound: JumpReLU's (None follows target_l0) and ReLU-L1's (a plain int) differ in
    # type and description; one merged row once showed JumpReLU's text for both.
    assert main(["config", "train", "--markdown"]) == 0
    row = next(
        line for line in capsys.readouterr().out.splitlines() if "`sae.sparse_l0_bound`" in line
    )
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip("|"))]
    assert cells[1] == "(jumprelu) int \\| null >= 0 (relu_l1) int >= 0"
    assert cells[4].startswith("(jumprelu) Latents per token")
    jumprelu_text, relu_l1_text = cells[4].split(" (relu_l1) ")
    assert "target_l0" in jumprelu_text and "target_l0" not in relu_l1_text
    assert relu_l1_text.startswith("Active latents per token")


@pytest.mark.parametrize("command", ["train", "generate", "pipeline", "sweep", "submit", None])
def test_help_points_to_the_config_printer(command: str | None, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"] if command else ["--help"])
    assert "dictlearn config" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("load", "overrides", "expected"),
    [
        ("train", ["optimzer.lr=1"], "optimzer: unknown key (did you mean 'optimizer'?"),
        ("train", ["sae.kk=3"], "sae.topk.kk: unknown key (did you mean 'k'?"),
        ("train", ["sae.architecture=jumprelu", "sae.l0coef=1"], "did you mean 'l0_coef'?"),
        ("train", ["train.step=3"], "train.step: unknown key (did you mean 'steps'?"),
        ("train", ["checkpoint.evry_steps=3"], "did you mean 'every_steps'?"),
        ("train", ["group=[{nmae: a}]"], "group.0.nmae: unknown key (did you mean 'name'?"),
        ("pipeline", ["train.sae.kk=3"], "train.sae.topk.kk: unknown key (did you mean 'k'?"),
        ("pipeline", ["generate.hoks=[x]"], "did you mean 'hooks'?"),
        ("generate", ["ray.num_wrokers=2"], "ray.num_wrokers: unknown key (did you mean"),
        ("train", ["zzzz=1"], "zzzz: unknown key (check the spelling;"),
    ],
)
def test_unknown_keys_suggest_the_closest_valid_one(
    load: str, overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        if load == "train":
            load_train_config(str(REPO / "launch/configs/train_tiny.yaml"), overrides)
        elif load == "pipeline":
            load_pipeline_config(None, overrides)
        else:
            load_config(GenerateConfig, str(REPO / "launch/configs/generate_tiny.yaml"), overrides)
    assert expected in str(err.value)
    if "did you mean" in expected and load == "generate":
        assert "did you mean 'num_workers'?" in str(err.value)


def _readme_command(heading: str) -> str:
    """The command in the first ```bash block after ``heading``."""
    readme = (REPO / "README.md").read_text()
    after = readme[readme.index(heading) :]
    return after.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = _readme_command("**Install and run the tests**")
    ci = (REPO / ".ci/run").read_text().strip().splitlines()
    assert ci[-1] == command
    # Works where a freshly pip-installed uv is not on the PATH yet (pyenv): python3 -m uv.
    assert re.fullmatch(r"python3 -m pip install -q uv( && python3 -m uv [^&]+)+", command)
    main_command = _readme_command("**install and run the main job**")
    assert main_command.startswith("python3 -m pip install -q uv && python3 -m uv sync --frozen")


def test_module_docstrings_cite_nothing_outside_the_repository() -> None:
    outside = re.compile(r"\.\./shared|/work/|STYLE\.md|NOTES\.md|shared/")
    offenders = []
    for package in ("dictlearn", "launch", "scaling_laws", "sharding", "bench", "tools", "tests"):
        for path in sorted((REPO / package).rglob("*.py")):
            docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
            if outside.search(docstring):
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders
