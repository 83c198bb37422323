"""What the per-block checksums cost on the read path: version 2 against version 1.

    uv run --frozen python bench/read_checksums.py [--rows 65536] [--d-model 640] [--reps 5]

Writes one shard of ``--rows`` x ``--d-model`` rows (bfloat16 and float32) into a temp dir, twice:
as written (version 2, a CRC32 per 64 rows) and rewritten as version 1 (no block checksums). Then
reads the whole shard as the batch stream does, ``--block-rows`` rows per range, 16 ranges per
``read_row_ranges`` call, from the page cache (the worst case for the checksum's share: no
network or disk time to hide behind). Prints the medians of ``--reps`` passes in process
CPU-seconds per GB read (machines are shared) and version 2's overhead. Version 2 adds one
CRC-32 per block (zlib-ng's; the values of zlib.crc32) and drops the NaN/Inf scan version 1 needs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from dictlearn.data import ActivationDataset, DatasetWarning, commit_manifest, write_shard


def _downgrade(root: Path) -> None:
    for sidecar in (root / "shards").glob("*.json"):
        info = json.loads(sidecar.read_text())
        del info["checksum_rows"], info["block_crc32"]
        sidecar.write_text(json.dumps(info))
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps(manifest | {"version": 1}))


def _pass(ds: ActivationDataset, block_rows: int) -> float:
    n = ds.shard_n_tokens(0)
    ranges = [(0, s, s + block_rows) for s in range(0, n - block_rows + 1, block_rows)]
    start = time.process_time()
    for i in range(0, len(ranges), 16):
        ds.read_row_ranges(ranges[i : i + 16])
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--block-rows", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rows = np.random.default_rng(0).normal(size=(args.rows, args.d_model)).astype(np.float32)
    warnings.simplefilter("ignore", DatasetWarning)
    print(f"{args.rows} x {args.d_model}, reads of {args.block_rows} rows, CPU-s per GB")
    for dtype in ("bfloat16", "float32"):
        with tempfile.TemporaryDirectory() as tmp:
            v2, v1 = Path(tmp) / "v2", Path(tmp) / "v1"
            info = write_shard(str(v2), 0, rows, dtype)
            commit_manifest(str(v2), [info], source_model="bench", hook="h", layer=None)
            shutil.copytree(v2, v1)
            _downgrade(v1)
            datasets = {
                "v1": ActivationDataset.open(str(v1)),
                "v2": ActivationDataset.open(str(v2)),
            }
            gb = info.nbytes / 1e9
            times: dict[str, list[float]] = {"v1": [], "v2": []}
            for _ in range(args.reps):  # alternate, so load changes hit both alike
                for name, ds in datasets.items():
                    times[name].append(_pass(ds, args.block_rows) / gb)
            v1_s, v2_s = statistics.median(times["v1"]), statistics.median(times["v2"])
            print(
                f"  {dtype:<8}  v1 {v1_s:6.3f}  v2 {v2_s:6.3f}  overhead {100 * (v2_s / v1_s - 1):+.0f} %"
            )


if __name__ == "__main__":
    main()
