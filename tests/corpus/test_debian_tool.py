"""The Debian corpus tool's text extraction, on a fake unpacked tree (no apt, no network)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).parents[2] / "tools" / "build_debian_corpus.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("build_debian_corpus", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_html_to_text_keeps_visible_text_only(tool) -> None:
    markup = (
        "<html><head><title>T</title><style>p {}</style></head><body>"
        "<h1>Chapitre&nbsp;1</h1><p>Bonjour   le <b>monde</b> &amp; plus.</p>"
        "<script>var x = 1;</script><ul><li>un</li><li>deux</li></ul></body></html>"
    )
    assert tool.html_to_text(markup) == "Chapitre\xa01\n\nBonjour le monde & plus.\n\nun\n\ndeux"


def test_documents_follow_the_rules(tool, tmp_path: Path) -> None:
    fortunes = tmp_path / "usr/share/games/fortunes"
    fortunes.mkdir(parents=True)
    (fortunes / "wisdom").write_text("First fortune.\n%\nSecond\nfortune.\n%\n")
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    (fortunes / "wisdom.u8").symlink_to("wisdom")
    handbook = tmp_path / "usr/share/doc/debian-handbook/html/fr-FR"
    handbook.mkdir(parents=True)
    (handbook / "intro.html").write_text("<p>Le cahier</p>")
    kernel = tmp_path / "usr/share/doc/linux-doc-6.1/Documentation/translations/it_IT"
    kernel.mkdir(parents=True)
    (kernel / "howto.rst.gz").write_bytes(gzip.compress(b"Come fare\n"))
    (kernel / "logo.gif.gz").write_bytes(gzip.compress(b"GIF89a"))  # Matches no rule.

    records = list(tool.documents(tmp_path, "pkg"))
    assert [(r["text"], r["lang"]) for r in records] == [
        ("Come fare", "it-IT"),
        ("First fortune.", "en"),
        ("Second\nfortune.", "en"),
        ("Le cahier", "fr-FR"),
    ]
    assert records[0]["path"].endswith("/translations/it_IT/howto.rst.gz")
    assert {r["package"] for r in records} == {"pkg"}
