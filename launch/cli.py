"""The ``dictlearn`` command: parse, load the stage's config, call its ``main``.

    dictlearn generate CONFIG.yaml [key.sub=value ...]   # activation datasets from a corpus
    dictlearn train CONFIG.yaml [key.sub=value ...]     # one SAE, or a `group:` of several
    dictlearn sweep SWEEP.yaml [key.sub=value ...]       # a grid of training runs on Ray Tune
    dictlearn planted OUT_URL [key=value ...]      # write a planted-dictionary dataset
    dictlearn validate DATASET_URL [--deep]        # check an activation dataset's files
    dictlearn export RUN_DIR --format saelens|gemmascope|native --out URL
    dictlearn eval SAE_URL [--tokens N] [--corpus URL ...]   # spliced loss recovered
    dictlearn steer SAE_URL --feature N (--scale S | --clamp V | --ablate) --prompt TEXT
    dictlearn dashboard SAE_URL --out DIR [--tokens N] [--features 0,5] [--index URL] [k=v ...]
    dictlearn submit CONFIG.yaml [key.sub=value ...] --address http://HEAD:8265
    dictlearn jobs {list,status,logs,stop} [JOB_ID] --address http://HEAD:8265
    dictlearn fit SWEEP_DIR [--out DIR] [--holdout-largest]   # scaling laws from a sweep
    dictlearn select FITS.json n_features=N [tokens=T | flops=C] [--out CONFIG.yaml] [key=value ...]
    dictlearn index build SAE_URL --out OUT_URL [--against SAE_B_URL] [key=value ...]
    dictlearn neighbors INDEX_OR_SAE FEATURE [-k 10] | --vector v.npy | --text TEXT
    dictlearn config train|generate|pipeline|sweep [--markdown]   # every field of a config

A mistake the user can fix (a ``dictlearn.errors.UserError``: bad config, bad path, bad dataset,
a checkpoint of another run, ...) is printed as one clear message with exit status 2, not as a
traceback. Any other exception is a bug in dictlearn: its traceback is printed with a request to
report it, exit status 1. ``dictlearn sweep`` exits 1 when a trial failed (after its retry).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from dictlearn.config import ConfigError, format_validation_error
from dictlearn.errors import UserError
from launch.jobs import jobs_arguments, run_jobs
from launch.submit import run_submit, submit_arguments
from sharding.host_memory import reuse_freed_host_memory


def _train(args: argparse.Namespace) -> Any:
    from dictlearn.train.config import load_train_config
    from dictlearn.train.group import GroupResult
    from launch.train import train

    result = train(load_train_config(args.config, args.overrides))
    if isinstance(result, GroupResult):
        rate = f", {result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else ""
        print(f"group {result.name}: {len(result.members)} SAEs on one batch stream{rate}")
        for name, member in result.members.items():
            print(f"[{name}]")
            _print_train_summary(member)
    else:
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
    return 1 if result.failed else result  # a hook's group failed, the others went on


def _sweep(args: argparse.Namespace) -> Any:
    from launch.sweep import load_sweep_config, main, summary_text

    result = main(load_sweep_config(args.config, args.overrides))
    print(summary_text(result))
    return 1 if result.failed else 0  # the sweep went on, but a script should know


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


def _validate(args: argparse.Namespace) -> Any:
    import time
    import warnings

    from dictlearn.data import ActivationDataset, DatasetWarning

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetWarning)
        dataset = ActivationDataset.open(args.dataset)
        if args.deep:
            dataset.validate(deep=True)
    for w in caught:
        print(f"dictlearn validate: warning: {w.message}", file=sys.stderr)
    m = dataset.manifest
    nbytes = sum(shard.nbytes for shard in m.shards)
    checked = (
        f"deep: every {'block checksum' if dataset.checks_blocks else 'shard CRC32 and value'} "
        f"read back, {nbytes:,} bytes in {time.perf_counter() - start:.1f} s"
        if args.deep
        else "quick: manifest, shard sizes, sidecars; --deep reads every byte"
    )
    print(
        f"dataset OK ({checked}): {dataset.url}\n"
        f"  format version {m.version}, {m.n_tokens:,} rows x d_model {m.d_model} {m.dtype} in "
        f"{len(m.shards)} shards ({nbytes:,} bytes), {m.source_model} {m.hook}"
    )
    return None


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET_URL", help="Activation dataset directory or URL.")
    p.add_argument(
        "--deep",
        action="store_true",
        help="Also read every shard and check every block checksum (reads the whole dataset).",
    )


def _index(args: argparse.Namespace) -> Any:
    from dictlearn.config import apply_overrides, validate
    from dictlearn.index import IndexConfig
    from launch.index import build

    data = apply_overrides({"sae": args.sae, "out": args.out}, args.overrides)
    if args.against is not None:
        data["against"] = args.against
    result = build(validate(IndexConfig, data, "index config"))
    m = result.manifest
    status = "already complete" if result.parts_written == 0 else "done"
    keys = f" against {m.keys_source}" if m.cross else ""
    print(
        f"index {status}: {m.n_features:,} features{keys}, k={m.k}, {m.metric} cosine, "
        f"{m.method} ({m.compute_dtype}); {result.parts_written} parts written, "
        f"{result.parts_skipped} skipped in {result.seconds:.1f} s\n  {result.url}"
    )
    return result


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


def _neighbors(args: argparse.Namespace) -> Any:
    import numpy as np

    from dictlearn.index import query_neighbors

    if args.text is not None:
        return _text_neighbors(args)
    vector = None
    if args.vector is not None:
        try:
            vector = np.load(args.vector, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read --vector {args.vector}: {e}") from None
    if (args.feature is None) == (vector is None):
        raise UserError("give a FEATURE id or --vector FILE.npy (one of them)")
    result = query_neighbors(args.target, args.feature, vector, args.k, args.metric)
    query = f"feature {args.feature}" if vector is None else f"vector {args.vector}"
    kind = "exact" if result.exact else "approximate"
    lines = [f"{query}: {len(result.neighbors)} nearest features of {result.keys_source} ({kind})"]
    lines += ["  rank  neighbor    cosine"]
    lines += [
        f"  {rank:>4}  {int(n):>8}  {float(c):8.4f}"
        for rank, (n, c) in enumerate(zip(result.neighbors, result.cosines, strict=True))
    ]
    print("\n".join(lines))
    return result


def _text_neighbors(args: argparse.Namespace) -> Any:
    from dictlearn.inspect.text import text_neighbors

    if args.feature is not None or args.vector is not None:
        raise UserError("give one of FEATURE, --vector FILE.npy or --text TEXT")
    result = text_neighbors(args.target, args.text, top=args.top, k=args.k)
    lines = [f"features of {args.target} on each token (activation; nearest features, cosine)"]
    for entry in result:
        t = entry.token
        cells = [
            f"{f} ({v:.2f}; "
            + ", ".join(f"{n} {c:.2f}" for n, c in entry.neighbors.get(f, []))
            + ")"
            for f, v in t.features
        ]
        lines.append(f"  {t.position:>4} {t.text!r:<14} " + ("  ".join(cells) or "-"))
    print("\n".join(lines))
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


def _eval(args: argparse.Namespace) -> Any:
    from dictlearn.config import apply_overrides, validate
    from dictlearn.inspect.evaluate import EvalConfig, main

    fields: dict[str, Any] = {"sae": args.sae}
    if args.tokens is not None:
        fields["tokens"] = args.tokens
    if args.corpus:
        fields["corpus"] = {"paths": args.corpus}
    config = validate(EvalConfig, apply_overrides(fields, args.overrides), "eval config")
    result = main(config)
    m = result.metrics
    print(
        "\n".join(
            [
                f"spliced evaluation of {config.sae} at {result.hook}: {result.tokens:,} "
                f"predicted tokens in {result.seconds:.1f} s",
                f"  cross-entropy  clean {m['ce_clean']:.4f}  spliced {m['ce_spliced']:.4f}  "
                f"zero-ablated {m['ce_zero_ablated']:.4f}  mean-ablated {m['ce_mean_ablated']:.4f}",
                f"  loss recovered {m['loss_recovered']:.4f} (vs zero)  "
                f"{m['loss_recovered_mean']:.4f} (vs mean)   KL {m['kl_spliced']:.4f}",
                f"  fvu {m['fvu']:.4f}  l0 {m['l0']:.1f}  dead {m['dead_fraction']:.3f}  "
                f"dense {m['dense_fraction']:.3f}",
            ]
        )
    )
    return result


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


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", metavar="SAE_URL", help="Export directory, params.npz or run dir.")
    p.add_argument("--tokens", type=int, default=None, help="LM tokens to evaluate on.")
    p.add_argument(
        "--corpus",
        nargs="+",
        default=None,
        metavar="URL",
        help="Held-out text (files, globs, builtin:...); default: the built-in corpora.",
    )
    _override_arguments(p)


def _steer(args: argparse.Namespace) -> Any:
    import shutil
    import textwrap

    from dictlearn.config import apply_overrides, validate
    from dictlearn.inspect.steer import SteerConfig, main

    fields = {
        "sae": args.sae,
        "feature": args.feature,
        "prompt": args.prompt,
        "scale": args.scale,
        "clamp": args.clamp,
        "ablate": args.ablate,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    config = validate(SteerConfig, apply_overrides(fields, args.overrides), "steer config")
    result = main(config)
    width = max(30, (shutil.get_terminal_size((100, 20)).columns - 3) // 2)
    left = textwrap.wrap(result.unsteered, width) or [""]
    right = textwrap.wrap(result.steered, width) or [""]
    lines = [
        f"prompt: {result.prompt!r}   feature {result.feature}: {result.mode}",
        f"promotes: {' '.join(repr(t) for t in result.promoted_tokens)}",
        f"next-token probability on those: {result.promoted_mass_before:.4f} -> "
        f"{result.promoted_mass_after:.4f}",
        "",
        f"{'unsteered':<{width}} | steered ({result.mode})",
        f"{'-' * width}-+-{'-' * width}",
    ]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        lines.append(f"{a:<{width}} | {b}")
    print("\n".join(lines))
    return result


def _steer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", metavar="SAE_URL", help="Export directory, params.npz or run dir.")
    p.add_argument("--feature", type=int, required=True, help="The feature to steer.")
    p.add_argument("--prompt", required=True, help="The text to continue.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--scale", type=float, help="Add this much of the feature's direction.")
    mode.add_argument("--clamp", type=float, help="Clamp the feature's activation to this.")
    mode.add_argument("--ablate", action="store_true", help="Remove the feature.")
    p.add_argument("--max-new-tokens", type=int, default=32, help="Tokens to generate.")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, else sampling.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    _override_arguments(p)


def _fit(args: argparse.Namespace) -> Any:
    import warnings

    from launch.fit import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = main(
            args.sweep_dir,
            args.out,
            holdout_largest=args.holdout_largest,
            n_boot=args.n_boot,
            seed=args.seed,
            d_model=args.d_model,
        )
    for w in caught:
        print(f"dictlearn fit: warning: {w.message}", file=sys.stderr)
    print(result.table)
    print(f"\nwrote {', '.join(result.files)}")
    return result


def _select(args: argparse.Namespace) -> Any:
    from launch.select import main, parse_size

    sizes, overrides = parse_size(args.arguments)
    result = main(
        args.fits,
        int(sizes["n_features"]),
        tokens=int(sizes["tokens"]) if "tokens" in sizes else None,
        flops=sizes.get("flops"),
        out=args.out,
        overrides=overrides,
    )
    s = result.selection
    lo, hi = s.fvu_interval
    print(
        f"selected: n_features {s.n_features}, tokens {s.tokens:,} ({result.config.train.steps} "
        f"steps of {result.config.train.batch_size}), lr {s.lr:.4g}\n"
        f"  predicted held-out FVU {s.predicted_fvu:.4f} (80 % interval [{lo:.4f}, {hi:.4f}])\n"
        f"  wrote {result.config_path} and {result.sidecar_path}"
    )
    for note in s.notes:
        print(f"  note: {note}")
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


def _describe_config(args: argparse.Namespace) -> Any:
    from launch.config_docs import describe, update_readme

    if args.readme is not None:
        changed = update_readme(args.readme)
        print(f"{args.readme}: config tables {'rewritten' if changed else 'already up to date'}")
        return None
    if args.topic is None:
        raise UserError("name a config: dictlearn config train|generate|pipeline|sweep")
    print(describe(args.topic, markdown=args.markdown))
    return None


def _describe_config_arguments(p: argparse.ArgumentParser) -> None:
    from launch.config_docs import TOPICS

    p.add_argument("topic", nargs="?", choices=TOPICS, help="Which command's config.")
    p.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    p.add_argument(
        "--readme",
        metavar="README.md",
        default=None,
        help="Rewrite the generated config tables in this README (between its markers).",
    )


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


def _fit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="Sweep directory (holds trials/).")
    p.add_argument("--out", default=None, help="Output directory (default SWEEP_DIR/fits).")
    p.add_argument(
        "--holdout-largest",
        action="store_true",
        help="Also fit without the largest width and report how well it is predicted.",
    )
    p.add_argument("--n-boot", type=int, default=200, help="Bootstrap resamples (default 200).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap.")
    p.add_argument(
        "--d-model",
        type=int,
        default=None,
        help="Input width for FLOP counts if neither the configs nor the datasets give it.",
    )


def _select_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("fits", metavar="FITS.json", help="What `dictlearn fit` wrote.")
    p.add_argument(
        "arguments",
        nargs="+",
        metavar="n_features=N [tokens=T | flops=C] [key.sub=value]",
        help="The large run's width and its tokens or training FLOPs, then dotted overrides "
        "of the written config (e.g. data.path=gs://...).",
    )
    p.add_argument(
        "--out", default=None, help="Config path (default: select-N.yaml next to FITS.json)."
    )


def _index_arguments(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    build = verbs.add_parser(
        "build", help="For every feature, its k nearest features by cosine (Parquet + manifest)."
    )
    build.add_argument("sae", metavar="SAE_URL", help="An SAE export or run directory.")
    _override_arguments(build)
    build.add_argument(
        "--out", required=True, metavar="OUT_URL", help="Index directory (any fsspec URL)."
    )
    build.add_argument(
        "--against", metavar="SAE_B_URL", help="Cross-SAE: neighbours among this SAE's features."
    )


def _neighbors_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="INDEX_OR_SAE", help="An index directory or an SAE URL.")
    p.add_argument("feature", nargs="?", type=int, metavar="FEATURE", help="A feature id.")
    p.add_argument("-k", type=int, default=10, help="Neighbours to show (default 10).")
    p.add_argument("--vector", metavar="FILE.npy", help="Query by a [d_in] direction instead.")
    p.add_argument(
        "--text",
        metavar="TEXT",
        help="Run the SAE's source model on TEXT: each token's most active features, with "
        "their nearest features.",
    )
    p.add_argument("--top", type=int, default=3, help="With --text: features per token.")
    p.add_argument(
        "--metric",
        choices=("decoder", "encoder"),
        default="decoder",
        help="For an SAE target: compare decoder or encoder directions.",
    )


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
    "sweep": (
        "Train a grid of SAEs (widths x lr x tokens ...) on one dataset, as Ray Tune trials.",
        _config_arguments,
        _sweep,
    ),
    "planted": (
        "Write a synthetic planted-dictionary activation dataset.",
        _planted_arguments,
        _planted,
    ),
    "validate": (
        "Check an activation dataset: manifest, shard sizes, sidecars (--deep: every checksum).",
        _validate_arguments,
        _validate,
    ),
    "export": (
        "Export a trained SAE for other tools (SAELens, Gemma Scope, native).",
        _export_arguments,
        _export,
    ),
    "eval": (
        "Spliced evaluation: the LM's loss with the SAE's reconstruction at its hook.",
        _eval_arguments,
        _eval,
    ),
    "steer": (
        "Generate with an SAE feature steered, clamped or ablated, beside the plain text.",
        _steer_arguments,
        _steer,
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
    "fit": (
        "Fit scaling laws (loss, optimal lr, compute frontier) to a sweep's trials.",
        _fit_arguments,
        _fit,
    ),
    "select": (
        "Write a train config for a large run from fitted scaling laws.",
        _select_arguments,
        _select,
    ),
    "index": ("Build a feature-neighbour index of an SAE.", _index_arguments, _index),
    "neighbors": (
        "Nearest features of a feature or direction (from an index or an SAE).",
        _neighbors_arguments,
        _neighbors,
    ),
    "config": (
        "Print every field of a config (dotted name, type, default, kind, description).",
        _describe_config_arguments,
        _describe_config,
    ),
}

# Commands whose config `dictlearn config TOPIC` describes; their --help points there.
_CONFIG_TOPICS = {
    "train": "train",
    "generate": "generate",
    "pipeline": "pipeline",
    "sweep": "sweep",
    "submit": "train|generate|pipeline|sweep",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dictlearn",
        description="Distributed dictionary learning (sparse autoencoders).",
        epilog="Every config field (dotted name, type, default, description): "
        "dictlearn config train|generate|pipeline|sweep",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        topic = _CONFIG_TOPICS.get(name)
        epilog = (
            f"Every config field (dotted name, type, default, description): "
            f"dictlearn config {topic}"
            if topic
            else None
        )
        add_arguments(sub.add_parser(name, help=help_text, description=help_text, epilog=epilog))
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors printed as one line (exit 2) instead of a traceback: the user's to fix.

    Every ``UserError`` (ConfigError, DatasetError, a divergence, a dead host, ...), and a mesh
    that does not fit the devices, from ``sharding``, which sits below dictlearn and has its
    own error type. It can only have been raised if ``sharding`` was imported: looking it up in
    ``sys.modules`` keeps a failing ``dictlearn jobs`` call from importing jax just to print.
    """
    errors: tuple[type[BaseException], ...] = (UserError,)
    mesh = sys.modules.get("sharding.mesh")
    if mesh is not None:
        errors += (mesh.MeshError,)
    storage = sys.modules.get("dictlearn.data.storage")
    if storage is not None:  # gs:// kept failing after every retry: the message names the object
        errors += (storage.StorageError,)
    return errors


BUG_REPORT = (
    "this is a bug in dictlearn, not a mistake in your input: please report it with the "
    "traceback above and the command you ran"
)


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
        outcome = handler(args)
    except _user_errors() as e:
        print(f"dictlearn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:  # a config built outside dictlearn.config.validate
        print(f"dictlearn {args.command}: error: {format_validation_error(e)}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(f"dictlearn {args.command}: internal error: {BUG_REPORT}", file=sys.stderr)
        return 1
    # A handler may return an exit status (sweep: 1 when a trial failed); others return results.
    return outcome if isinstance(outcome, int) else 0


def entry_point() -> None:
    """Console-script entry (``dictlearn``): a fresh process, so set it up, then run."""
    # Before any command starts JAX's CPU backend (a no-op where it cannot help). Not in
    # main(), which tests call inside their own long-lived process.
    reuse_freed_host_memory()
    _show_progress_logs()
    sys.exit(main())


def _show_progress_logs() -> None:
    """Print our own INFO lines (resume point, checkpoint saves) on stderr, one per line.

    Only the ``dictlearn`` and ``launch`` loggers: the root logger stays as it is, so the
    libraries' INFO chatter (Orbax, JAX) stays off.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    for name in ("dictlearn", "launch"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


if __name__ == "__main__":
    entry_point()
