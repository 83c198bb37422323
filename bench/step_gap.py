"""Host gap between train steps: the real ``dictlearn train`` loop against back-to-back steps.

    uv run python bench/step_gap.py [--steps 300] [--n-features 256] [--d-model 64] [--batch 256]
        [--read-threads 1,0] [--dtype float32|bfloat16] [--stream-only]

At a small width a step's device work is short and anything the host does between steps (reading
metrics back, agreeing on preemption, picking the AuxK variant) shows up as idle device time.
Two numbers, measured in the same process on the same compiled step:

* ``floor``: the step dispatched back to back over pre-staged batches, one wait at the end;
* ``loop``: ``trainer.main`` on a planted dataset (one device, log every 10 steps, one checkpoint
  at the end), per step from the ``tokens_per_s`` of its log rows (compile and the final save
  excluded: the first two rows are dropped, the median of the rest taken).

``loop / floor`` is the overhead ratio; ``gap`` is loop - floor per step. ``run CPU ms/step`` is
the process's CPU time over the whole ``main`` call divided by its steps: every thread, with
compilation, start-up and the final save, so it says how busy the host was, not what a step
costs it (on the H200 host it read 79-175 ms for a 4-5 ms step; which threads spent that was not
broken down). The machine is shared: wall times move with its load.
Two host costs per step are timed alone to say where a gap comes from: ``stream``, one global
batch from the run's ``BatchStream`` read synchronously (block reads, CRC checks, shuffle
gather; ``stream CPU``: the process CPU time it took), and ``to device``, that batch's
``global_batch_array`` until it is on the device. ``--stream-only`` measures just these two,
over ``--steps`` batches (no loop, no floor): the host's side, which needs no accelerator.
``--read-threads`` gives one row per ``data.read_threads`` value (0: the default, one per core
up to 8), the loop and the stream timed with it; the floor is shared. ``--dtype`` is the planted
dataset's storage dtype (``dictlearn generate`` writes bfloat16 by default).
To compare with another version of the trainer, run this script with that version first on
``PYTHONPATH``; the numbers are only comparable within one machine and load.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import collections
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from dictlearn.config import validate
from dictlearn.data import PlantedConfig, write_planted_dataset
from dictlearn.tracking import read_metrics
from dictlearn.train.config import TrainConfig
from dictlearn.train.trainer import _stream, build_program, main, open_dataset, run_dir_of


def _config(root: str, data: str, args: argparse.Namespace, read_threads: int) -> TrainConfig:
    return validate(
        TrainConfig,
        {
            "sae": {
                "architecture": "topk",
                "n_features": args.n_features,
                "k": 8,
                # No latent can die within the run, so the loop compiles no AuxK branch and runs
                # the very program the floor times (AuxK's own cost is not a host gap).
                "dead_window_tokens": args.batch * (args.steps + 1),
            },
            "mesh": {"data": 1, "model": 1},
            "data": {"path": data, "read_threads": read_threads},
            "train": {"batch_size": args.batch, "steps": args.steps, "log_every": 10},
            "checkpoint": {"every_steps": args.steps, "async_save": False},
            "tracker": {"wandb_mode": "disabled"},
            "run": {"output_dir": f"{root}/runs", "name": "gap"},
        },
    )


def floor_ms(config: TrainConfig, steps: int) -> float:
    """ms per step of the compiled step dispatched back to back, nothing read in between."""
    dataset = open_dataset(config)
    program = build_program(config, dataset)
    step = program.step_fn(False)  # the variant the loop runs (no latent can die)
    rng = np.random.default_rng(0)
    batches = [
        program.global_batch_array(rng.normal(size=(config.train.batch_size, dataset.d_model)))
        for _ in range(8)
    ]
    state = program.init(jax.random.key(0), jax.numpy.asarray(dataset.mean))
    state, _ = step(state, batches[0])  # compile
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(steps):
        state, _ = step(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / steps * 1e3


_TRANSFER_BATCHES = 20
"""Batches ``host_ms`` keeps to time their transfer to the device."""


def host_ms(config: TrainConfig, batches: int = 20) -> tuple[float, float, float, int]:
    """ms per global batch read synchronously from the run's stream, process CPU ms per batch
    read, ms per transfer, and the read threads the stream used."""
    dataset = open_dataset(config)
    program = build_program(config, dataset)
    # Only the last few batches are kept (for the transfer timing): keeping every batch would
    # make each one fresh memory, page-faulted in by the read, which the loop, freeing each
    # batch after its step, does not pay.
    kept: collections.deque[np.ndarray] = collections.deque(maxlen=_TRANSFER_BATCHES)
    with _stream(config, dataset, "train", position=0) as stream:  # closes its read pool
        stream.prefetch = 0  # no read-ahead: the time is the read's alone
        kept.append(next(stream))  # opens the shards
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            kept.append(next(stream))
        read = (time.perf_counter() - start) / batches * 1e3
        read_cpu = (time.process_time() - cpu) / batches * 1e3
    jax.block_until_ready(program.global_batch_array(kept[0]))
    start = time.perf_counter()
    for r in kept:
        jax.block_until_ready(program.global_batch_array(r))
    transfer = (time.perf_counter() - start) / len(kept) * 1e3
    return read, read_cpu, transfer, stream.read_threads


def loop_ms(config: TrainConfig) -> tuple[float, float]:
    """ms per step of the trainer's loop (median over log rows), and the process's CPU ms over
    the whole ``main`` call (all threads, compilation included) per step."""
    cpu = time.process_time()
    main(config)
    cpu_ms = (time.process_time() - cpu) / config.train.steps * 1e3
    rows = [r for r in read_metrics(run_dir_of(config)) if "tokens_per_s" in r][2:]
    per_step = [config.train.batch_size / r["tokens_per_s"] * 1e3 for r in rows]
    return statistics.median(per_step), cpu_ms


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-features", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--read-threads",
        default="1,0",
        help="comma-separated data.read_threads values, one row each (0: the default)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--stream-only",
        action="store_true",
        help="time only the stream and the transfer, over --steps batches",
    )
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.read_threads.split(",")]
    with tempfile.TemporaryDirectory() as root:
        data = f"{root}/data"
        n_tokens = args.batch * (args.steps + 8)
        write_planted_dataset(
            data,
            PlantedConfig(
                d_model=args.d_model,
                n_features=64,
                n_tokens=n_tokens,
                mean_active=3.0,
                dtype=args.dtype,
            ),
        )
        rows = []
        for read_threads in thread_counts:
            config = _config(root, data, args, read_threads)
            if args.stream_only:
                loop = cpu = float("nan")
                read, read_cpu, transfer, threads_used = host_ms(config, args.steps)
            else:
                loop, cpu = loop_ms(config)
                read, read_cpu, transfer, threads_used = host_ms(config)
                # The next row's run starts fresh rather than resuming this one.
                shutil.rmtree(run_dir_of(config))
            rows.append((threads_used, loop, cpu, read, read_cpu, transfer))
        floor = float("nan") if args.stream_only else floor_ms(config, args.steps)
    print(
        f"TopK {args.n_features} latents, d_model {args.d_model}, batch {args.batch}, "
        f"{args.steps} steps, {args.dtype} dataset, {jax.devices()[0].platform}; trainer from "
        f"{os.path.dirname(os.path.dirname(os.path.abspath(main.__code__.co_filename)))}"
    )
    if args.stream_only:
        print(f"{'read threads':>12} {'stream ms':>10} {'stream CPU ms':>14} {'to device ms':>13}")
        for read_threads, _, _, read, read_cpu, transfer in rows:
            print(f"{read_threads:12d} {read:10.2f} {read_cpu:14.2f} {transfer:13.2f}")
        return
    print(
        f"{'read threads':>12} {'floor ms':>9} {'loop ms':>8} {'gap ms':>7} {'loop/floor':>10}"
        f" {'run CPU ms/step':>17} {'stream ms':>10} {'stream CPU ms':>14} {'to device ms':>13}"
    )
    for read_threads, loop, cpu, read, read_cpu, transfer in rows:
        print(
            f"{read_threads:12d} {floor:9.2f} {loop:8.2f} {loop - floor:7.2f} {loop / floor:10.2f}"
            f" {cpu:17.2f} {read:10.2f} {read_cpu:14.2f} {transfer:13.2f}"
        )


if __name__ == "__main__":
    main_cli()
