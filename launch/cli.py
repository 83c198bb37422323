"""The ``dictlearn`` command: parse, load the stage's config, call its ``main``.

    dictlearn generate CONFIG.yaml [key.sub=value ...]   # activation datasets from a corpus
    dictlearn train CONFIG.yaml [key.sub=value ...]
    dictlearn planted OUT_URL [key=value ...]      # write a planted-dictionary dataset
    dictlearn export RUN_DIR --format saelens|gemmascope|native --out URL
    dictlearn dashboard SAE_URL --out DIR [--tokens N] [--features 0,5] [--index URL] [k=v ...]
    dictlearn submit CONFIG.yaml [key.sub=value ...] --address http://HEAD:8265
    dictlearn jobs {list,status,logs,stop} [JOB_ID] --address http://HEAD:8265

Every stage's errors for bad input (config, data) are printed as one clear message with exit
status 2, not as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dictlearn.config import ConfigError
from launch.jobs import jobs_arguments, run_jobs
from launch.submit import run_submit, submit_arguments
from sharding.host_memory import reuse_freed_host_memory


def _train(args: argparse.Namespace) -> Any:
    from dictlearn.config import load_config
    from dictlearn.train.config import TrainConfig
    from launch.train import train

    result = train(load_config(TrainConfig, args.config, args.overrides))
    _print_train_summary(result)
    return result


def _generate(args: argparse.Namespace) -> Any:
    from dictlearn.activations import GenerateConfig, main
    from dictlearn.config import load_config

    config = load_config(GenerateConfig, args.config, args.overrides)
    result = main(config)
    status = "already complete" if result.shards_written == 0 else "done"
    lines = [
        f"generate {status}: {result.shards_written} shards written, {result.shards_skipped} "
        f"skipped; {result.tokens:,} activation rows per hook",
        f"  {result.lm_tokens:,} LM tokens in {result.seconds:.1f} s "
        f"({result.lm_tokens / max(result.seconds, 1e-9):,.0f} tokens/s, {result.workers} "
        f"workers, {result.worker_restarts} restarted)",
        *(f"  {hook:<14} {url}" for hook, url in result.datasets.items()),
    ]
    print("\n".join(lines))
    return result


def _pipeline(args: argparse.Namespace) -> Any:
    from launch.pipeline import load_pipeline_config, main, summary_text

    config = load_pipeline_config(*_split_config_and_overrides(args.arguments))
    if config.train.ray.uses_ray:
        import jax

        # Before the generate stage can start a backend here: the accelerators belong to the
        # trainer actors (see launch.train).
        jax.config.update("jax_platforms", "cpu")
    result = main(config)
    print(summary_text(result))
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


def _export(args: argparse.Namespace) -> Any:
    from dictlearn.config import validate
    from dictlearn.export import ExportConfig, export_sae

    config = validate(
        ExportConfig,
        {
            "source": args.source,
            "format": args.format,
            "out": args.out,
            "step": args.step,
            "dataset": args.dataset,
            "density_tokens": args.density_tokens,
        },
        "export request",
    )
    result = export_sae(config)
    sae = result.sae
    print(
        f"exported step {result.step} of {config.source} as {result.format} to {result.out}: "
        f"{sae.architecture}{f' k={sae.k}' if sae.k else ''}, d_in {sae.d_in}, d_sae {sae.d_sae}"
        f" ({', '.join(result.files)})"
    )
    return result


def _export_arguments(p: argparse.ArgumentParser) -> None:
    from dictlearn.export.formats import FORMATS

    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT_DIR", help="The run to export.")
    p.add_argument("--format", required=True, choices=FORMATS, help="Export format.")
    p.add_argument("--out", required=True, metavar="URL", help="Output directory (or gs:// URL).")
    p.add_argument("--step", type=int, default=None, help="Checkpoint step (default: newest).")
    p.add_argument(
        "--dataset",
        default=None,
        metavar="URL",
        help="The run's activation dataset, if it moved (default: the run's data.path).",
    )
    p.add_argument(
        "--density-tokens",
        type=int,
        default=65_536,
        help="Dataset rows for the per-latent firing frequencies (0: skip them).",
    )


def _dashboard(args: argparse.Namespace) -> Any:
    from dictlearn.config import apply_overrides, validate
    from dictlearn.inspect.dashboard import DashboardConfig, main

    data: dict[str, Any] = {"sae": args.sae, "out": args.out}
    if args.tokens is not None:
        data["tokens"] = args.tokens
    if args.features is not None:
        try:
            data["features"] = [int(f) for f in args.features.split(",") if f.strip()]
        except ValueError:
            raise ConfigError(
                f"--features {args.features!r}: expected comma-separated ids, e.g. 0,5,9"
            ) from None
    if args.index is not None:
        data["index"] = args.index
    config = validate(DashboardConfig, apply_overrides(data, args.overrides), "dashboard config")
    result = main(config)
    print(
        f"dashboard done: {result.features} features over {result.tokens:,} tokens "
        f"({result.lm_tokens:,} LM tokens, pass {result.pass_seconds:.1f} s, total "
        f"{result.seconds:.1f} s, {result.workers} Ray workers)\n"
        f"  open {result.out.rstrip('/')}/index.html"
    )
    return result


def _dashboard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", metavar="SAE_URL", help="Run directory, checkpoint or SAE export.")
    p.add_argument("--out", required=True, metavar="DIR", help="Output directory of the site.")
    p.add_argument("--tokens", type=int, default=None, help="LM tokens to run (default 65536).")
    p.add_argument(
        "--features", default=None, metavar="IDS", help="Comma-separated feature ids (default all)."
    )
    p.add_argument(
        "--index", default=None, metavar="URL", help="A `dictlearn index` directory (neighbours)."
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="Other settings, e.g. first=200 top_n=10 context_length=256 ray.num_workers=4.",
    )


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


def _pipeline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "arguments",
        nargs="*",
        metavar="[CONFIG.yaml] key.sub=value",
        help="An optional pipeline config (default: the embedded defaults, Gemma 3 270M on the "
        "built-in corpus), then dotted overrides.",
    )


def _split_config_and_overrides(arguments: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] key=value ...``: the config is the first argument if it is no override."""
    if arguments and "=" not in arguments[0]:
        return arguments[0], arguments[1:]
    return None, arguments


def _planted_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT_URL", help="Dataset directory or gs:// URL.")
    _override_arguments(p)


# name -> (help, adds the command's arguments, runs it). Each stage's module keeps its logic; the
# handlers here only parse and call.
COMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any]],
] = {
    "generate": (
        "Run the LM over a corpus on Ray workers and write activation datasets.",
        _config_arguments,
        _generate,
    ),
    "train": ("Train an SAE on an activation dataset.", _config_arguments, _train),
    "pipeline": (
        "Run the whole pipeline (generate -> train), skipping finished stages.",
        _pipeline_arguments,
        _pipeline,
    ),
    "planted": (
        "Write a synthetic planted-dictionary activation dataset.",
        _planted_arguments,
        _planted,
    ),
    "export": (
        "Export a trained SAE for other tools (SAELens, Gemma Scope, native).",
        _export_arguments,
        _export,
    ),
    "dashboard": (
        "Feature dashboards of an SAE over a corpus: a static site + Neuronpedia JSON.",
        _dashboard_arguments,
        _dashboard,
    ),
    "submit": (
        "Run a stage's config as a job on a Ray cluster (Ray Jobs API).",
        submit_arguments,
        run_submit,
    ),
    "jobs": ("List, inspect, tail or stop the jobs on a Ray cluster.", jobs_arguments, run_jobs),
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
    """Errors printed as one line (exit 2) instead of a traceback.

    ConfigError, DatasetError, CorpusError and the cluster errors are ValueErrors. A training
    divergence can only have come from the trainer module if it was imported: looking it up in
    ``sys.modules`` keeps a failing ``dictlearn jobs`` call from importing jax just to print.
    """
    errors: tuple[type[BaseException], ...] = (ConfigError, ValueError, FileNotFoundError)
    trainer = sys.modules.get("dictlearn.train.trainer")
    if trainer is not None:
        errors += (trainer.TrainingDiverged,)
    multihost = sys.modules.get("launch.multihost")
    if multihost is not None:  # a trainer host died: the message names the checkpoint
        errors += (multihost.HostFailure,)
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so `key=value` overrides
    # written after options (`dashboard SAE --out D first=200`) come back unrecognised.
    if extra:
        if "overrides" in vars(args) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _, _, handler = COMMANDS[args.command]
    try:
        handler(args)
    except _user_errors() as e:
        print(f"dictlearn {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def entry_point() -> None:
    """Console-script entry (``dictlearn``): a fresh process, so set it up, then run."""
    # Before any command starts JAX's CPU backend (a no-op where it cannot help). Not in
    # main(), which tests call inside their own long-lived process.
    reuse_freed_host_memory()
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
