"""An index directory on any fsspec URL: Parquet parts, a build plan, a manifest written last.

    OUT/
      build.json                 the plan: what is being built (written first)
      parts/part-000000.parquet  neighbours of query features [0, block_size), ...
      ann.faiss                  the HNSW graph (approximate indexes only)
      index.json                 the manifest: the plan + the parts; written last = committed

Each part is one block of query features, written atomically (temporary name, then rename; a
single finalised upload on object stores), so a killed build leaves only whole parts and a re-run
skips them. A re-run whose plan differs from the stored one (another SAE digest, another ``k``)
is refused with the differing field named, rather than mixing two indexes in one directory.

Parquet schema: ``feature`` (int64, query feature), ``rank`` (int32, 0 = nearest), ``neighbor``
(int64, key feature), ``cosine`` (float32).
"""

from __future__ import annotations

import io
import json
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from dictlearn.config import StrictModel
from dictlearn.data.storage import (
    filesystem,
    join,
    list_sizes,
    read_bytes_or_none,
    write_bytes_atomic,
)
from dictlearn.errors import MissingInputError, UserError

PLAN = "build.json"
MANIFEST = "index.json"
PARTS = "parts"
ANN_FILE = "ann.faiss"
FORMAT_VERSION = 1

SCHEMA = pa.schema(
    [
        ("feature", pa.int64()),
        ("rank", pa.int32()),
        ("neighbor", pa.int64()),
        ("cosine", pa.float32()),
    ]
)


class IndexPlan(StrictModel):
    """What an index directory holds (everything that decides its content)."""

    format_version: int = Field(FORMAT_VERSION, description="Layout version of the directory.")
    source: str = Field(description="URL of the SAE whose features are the queries.")
    digest: str = Field(description="sha256 of the query SAE's weights.")
    keys_source: str | None = Field(
        None, description="URL of the SAE searched (cross-SAE); None: the source itself."
    )
    keys_digest: str | None = Field(None, description="sha256 of the searched SAE's weights.")
    n_features: int = Field(ge=1, description="Query features (rows of the table / k).")
    n_keys: int = Field(ge=1, description="Features searched.")
    d_in: int = Field(ge=1, description="Width of the directions (the SAE's d_in).")
    k: int = Field(ge=1, description="Neighbours per feature.")
    metric: Literal["decoder", "encoder"] = Field(description="Which directions are compared.")
    method: Literal["exact", "approximate"] = Field(description="Exact scan or HNSW graph.")
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        description="Matmul dtype of an exact build (cosines are reported in fp32)."
    )
    block_size: int = Field(ge=1, description="Query features per Parquet part.")


class IndexManifest(IndexPlan):
    """The committed index: its plan plus the parts, in feature order."""

    parts: list[str] = Field(description="Part files relative to the index directory.")
    ann_file: str | None = Field(None, description="The HNSW graph file, if approximate.")

    @property
    def cross(self) -> bool:
        """Whether the neighbours are features of another SAE (``keys_source``)."""
        return self.keys_source is not None


class IndexMismatch(UserError):
    """The output directory holds (part of) another index."""


def part_name(block: int) -> str:
    return join(PARTS, f"part-{block:06d}.parquet")


class IndexStore:
    """Reads and writes one index directory (``url``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = filesystem(url)

    def _read_json(self, name: str) -> dict | None:
        data = read_bytes_or_none(self.fs, join(self.path, name))
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise UserError(f"{join(self.url, name)} is not valid JSON: {e}") from None

    def manifest(self) -> IndexManifest | None:
        """The committed manifest, or None if the index is not (yet) complete."""
        data = self._read_json(MANIFEST)
        return None if data is None else IndexManifest.model_validate(data)

    def begin(self, plan: IndexPlan, write: bool = True) -> IndexManifest | None:
        """Start (or resume) building ``plan``; the committed manifest if it is already done.

        Every process of a multi-process build checks; only the writer (``write``) records the
        plan.

        Raises:
            IndexMismatch: the directory holds another plan; names the first differing field.
        """
        for name in (MANIFEST, PLAN):
            stored = self._read_json(name)
            if stored is not None:
                _check_same(plan, stored, join(self.url, name))
                if name == MANIFEST:
                    return IndexManifest.model_validate(stored)
                return None
        if write:
            data = _json(plan.model_dump(mode="json"))
            write_bytes_atomic(self.fs, join(self.path, PLAN), data)
        return None

    def finished_parts(self) -> set[str]:
        """Part names (relative, like ``part_name``) already written."""
        return {join(PARTS, name) for name in list_sizes(self.fs, join(self.path, PARTS))}

    def write_part(
        self, block: int, features: np.ndarray, neighbors: np.ndarray, cosines: np.ndarray
    ) -> str:
        """Write one block's neighbours (``[n, k]`` arrays for query ids ``features``)."""
        n, k = neighbors.shape
        table = pa.table(
            {
                "feature": np.repeat(np.asarray(features, np.int64), k),
                "rank": np.tile(np.arange(k, dtype=np.int32), n),
                "neighbor": neighbors.reshape(-1).astype(np.int64),
                "cosine": cosines.reshape(-1).astype(np.float32),
            },
            schema=SCHEMA,
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        name = part_name(block)
        write_bytes_atomic(self.fs, join(self.path, name), buffer.getvalue())
        return name

    def read_part(self, name: str) -> pa.Table:
        data = read_bytes_or_none(self.fs, join(self.path, name))
        if data is None:
            raise MissingInputError(f"{join(self.url, name)} is missing: the index is incomplete")
        return pq.read_table(io.BytesIO(data))

    def write_blob(self, name: str, data: bytes) -> None:
        write_bytes_atomic(self.fs, join(self.path, name), data)

    def read_blob(self, name: str) -> bytes | None:
        return read_bytes_or_none(self.fs, join(self.path, name))

    def commit(self, manifest: IndexManifest) -> None:
        """Write ``index.json``: from here on the index is complete."""
        write_bytes_atomic(
            self.fs, join(self.path, MANIFEST), _json(manifest.model_dump(mode="json"))
        )


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _check_same(plan: IndexPlan, stored: dict, where: str) -> None:
    ours = plan.model_dump(mode="json")
    for field, value in ours.items():
        if stored.get(field) != value:
            raise IndexMismatch(
                f"{where} is for {field}={stored.get(field)!r}, this build has "
                f"{field}={value!r}; use another output URL or delete that index"
            )
