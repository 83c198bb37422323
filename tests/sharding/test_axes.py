"""Collectives name logical axes, resolved to mesh axes by the one rule table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sharding import BATCH, D_MODEL, DATA, DEFAULT_RULES, FEATURES, MODEL, mesh_axis

REPO = Path(__file__).resolve().parents[2]


def test_mesh_axis_follows_the_rule_table() -> None:
    assert mesh_axis(FEATURES) == MODEL and mesh_axis(BATCH) == DATA
    both = {**DEFAULT_RULES, FEATURES: (DATA, MODEL)}
    assert mesh_axis(FEATURES, both) == (DATA, MODEL)
    with pytest.raises(KeyError, match="not split"):
        mesh_axis(D_MODEL)
    with pytest.raises(KeyError, match="no sharding rule"):
        mesh_axis("nonsense")


def test_sae_code_names_no_mesh_axis() -> None:
    """psum/pmin/all_gather in dictlearn/sae take mesh_axis(FEATURES), never MODEL itself."""
    offenders = []
    for path in sorted((REPO / "dictlearn" / "sae").glob("*.py")):
        text = path.read_text()
        imported = re.findall(r"^from sharding import (.*)$", text, re.M)
        names = {n.strip() for line in imported for n in line.split(",")}
        if names & {"DATA", "MODEL"} or re.search(r"""\(\s*[^)]*,\s*["'](data|model)["']""", text):
            offenders.append(path.name)
    assert not offenders, offenders
