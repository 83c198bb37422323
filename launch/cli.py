"""The ``dictlearn`` command: parse, load the stage's config, call its ``main``.

    dictlearn train CONFIG.yaml [key.sub=value ...]
    dictlearn planted OUT_URL [key=value ...]      # write a planted-dictionary dataset

Every stage's errors for bad input (config, data) are printed as one clear message with exit
status 2, not as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from dictlearn.config import ConfigError


def _train(args: argparse.Namespace) -> Any:
    from dictlearn.config import load_config
    from dictlearn.train.config import TrainConfig
    from dictlearn.train.trainer import main

    config = load_config(TrainConfig, args.config, args.overrides)
    result = main(config)
    _print_train_summary(result)
    return result


def _planted(args: argparse.Namespace) -> Any:
    from dictlearn.config import apply_overrides, validate
    from dictlearn.data import PlantedConfig, write_planted_dataset

    config = validate(PlantedConfig, apply_overrides({}, args.overrides), "planted config")
    write_planted_dataset(args.out, config)
    print(
        f"wrote planted dataset ({config.n_tokens} tokens, d_model {config.d_model}, "
        f"{config.n_features} true features) to {args.out}"
    )
    return None


def _print_train_summary(result: Any) -> None:
    m, e = result.metrics, result.eval_metrics
    status = "preempted: checkpoint written, re-run to resume" if result.preempted else "done"
    lines = [
        f"training {status}: {result.steps} steps, {result.tokens:,} tokens",
        f"  train  loss {m.get('loss', float('nan')):.4g}  fvu {m.get('fvu', float('nan')):.4f}  "
        f"l0 {m.get('l0', float('nan')):.1f}  dead {m.get('dead_fraction', float('nan')):.3f}",
    ]
    if e:
        lines.append(
            "  eval   "
            + "  ".join(
                f"{k} {v:.4g}"
                for k, v in sorted(e.items())
                if k in ("fvu", "l0", "mse", "planted_recovery")
            )
        )
    lines += [f"  run dir      {result.run_dir}", f"  checkpoints  {result.checkpoint_dir}"]
    print("\n".join(lines))


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.yaml", help="Config file.")
    _override_arguments(p)


def _override_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="Dotted overrides applied on top of the config file.",
    )


def _planted_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT_URL", help="Dataset directory or gs:// URL.")
    _override_arguments(p)


# name -> (help, adds the command's arguments, runs it). Each stage's module keeps its logic; the
# handlers here only parse and call.
COMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any]],
] = {
    "train": ("Train an SAE on an activation dataset.", _config_arguments, _train),
    "planted": (
        "Write a synthetic planted-dictionary activation dataset.",
        _planted_arguments,
        _planted,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dictlearn", description="Distributed dictionary learning (sparse autoencoders)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from dictlearn.corpus import CorpusError
    from dictlearn.data import DatasetError
    from dictlearn.train.trainer import TrainingDiverged

    return (ConfigError, DatasetError, CorpusError, TrainingDiverged, ValueError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, _, handler = COMMANDS[args.command]
    try:
        handler(args)
    except _user_errors() as e:
        print(f"dictlearn {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def result_as_json(result: Any) -> str:
    return json.dumps(asdict(result) if is_dataclass(result) else result, indent=2, default=str)


if __name__ == "__main__":
    sys.exit(main())


def entry_point() -> None:
    """Console-script entry (``dictlearn``)."""
    sys.exit(main())
