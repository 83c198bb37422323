"""Built-in corpora that need no download: the text every Python installation carries.

Two corpora, named in :class:`~dictlearn.corpus.CorpusConfig` ``paths`` by a special value:

* ``builtin:python-stdlib``: every ``.py`` file of the running interpreter's standard library
  (code, comments and docstrings), one document per file, sorted by path relative to the
  stdlib root. Test suites (``test/``, ``tests/``, ``idle_test/``), ``site-packages`` and
  ``__pycache__`` are left out: the tests are half the tree and full of deliberately odd files.
* ``builtin:python-docs``: the language reference and library topics that ``help()`` shows,
  from ``pydoc_data.topics`` (plain text); one document per topic, sorted by topic name.

Both depend on the Python version, so the corpus is deterministic for a given interpreter, not
across interpreters. Sizes for CPython 3.11.7 are in ``docs/corpora.md``.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

PYTHON_STDLIB = "builtin:python-stdlib"
PYTHON_DOCS = "builtin:python-docs"
BUILTIN_CORPORA = (PYTHON_STDLIB, PYTHON_DOCS)

# Directory names skipped anywhere under the stdlib root (see the module docstring for why).
_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files() -> list[str]:
    """Absolute paths of the stdlib ``.py`` files in the ``builtin:python-stdlib`` corpus.

    Sorted by path relative to the stdlib root, so the order does not depend on where Python is
    installed or on the file system's listing order. Empty files (many ``__init__.py``) are left
    out because they hold no text.
    """
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        if path.is_file() and path.stat().st_size > 0:
            files.append((rel.as_posix(), str(path)))
    return [full for _, full in sorted(files)]


def python_doc_topics() -> list[tuple[str, str]]:
    """``(topic, text)`` pairs of the ``builtin:python-docs`` corpus, sorted by topic name."""
    from pydoc_data.topics import topics  # Imported lazily: a 700 kB module of string literals.

    return sorted((name, text) for name, text in topics.items() if text.strip())
