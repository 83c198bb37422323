"""``dictlearn config``: every field of a stage's config, and the README's tables made from it.

    dictlearn config train                 # dotted name, type, default, kind, description
    dictlearn config pipeline --markdown   # the same as a Markdown table
    dictlearn config --readme README.md    # rewrite the README's generated field tables

The README's tables sit between two marker comments and are checked against this output by the
tests, so they cannot go stale.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import fsspec

from dictlearn.config import FieldDoc, docs_as_markdown, docs_as_text, field_docs
from dictlearn.errors import UserError

README_BEGIN = (
    "<!-- dictlearn config tables: begin (generated: dictlearn config --readme README.md) -->"
)
README_END = "<!-- dictlearn config tables: end -->"


@dataclass(frozen=True)
class ConfigTopic:
    """One root config ``dictlearn config`` describes."""

    command: str
    summary: str
    docs: Callable[[], list[FieldDoc]]


def _train_docs() -> list[FieldDoc]:
    from dictlearn.train.config import GroupTrainConfig

    docs = field_docs(GroupTrainConfig)
    # `group` is what makes a train config a group: absent, the config trains one SAE.
    return [replace(d, default="null (one SAE)") if d.name == "group" else d for d in docs]


def _generate_docs() -> list[FieldDoc]:
    from dictlearn.activations import GenerateConfig

    return field_docs(GenerateConfig)


def _pipeline_docs() -> list[FieldDoc]:
    from launch.pipeline import PipelineConfig

    return field_docs(PipelineConfig, PipelineConfig())


def _sweep_docs() -> list[FieldDoc]:
    from scaling_laws.sweep import SweepConfig

    docs = field_docs(SweepConfig, collapse=("base",))
    note = " Its fields: `dictlearn config train`."
    return [replace(d, description=d.description + note) if d.name == "base" else d for d in docs]


TOPICS: dict[str, ConfigTopic] = {
    "train": ConfigTopic(
        "train", "`dictlearn train CONFIG.yaml` (one SAE, or a `group:` of several)", _train_docs
    ),
    "generate": ConfigTopic(
        "generate", "`dictlearn generate CONFIG.yaml` (activation datasets)", _generate_docs
    ),
    "pipeline": ConfigTopic(
        "pipeline",
        "`dictlearn pipeline [CONFIG.yaml]` (defaults: the embedded run, shown here)",
        _pipeline_docs,
    ),
    "sweep": ConfigTopic(
        "sweep", "`dictlearn sweep SWEEP.yaml` (a grid of train runs)", _sweep_docs
    ),
}

KINDS = (
    "*kind* says what changing a field does: **result** decides what is computed; "
    "**execution** only where or how it runs (never in a version hash; may change on any "
    "re-run); **evaluation** only what the training-time evaluation reports (may change on "
    "resume); **length** where the lr schedule ends (may change on resume or branch while "
    "the steps already run are before the decay); **recovery** the lr's peak and warm-up (may "
    "change on resume, e.g. after a divergence). A field inside a section has its section's kind."
)


def describe(topic: str, markdown: bool = False) -> str:
    """Every field of ``topic``'s config as text (or a Markdown table).

    Raises:
        UserError: an unknown topic (names the known ones).
    """
    if topic not in TOPICS:
        raise UserError(f"no config named {topic!r}; choose one of {', '.join(TOPICS)}")
    docs = TOPICS[topic].docs()
    return docs_as_markdown(docs) if markdown else docs_as_text(docs)


def readme_tables() -> str:
    """The README's generated block: a legend, then one collapsed table per config."""
    parts = [README_BEGIN, "", KINDS, ""]
    for name, topic in TOPICS.items():
        summary = re.sub(r"`([^`]*)`", r"<code>\1</code>", topic.summary)  # HTML: no Markdown
        parts += [
            f"<details><summary><code>dictlearn config {name}</code>: {summary}</summary>",
            "",
            describe(name, markdown=True),
            "",
            "</details>",
            "",
        ]
    return "\n".join([*parts, README_END])


def update_readme(path: str) -> bool:
    """Rewrite the generated block of the README at ``path``; True if it changed.

    Raises:
        UserError: the README has no (or a broken) pair of marker comments.
    """
    with fsspec.open(path, "r") as f:
        text = f.read()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise UserError(
            f"{path} has no generated config tables: put the lines {README_BEGIN!r} and "
            f"{README_END!r} where they belong"
        )
    new = text[:begin] + readme_tables() + text[end + len(README_END) :]
    if new != text:
        with fsspec.open(path, "w") as f:
            f.write(new)
    return new != text
