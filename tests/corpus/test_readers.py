"""Readers: each format, globs and directories, other fsspec file systems, and bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dictlearn.config import ConfigError, validate
from dictlearn.corpus import CorpusConfig, CorpusError, iter_documents, plan_corpus_shards


def read_all(**config) -> list[str]:
    """Every document of the corpus, in plan order, through a one-shard plan."""
    (shard,) = plan_corpus_shards(CorpusConfig(n_shards=1, seed=None, **config))
    return list(iter_documents(shard))


def write_jsonl(path: Path, records: list[dict], *, compress: bool = False) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if compress:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first line\n\nsecond paragraph\n")
    (tmp_path / "b.txt").write_text("ünïcode ✓")
    assert read_all(paths=[str(tmp_path / "*.txt")]) == [
        "first line\n\nsecond paragraph\n",
        "ünïcode ✓",
    ]


def test_jsonl_reads_named_field_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "one", "id": 1}\n\n{"body": "two"}\n   \n{"body": ""}\n')
    assert read_all(paths=[str(path)], text_field="body") == ["one", "two", ""]


def test_compressed_jsonl(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "docs.jsonl.gz", [{"text": "zipped"}, {"text": "too"}], compress=True)
    assert read_all(paths=[str(tmp_path / "docs.jsonl.gz")]) == ["zipped", "too"]


def test_parquet_reads_named_column(tmp_path: Path) -> None:
    table = pa.table({"content": ["p0", "p1", "p2"], "score": [1, 2, 3]})
    pq.write_table(table, tmp_path / "docs.parquet")
    assert read_all(paths=[str(tmp_path / "docs.parquet")], text_field="content") == [
        "p0",
        "p1",
        "p2",
    ]


def test_globs_directories_and_mixed_formats(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.txt").write_text("deep")
    (tmp_path / "a.txt").write_text("top")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "json"}])
    pq.write_table(pa.table({"text": ["pq"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.md").write_text("ignored: unknown extension inside a directory")

    # A directory means every file with a known extension under it, in sorted order.
    assert read_all(paths=[str(tmp_path)]) == ["top", "json", "pq", "deep"]
    # A recursive glob; the same file named twice is read once.
    assert read_all(paths=[str(tmp_path / "**" / "*.txt"), str(tmp_path / "a.txt")]) == [
        "top",
        "deep",
    ]


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    (tmp_path / "data.log").write_text('{"text": "x"}\n')
    with pytest.raises(CorpusError, match=r"data\.log.*format"):
        read_all(paths=[str(tmp_path / "data.log")])
    assert read_all(paths=[str(tmp_path / "data.log")], format="jsonl") == ["x"]


def test_other_fsspec_filesystems_keep_their_protocol() -> None:
    # memory:// stands in for gs://: both list paths without the protocol, which must come back.
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus-test/a.jsonl", b'{"text": "mem a"}\n')
    fs.pipe("/corpus-test/b.txt", b"mem b")
    try:
        (shard,) = plan_corpus_shards(
            CorpusConfig(paths=["memory://corpus-test/*"], n_shards=1, seed=None)
        )
        assert [p.path for p in shard.pieces] == [
            "memory:///corpus-test/a.jsonl",
            "memory:///corpus-test/b.txt",
        ]
        assert list(iter_documents(shard)) == ["mem a", "mem b"]
    finally:
        fs.rm("/corpus-test", recursive=True)


def test_no_match_names_the_paths(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing-*.jsonl")
    with pytest.raises(CorpusError, match="no corpus files match") as e:
        read_all(paths=[pattern])
    assert pattern in str(e.value)


def test_all_empty_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.jsonl").write_text("\n\n")
    with pytest.raises(CorpusError, match="no documents") as e:
        read_all(paths=[str(tmp_path / "*")])
    assert str(tmp_path) in str(e.value)


def test_missing_jsonl_field_names_file_line_and_fields(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n\n{"txt": "typo", "id": 3}\n')
    with pytest.raises(CorpusError) as e:
        read_all(paths=[str(path)])
    assert f"{path}:3" in str(e.value)
    assert "'text'" in str(e.value) and "['id', 'txt']" in str(e.value)


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(CorpusError, match=rf"{path}:2: not valid JSON"):
        read_all(paths=[str(path)])
    path.write_text('{"text": 7}\n')
    with pytest.raises(CorpusError, match=rf"{path}:1: field 'text' is int"):
        read_all(paths=[str(path)])


def test_missing_parquet_column_names_file_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["x"], "lang": ["en"]}), path)
    with pytest.raises(CorpusError) as e:
        read_all(paths=[str(path)])
    assert str(path) in str(e.value)
    assert "'text'" in str(e.value) and "['body', 'lang']" in str(e.value)


def test_null_parquet_value_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["x", None]}), path)
    with pytest.raises(CorpusError, match=rf"{path}: row 1 of column 'text' is NoneType"):
        read_all(paths=[str(path)])


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("corrupt.parquet", b"this is not a parquet file"),
        ("corrupt.jsonl.gz", b"not gzip data at all"),
        ("latin1.txt", "café".encode("latin-1")),
    ],
)
def test_unreadable_file_is_named(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match="cannot read corpus file") as e:
        read_all(paths=[str(path)])
    assert str(path) in str(e.value)


def test_config_is_strict() -> None:
    with pytest.raises(ConfigError, match="pathz: unknown key"):
        validate(CorpusConfig, {"paths": ["a.txt"], "pathz": []})
    with pytest.raises(ConfigError, match="paths"):
        validate(CorpusConfig, {"paths": []})
    with pytest.raises(ConfigError, match="unknown built-in corpus"):
        validate(CorpusConfig, {"paths": ["builtin:wikipedia"]})
    with pytest.raises(ConfigError, match="n_shards"):
        validate(CorpusConfig, {"paths": ["a.txt"], "n_shards": 0})
    for name, field in CorpusConfig.model_fields.items():
        assert field.description, f"CorpusConfig.{name} has no description"
