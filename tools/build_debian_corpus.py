"""Assemble an English + multilingual text corpus from Debian documentation packages.

    python tools/build_debian_corpus.py /tmp/debian-corpus          # or gs://bucket/corpora/debian

Downloads the packages' ``.deb`` files with ``apt-get download`` and unpacks them with
``dpkg -x`` into a temporary directory (nothing is installed, root is not needed beyond what
``apt-get download`` needs), extracts text, and writes::

    OUT/shards/debian-00000.jsonl ...   {"text": ..., "package": ..., "path": ..., "lang": ...}
                                         (documents in a seeded random order, ~32 MB a shard)
    OUT/manifest.json                    package versions + sha256, document/character counts

The manifest is written last: a directory without one is an unfinished build. Package versions
follow the machine's apt sources and change over time, so they are recorded, never pinned.
Read the result with ``CorpusConfig(paths=["OUT/shards/*.jsonl"])``; see ``docs/corpora.md``.

What becomes a document (one per source file unless said otherwise):

* linux-doc: the reStructuredText sources under ``Documentation/`` (the HTML is the same text
  rendered, so it is skipped); ``translations/<lang>/`` gives the language.
* python3-doc: the reST sources the HTML was built from (``html/_sources/**.txt``).
* perl-doc: the ``.pod`` files.
* fortunes: each fortune (files are ``%``-separated).
* jargon-text: the Jargon File as one text.
* debian-handbook: each HTML page of each of its ~26 translations, as plain text.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec

DEFAULT_PACKAGES = (
    "linux-doc",
    "python3-doc",
    "perl-doc",
    "fortunes",
    "jargon-text",
    "debian-handbook",
)
# Metapackages whose content is in the one versioned package they depend on (linux-doc ->
# linux-doc-6.1 on bookworm): resolving them keeps the default list valid across releases.
METAPACKAGES = ("linux-doc", "python3-doc")

# (glob under the unpacked tree, how to read it). Globs name the versioned directories loosely
# (python3.*, perl/5.*) so a new Debian release needs no edit.
RULES: list[tuple[str, str]] = [
    ("usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz", "text"),
    ("usr/share/doc/linux-doc-*/Documentation/**/*.txt.gz", "text"),
    ("usr/share/doc/python3.*/html/_sources/**/*.txt", "text"),
    ("usr/share/doc/python3.*/html/_sources/**/*.txt.gz", "text"),
    ("usr/share/perl/5.*/pod/*.pod", "text"),
    ("usr/share/games/fortunes/*", "fortunes"),
    ("usr/share/doc/jargon-text/jargon.txt.gz", "text"),
    ("usr/share/doc/debian-handbook/html/*/*.html", "html"),
]

_LANG_PATTERNS = [
    re.compile(r"/debian-handbook/html/([a-z]{2}-[A-Z]{2})/"),
    re.compile(r"/Documentation/translations/([a-z]{2}_[A-Z]{2})/"),
]


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run a command, failing with its stderr shown."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr}")
    return result.stdout


def resolve_package(name: str) -> str:
    """The package that holds ``name``'s content (itself unless it is a known metapackage)."""
    if name not in METAPACKAGES:
        return name
    deps = re.findall(r"^\s*Depends: (\S+)$", run(["apt-cache", "depends", name]), re.M)
    if len(deps) != 1:
        sys.exit(f"cannot resolve metapackage {name}: depends on {deps}")
    return deps[0]


class _HtmlText(html.parser.HTMLParser):
    """Visible text of an HTML page, one line per block element."""

    _BLOCKS = frozenset(
        (
            "p",
            "div",
            "br",
            "li",
            "tr",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "pre",
            "table",
            "ul",
            "ol",
            "dl",
            "dt",
            "dd",
            "section",
            "title",
        )
    )
    _SKIP = frozenset(("script", "style", "head"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIP:
            self._skip_depth += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Plain text of an HTML page: visible text, whitespace runs and blank lines collapsed."""
    parser = _HtmlText()
    parser.feed(markup)
    lines = (
        re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(parser.parts).split("\n")
    )
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_text(path: Path) -> str | None:
    """UTF-8 text of a (possibly gzipped) file; None for binary or non-UTF-8 files."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def documents(root: Path, package: str) -> Iterator[dict[str, str]]:
    """Records extracted from one unpacked package, in sorted path order."""
    seen: set[Path] = set()
    for pattern, kind in RULES:
        for path in sorted(root.glob(pattern)):
            if path in seen or path.is_symlink() or not path.is_file():
                continue
            if kind == "fortunes" and path.suffix:  # .dat indexes, .u8 symlinks
                continue
            seen.add(path)
            text = read_text(path)
            if text is None:
                continue
            rel = "/" + path.relative_to(root).as_posix()
            lang = next((m.group(1) for p in _LANG_PATTERNS if (m := p.search(rel))), "en")
            lang = lang.replace("_", "-")  # The handbook writes fr-FR, the kernel it_IT.
            if kind == "html":
                texts = [html_to_text(text)]
            elif kind == "fortunes":
                texts = [t.strip() for t in re.split(r"^%$", text, flags=re.M)]
            else:
                texts = [text.strip()]
            for t in texts:
                if t:
                    yield {"text": t, "package": package, "path": rel, "lang": lang}


def build(out: str, packages: list[str], shard_mb: int, seed: int) -> dict:
    """Download, unpack and convert ``packages``; write shards and the manifest under ``out``."""
    fs, out_root = fsspec.core.url_to_fs(out)
    if fs.exists(f"{out_root}/manifest.json"):
        sys.exit(f"{out} already holds a finished corpus (manifest.json); choose a new directory")
    resolved = [resolve_package(p) for p in packages]
    manifest: dict = {"packages": [], "shuffle_seed": seed, "shards": []}
    records: list[dict[str, str]] = []

    with tempfile.TemporaryDirectory(prefix="debian-corpus-") as tmp:
        work = Path(tmp)
        print(f"apt-get download {' '.join(resolved)}", file=sys.stderr)
        run(["apt-get", "download", *resolved], cwd=work)
        for package in resolved:
            (deb,) = work.glob(f"{package}_*.deb")
            fields = run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
            version = re.search(r"^Version: (.+)$", fields, re.M).group(1)  # type: ignore[union-attr]
            manifest["packages"].append(
                {
                    "name": package,
                    "version": version,
                    "deb": deb.name,
                    "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
                }
            )
            root = work / package
            run(["dpkg", "-x", str(deb), str(root)])
            n_before = len(records)
            records.extend(documents(root, package))
            print(f"{package} {version}: {len(records) - n_before} documents", file=sys.stderr)

    # Extraction order is sorted by package and path; a seeded shuffle then mixes packages and
    # languages in every shard, so any contiguous slice (a corpus shard, max_documents) is a
    # sample of the whole rather than, say, only kernel docs.
    random.Random(seed).shuffle(records)
    fs.makedirs(f"{out_root}/shards", exist_ok=True)
    shard: list[str] = []
    shard_bytes = 0
    for i, record in enumerate(records):
        line = json.dumps(record, ensure_ascii=False) + "\n"
        shard.append(line)
        shard_bytes += len(line.encode())
        if shard_bytes >= shard_mb << 20 or i == len(records) - 1:
            name = f"shards/debian-{len(manifest['shards']):05d}.jsonl"
            with fs.open(f"{out_root}/{name}", "w", encoding="utf-8") as f:
                f.writelines(shard)
            manifest["shards"].append({"path": name, "documents": len(shard), "bytes": shard_bytes})
            shard, shard_bytes = [], 0

    manifest["documents"] = len(records)
    manifest["characters"] = sum(len(r["text"]) for r in records)
    for key in ("package", "lang"):
        counts: dict[str, dict[str, int]] = {}
        for r in records:
            entry = counts.setdefault(r[key], {"documents": 0, "characters": 0})
            entry["documents"] += 1
            entry["characters"] += len(r["text"])
        manifest[f"by_{key}"] = dict(sorted(counts.items()))
    manifest["command"] = (
        f"python tools/build_debian_corpus.py {out} --packages {' '.join(packages)} "
        f"--shard-mb {shard_mb} --seed {seed}"
    )
    # Written last: its presence marks a finished build.
    with fs.open(f"{out_root}/manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def main() -> None:
    """Parse the command line and build the corpus."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output directory (local path or fsspec URL)")
    parser.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES))
    parser.add_argument("--shard-mb", type=int, default=32, help="approximate size of each shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document shuffle")
    args = parser.parse_args()
    manifest = build(args.out, args.packages, args.shard_mb, args.seed)
    summary = {k: manifest[k] for k in ("documents", "characters", "by_package")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
