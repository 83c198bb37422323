"""``dictlearn index build`` / ``dictlearn neighbors`` through ``launch.cli.main``.

The SAEs are real exports (native, saelens and gemmascope formats) read by
``dictlearn.export.load_sae``.
"""

from __future__ import annotations

import numpy as np

from launch.cli import main
from tests.index.conftest import write_sae


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_build_then_query(tmp_path, capsys) -> None:
    sae = write_sae(tmp_path / "a", 100, 8, seed=0)
    out = str(tmp_path / "idx")
    assert main(["index", "build", sae, "--out", out, "k=3", "block_size=32", "mesh.model=4"]) == 0
    assert "index done: 100 features, k=3" in capsys.readouterr().out
    assert main(["index", "build", sae, "--out", out, "k=3", "block_size=32"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["neighbors", out, "5", "-k", "2"]) == 0
    text = capsys.readouterr().out
    assert "feature 5: 2 nearest features" in text and "(exact)" in text
    np.save(tmp_path / "v.npy", np.ones(8, np.float32))
    assert main(["neighbors", sae, "--vector", str(tmp_path / "v.npy")]) == 0
    assert "10 nearest features" in capsys.readouterr().out


def test_cross_sae_build(tmp_path, capsys) -> None:
    a = write_sae(tmp_path / "a", 40, 8, seed=0)
    b = write_sae(tmp_path / "b", 160, 8, seed=1)
    out = str(tmp_path / "x")
    assert main(["index", "build", a, "--out", out, "--against", b, "k=4"]) == 0
    assert f"against {b}" in capsys.readouterr().out


def test_feature_out_of_range(tmp_path, capsys) -> None:
    sae = write_sae(tmp_path / "a", 100, 8, seed=0)
    out = str(tmp_path / "idx")
    assert main(["index", "build", sae, "--out", out, "k=3"]) == 0
    capsys.readouterr()
    assert main(["neighbors", out, "100"]) == 2
    _one_line_error(capsys, "feature 100 is out of range", "100 features")
    assert main(["neighbors", sae, "-1"]) == 2
    _one_line_error(capsys, "feature -1 is out of range")
    assert main(["neighbors", out, "3", "-k", "4"]) == 2
    _one_line_error(capsys, "k=4 exceeds the k=3")


def test_width_mismatch_cross_and_vector(tmp_path, capsys) -> None:
    a = write_sae(tmp_path / "a", 40, 8, seed=0)
    b = write_sae(tmp_path / "b", 60, 9, seed=1)
    out = tmp_path / "x"
    assert main(["index", "build", a, "--out", str(out), "--against", b]) == 2
    _one_line_error(capsys, b, "d_in=9", "d_in=8")
    assert not out.exists()  # nothing half-written
    np.save(tmp_path / "v.npy", np.ones(9, np.float32))
    assert main(["neighbors", a, "--vector", str(tmp_path / "v.npy")]) == 2
    _one_line_error(capsys, "shape (9,)", "d_in=8")


def test_unknown_format_and_bad_arguments(tmp_path, capsys) -> None:
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"nope")
    out = tmp_path / "idx"
    assert main(["index", "build", str(bogus), "--out", str(out)]) == 2
    _one_line_error(capsys, str(bogus), "holds no SAE")
    assert not out.exists()
    assert main(["neighbors", str(bogus), "3"]) == 2
    _one_line_error(capsys, str(bogus))
    sae = write_sae(tmp_path / "a", 40, 8, seed=0)
    assert main(["index", "build", sae, "--out", str(out), "k=0"]) == 2
    # Config errors use the house format: a header line, then one line per bad field.
    assert "  k: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert not out.exists()
    assert main(["neighbors", sae]) == 2
    _one_line_error(capsys, "FEATURE")
    (tmp_path / "v.npy").write_text("not numpy")
    assert main(["neighbors", sae, "--vector", str(tmp_path / "v.npy")]) == 2
    _one_line_error(capsys, "cannot read --vector")
