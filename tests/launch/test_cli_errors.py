"""The CLI's line between the user's mistakes (one line, exit 2) and bugs (traceback, exit 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dictlearn.config import ConfigError
from dictlearn.corpus import CorpusError
from dictlearn.data import DatasetError
from dictlearn.errors import MissingInputError, UserError
from dictlearn.export.model import ExportError
from dictlearn.train.trainer import TrainingDiverged
from launch import cli
from launch.cli import main
from launch.multihost import HostFailure
from launch.submit import ClusterError
from scaling_laws.fit import FitError
from sharding import MeshError

REPO = Path(__file__).resolve().parents[2]


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"dictlearn {command}: error: "), err
    return err


@pytest.mark.parametrize(
    "error",
    [ConfigError, DatasetError, CorpusError, ExportError, FitError, ClusterError, HostFailure],
)
def test_the_users_errors_are_user_errors_and_value_errors(error: type[Exception]) -> None:
    assert issubclass(error, UserError) and issubclass(error, ValueError)


def test_special_user_errors_keep_their_old_bases() -> None:
    assert issubclass(MissingInputError, FileNotFoundError)
    assert issubclass(TrainingDiverged, UserError) and issubclass(TrainingDiverged, RuntimeError)
    assert issubclass(HostFailure, RuntimeError)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "launch/configs/train_tiny.yaml", "optimzer.lr=1"], "did you mean 'optimizer'"),
        (["train", "/no/such/config.yaml"], "config file /no/such/config.yaml does not exist"),
        (["train", "launch/configs/train_tiny.yaml", "data.path=/no/such/data"], "/no/such/data"),
        (["export", "/no/such/run", "--format", "native", "--out", "x"], "/no/such/run"),
        (["fit", "/no/such/sweep"], "/no/such/sweep"),
        (["config"], "name a config"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    assert expected in _one_line_error(capsys, argv[0])


def test_a_mesh_that_does_not_fit_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from tests.train.helpers import make_planted

    make_planted(tmp_path / "data")
    monkeypatch.chdir(REPO)
    argv = ["train", "launch/configs/train_tiny.yaml", f"data.path={tmp_path / 'data'}"]
    assert main([*argv, "train.batch_size=64", "mesh.model=3", f"run.output_dir={tmp_path}"]) == 2
    assert "mesh.model=3 does not divide the 8 available devices" in _one_line_error(
        capsys, "train"
    )


def test_no_checkpoint_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dictlearn.train.checkpoint import Checkpointer

    Checkpointer(str(tmp_path / "empty"), async_save=False)  # no checkpoint in it
    assert main(["export", str(tmp_path / "empty"), "--format", "native", "--out", "o"]) == 2
    _one_line_error(capsys, "export")


def _command_raising(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Replace the ``planted`` command's handler by one that raises ``error``."""

    def handler(args):
        raise error

    help_text, arguments, _ = cli.COMMANDS["planted"]
    monkeypatch.setitem(cli.COMMANDS, "planted", (help_text, arguments, handler))


def test_a_bug_prints_its_traceback_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A plain ValueError (or any other exception) is not the user's mistake: it used to be
    # printed as one misleading "error" line that hid where it came from.
    _command_raising(monkeypatch, ValueError("operands could not be broadcast"))
    assert main(["planted", "out"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "ValueError: operands could not be broadcast" in err
    assert "bug in dictlearn" in err and "please report it" in err


@pytest.mark.parametrize(
    "error",
    [UserError("bad thing; fix it"), MeshError("mesh.model=3 ..."), MissingInputError("/x")],
)
def test_user_error_types_are_one_line(
    error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _command_raising(monkeypatch, error)
    assert main(["planted", "out"]) == 2
    assert _one_line_error(capsys, "planted").strip().endswith(str(error))


def test_a_pydantic_error_outside_validate_is_formatted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dictlearn.train.config import OptimizerConfig

    def handler(args):
        OptimizerConfig.model_validate({"lr": -1.0})

    help_text, arguments, _ = cli.COMMANDS["planted"]
    monkeypatch.setitem(cli.COMMANDS, "planted", (help_text, arguments, handler))
    assert main(["planted", "out"]) == 2
    err = _one_line_error(capsys, "planted")
    assert "  lr: Input should be greater than 0 (got -1.0)" in err


def test_a_model_level_check_is_not_buried_under_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((REPO / "launch/configs/train_tiny.yaml").read_text())
    config["optimizer"]["sparsity_warmup_steps"] = 10
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = _one_line_error(capsys, "train")
    assert "  optimizer.sparsity_warmup_steps=10 has no effect" in err
    assert "got {" not in err  # the whole config is not echoed back
