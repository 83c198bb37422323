"""The dashboard site: static HTML that works from the file system, plus Neuronpedia JSON.

Layout of ``out/``::

    index.html            searchable, sortable feature list (vanilla JS, no network)
    features.js           the list's data (a script, not fetched JSON: file:// pages can't fetch)
    app.js, style.css
    features/<id>.html    one page per feature: top contexts, quantile samples, histogram,
                          promoted / suppressed tokens, neighbour links
    neuronpedia/<id>.json Neuronpedia's feature fields (activations, pos_str, frac_nonzero, ...)
    dashboard.json        what was run: SAE, model, hook, corpus, tokens

Every piece of text that comes from the corpus or the tokenizer is HTML-escaped (or JSON-encoded
for the script).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dictlearn.data import storage
from dictlearn.export import InferenceSAE
from dictlearn.inspect.dashboard.collector import CollectorSpec
from dictlearn.lm import Tokenizer

N_BANDS = 4
"""Quantile bands the sampled contexts are split into."""


@dataclass
class SiteData:
    """Everything the site shows, computed by :func:`dictlearn.inspect.dashboard.main`."""

    sae: InferenceSAE
    model_name: str
    hook: str
    features: np.ndarray
    """``[n]`` SAE feature ids, in the order of the collector's rows."""
    state: dict[str, Any]
    """The merged collector state (numpy)."""
    spec: CollectorSpec
    attribution: dict[str, np.ndarray]
    """``pos_ids``, ``pos_values``, ``neg_ids``, ``neg_values``, each ``[n, top]``."""
    neighbours: np.ndarray
    """``[n, k]`` neighbour feature ids (-1: none)."""
    neighbour_cosines: np.ndarray
    lm_tokens: int
    corpus: str
    neuronpedia_model_id: str
    neuronpedia_sae_id: str


class _Tokens:
    """Token id -> display text, decoded once per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self.cache[token_id]


def _entries(buffer: dict[str, np.ndarray], row: int) -> list[dict[str, Any]]:
    """The non-empty entries of one feature's buffer, in buffer order."""
    out = []
    for j in np.flatnonzero(buffer["context"][row] >= 0):
        out.append(
            {
                "value": float(buffer["value"][row, j]),
                "context": int(buffer["context"][row, j]),
                "index": int(buffer["position"][row, j] - buffer["start"][row, j]),
                "start": int(buffer["start"][row, j]),
                "tokens": buffer["tokens"][row, j].tolist(),
                "acts": buffer["acts"][row, j].tolist(),
            }
        )
    return out


def _bands(samples: list[dict[str, Any]]) -> list[tuple[str, float, float, list[dict[str, Any]]]]:
    """Split sampled contexts into ``N_BANDS`` quantile bands of their activations (low first)."""
    ordered = sorted(samples, key=lambda e: (e["value"], e["context"]))
    bands = []
    for b in range(N_BANDS):
        part = ordered[len(ordered) * b // N_BANDS : len(ordered) * (b + 1) // N_BANDS]
        if part:
            label = f"{100 * b // N_BANDS}-{100 * (b + 1) // N_BANDS}% of firing contexts"
            bands.append((label, part[0]["value"], part[-1]["value"], part))
    return bands


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _context_html(entry: dict[str, Any], tokens: _Tokens, scale: float) -> str:
    spans = []
    for i, (tok, act) in enumerate(zip(entry["tokens"], entry["acts"], strict=True)):
        text = tokens(tok).replace("\n", "\u21b5")
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, act / scale))
        cls = ' class="max"' if i == entry["index"] else ""
        spans.append(
            f'<span{cls} style="background:rgba(255,140,0,{alpha:.2f})" '
            f'title="{html.escape(_fmt(act))}">{html.escape(text)}</span>'
        )
    return (
        f'<div class="ctx"><span class="val">{_fmt(entry["value"])}</span>'
        f'<span class="toks">{"".join(spans)}</span></div>'
    )


def _histogram_svg(counts: np.ndarray, edges: np.ndarray) -> str:
    nonzero = np.flatnonzero(counts)
    if not len(nonzero):
        return "<p>The feature never fired.</p>"
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    shown = counts[lo:hi]
    width, height, pad = 480, 120, 18
    bar = width / len(shown)
    top = max(int(shown.max()), 1)
    rects = []
    for i, c in enumerate(shown):
        h = (height - pad) * c / top
        rects.append(
            f'<rect x="{i * bar:.1f}" y="{height - pad - h:.1f}" width="{max(bar - 1, 1):.1f}" '
            f'height="{h:.1f}"><title>[{_fmt(edges[lo + i])}, {_fmt(edges[lo + i + 1])}): '
            f"{int(c)}</title></rect>"
        )
    labels = (
        f'<text x="0" y="{height - 4}">{_fmt(edges[lo])}</text>'
        f'<text x="{width}" y="{height - 4}" text-anchor="end">{_fmt(edges[hi])}</text>'
    )
    return (
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="activation histogram">{"".join(rects)}{labels}</svg>'
    )


def _token_list(ids: np.ndarray, values: np.ndarray, tokens: _Tokens) -> str:
    items = "".join(
        f"<li><code>{html.escape(repr(tokens(t)))}</code> {_fmt(float(v))}</li>"
        for t, v in zip(ids, values, strict=True)
    )
    return f"<ol>{items}</ol>"


def _page(title: str, body: str, css: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>{html.escape(title)}</title><link rel="stylesheet" href="{css}"></head>'
        f"<body>{body}</body></html>\n"
    )


def _feature_page(data: SiteData, row: int, tokens: _Tokens, shown: set[int]) -> str:
    fid = int(data.features[row])
    state = data.state
    top = _entries(state["top"], row)
    samples = _entries(state["sample"], row)
    max_value = top[0]["value"] if top else 0.0
    density = state["fires"][row] / max(int(state["tokens_seen"]), 1)
    att = data.attribution
    parts = [
        '<p><a href="../index.html" id="back">&larr; all features</a></p>',
        f"<h1>Feature {fid}</h1>",
        f'<p class="meta">{html.escape(data.model_name)} · {html.escape(data.hook)} · '
        f"density {density:.3e} ({int(state['fires'][row])} of "
        f"{int(state['tokens_seen'])} tokens) · max activation {_fmt(max_value)}</p>",
        '<div class="cols"><div><h2>Activation histogram</h2>',
        _histogram_svg(state["hist"][row], data.spec.hist_edges),
        '<p class="note">Nonzero per-token activations, log-spaced bins.</p></div>',
        '<div><h2>Promoted tokens</h2><div id="pos">',
        _token_list(att["pos_ids"][row], att["pos_values"][row], tokens),
        '</div></div><div><h2>Suppressed tokens</h2><div id="neg">',
        _token_list(att["neg_ids"][row], att["neg_values"][row], tokens),
        "</div></div></div>",
        '<p class="note">Decoder direction through the final norm\'s weight and the '
        "unembedding (direct path).</p>",
    ]
    links = []
    for nb, cos in zip(data.neighbours[row], data.neighbour_cosines[row], strict=True):
        if nb < 0:
            continue
        label = f"{int(nb)} ({_fmt(float(cos))})"
        links.append(
            f'<li><a class="nb" href="{int(nb)}.html">{label}</a></li>'
            if int(nb) in shown
            else f"<li>{label}</li>"
        )
    if links:
        parts += ['<h2>Nearest decoder neighbours</h2><ul class="nbs">', *links, "</ul>"]
    parts.append('<h2>Top activations</h2><div id="top">')
    parts += [_context_html(e, tokens, max_value) for e in top] or ["<p>None.</p>"]
    parts.append("</div><h2>Samples by activation quantile</h2>")
    if not samples:
        parts.append("<p>None.</p>")
    for label, lo, hi, part in reversed(_bands(samples)):
        parts.append(f"<h3>{html.escape(label)}: {_fmt(lo)} to {_fmt(hi)}</h3>")
        parts += [_context_html(e, tokens, max_value) for e in part]
    return _page(f"Feature {fid}", "".join(parts), "../style.css")


def _neuronpedia(data: SiteData, row: int, tokens: _Tokens) -> dict[str, Any]:
    state, att = data.state, data.attribution
    top = _entries(state["top"], row)
    edges = data.spec.hist_edges
    counts = state["hist"][row]

    def activation(
        entry: dict[str, Any], bin_min: float, bin_max: float, contains: float
    ) -> dict[str, Any]:
        values = [round(max(v, 0.0), 5) for v in entry["acts"]]
        return {
            "tokens": [tokens(t) for t in entry["tokens"]],
            "values": values,
            "maxValue": round(entry["value"], 5),
            "maxValueTokenIndex": entry["index"],
            "minValue": min(values),
            "binMin": bin_min,
            "binMax": bin_max,
            "binContains": contains,
        }

    # The top activations are the bin [-1, -1]; each quantile band holds 1/N_BANDS of the
    # feature's firing contexts.
    activations = [activation(e, -1, -1, -1) for e in top]
    for _, lo, hi, part in _bands(_entries(state["sample"], row)):
        activations += [activation(e, lo, hi, 1 / N_BANDS) for e in part]
    shown = np.flatnonzero(counts)
    return {
        "modelId": data.neuronpedia_model_id,
        "layer": data.neuronpedia_sae_id,
        "index": str(int(data.features[row])),
        "maxActApprox": top[0]["value"] if top else 0.0,
        "frac_nonzero": float(state["fires"][row] / max(int(state["tokens_seen"]), 1)),
        "pos_str": [tokens(t) for t in att["pos_ids"][row]],
        "pos_values": [float(v) for v in att["pos_values"][row]],
        "neg_str": [tokens(t) for t in att["neg_ids"][row]],
        "neg_values": [float(v) for v in att["neg_values"][row]],
        # Parallel arrays: one bar (its centre, geometric) per height.
        "freq_hist_data_bar_heights": [int(counts[i]) for i in shown],
        "freq_hist_data_bar_values": [float(math.sqrt(edges[i] * edges[i + 1])) for i in shown],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "topkCosSimIndices": [int(n) for n in data.neighbours[row] if n >= 0],
        "topkCosSimValues": [
            float(c)
            for n, c in zip(data.neighbours[row], data.neighbour_cosines[row], strict=True)
            if n >= 0
        ],
        "activations": activations,
    }


def write_site(out: str, data: SiteData, tokenizer: Tokenizer) -> None:
    """Write the site (see the module docstring) under ``out`` (local path or fsspec URL)."""
    fs, root = storage.filesystem(out)
    fs.makedirs(storage.join(root, "features"), exist_ok=True)
    fs.makedirs(storage.join(root, "neuronpedia"), exist_ok=True)
    tokens = _Tokens(tokenizer)
    shown = {int(f) for f in data.features}
    rows = []
    state = data.state
    seen = max(int(state["tokens_seen"]), 1)

    def put(name: str, text: str) -> None:
        with fs.open(storage.join(root, name), "w", encoding="utf-8") as f:
            f.write(text)

    for row, fid in enumerate(data.features):
        fid = int(fid)
        put(f"features/{fid}.html", _feature_page(data, row, tokens, shown))
        put(f"neuronpedia/{fid}.json", json.dumps(_neuronpedia(data, row, tokens)))
        top_ctx = _entries(state["top"], row)[:3]
        top_tokens = [tokens(e["tokens"][e["index"]]) for e in top_ctx]
        rows.append(
            [
                fid,
                float(state["fires"][row] / seen),
                top_ctx[0]["value"] if top_ctx else 0.0,
                " ".join(repr(t) for t in top_tokens),
                " ".join(repr(tokens(t)) for t in data.attribution["pos_ids"][row][:5]),
            ]
        )
    meta = {
        "sae": data.sae.source,
        "model": data.model_name,
        "hook": data.hook,
        "d_sae": data.sae.d_sae,
        "features": len(data.features),
        "corpus": data.corpus,
        "lm_tokens": data.lm_tokens,
        "tokens": int(state["tokens_seen"]),
    }
    # JSON inside a <script>: escape "</" so no string can close the script element.
    payload = json.dumps({"meta": meta, "features": rows}).replace("</", "<\\/")
    put("features.js", f"window.DASHBOARD = {payload};\n")
    put("app.js", _APP_JS)
    put("style.css", _STYLE)
    put("index.html", _INDEX_HTML)
    put("dashboard.json", json.dumps(meta, indent=1))


_INDEX_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Feature dashboards</title>
<link rel="stylesheet" href="style.css"></head>
<body>
<h1>Feature dashboards</h1>
<p class="meta" id="meta"></p>
<p><input id="search" type="search" placeholder="Search: feature id or token" size="40">
<span id="count"></span></p>
<table id="features"><thead><tr>
<th data-key="0" data-type="num">feature</th><th data-key="1" data-type="num">density</th>
<th data-key="2" data-type="num">max act</th><th data-key="3">top-activating tokens</th>
<th data-key="4">promoted tokens</th></tr></thead><tbody></tbody></table>
<script src="features.js"></script>
<script src="app.js"></script>
</body></html>
"""

_APP_JS = r"""// The feature list: rows from features.js, a search box that filters, sortable columns.
(function () {
  "use strict";
  var data = window.DASHBOARD, rows = data.features.slice();
  var tbody = document.querySelector("#features tbody");
  var search = document.getElementById("search"), count = document.getElementById("count");
  var sortKey = 0, sortDir = 1;
  var m = data.meta;
  document.getElementById("meta").textContent =
    m.model + " \u00b7 " + m.hook + " \u00b7 " + m.features + " of " + m.d_sae +
    " features \u00b7 " + m.tokens.toLocaleString() + " tokens of " + m.corpus;
  function fmt(x) { return x === 0 ? "0" : Number(x).toPrecision(3); }
  function cell(tr, text, cls) {
    var td = document.createElement("td"); td.textContent = text;
    if (cls) td.className = cls; tr.appendChild(td); return td;
  }
  function render() {
    var q = search.value.trim().toLowerCase();
    var shown = rows.filter(function (r) {
      return !q || String(r[0]) === q || r[3].toLowerCase().indexOf(q) >= 0 ||
        r[4].toLowerCase().indexOf(q) >= 0;
    });
    shown.sort(function (a, b) {
      var x = a[sortKey], y = b[sortKey];
      return (x < y ? -1 : x > y ? 1 : 0) * sortDir || a[0] - b[0];
    });
    tbody.textContent = "";
    shown.forEach(function (r) {
      var tr = document.createElement("tr");
      var a = document.createElement("a");
      a.href = "features/" + r[0] + ".html"; a.textContent = r[0];
      tr.appendChild(document.createElement("td")).appendChild(a);
      cell(tr, r[1].toExponential(2), "num"); cell(tr, fmt(r[2]), "num");
      cell(tr, r[3], "tok"); cell(tr, r[4], "tok");
      tbody.appendChild(tr);
    });
    count.textContent = shown.length + " of " + rows.length + " features";
  }
  document.querySelectorAll("#features th").forEach(function (th) {
    th.addEventListener("click", function () {
      var key = Number(th.dataset.key);
      sortDir = key === sortKey ? -sortDir : (th.dataset.type === "num" && key ? -1 : 1);
      sortKey = key; render();
    });
  });
  search.addEventListener("input", render);
  render();
})();
"""

_STYLE = """body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
h1 { margin-bottom: .2em; } h2 { font-size: 1.1em; margin: 1.2em 0 .4em; }
h3 { font-size: .95em; color: #555; margin: .8em 0 .3em; }
.meta, .note { color: #666; font-size: .9em; }
table { border-collapse: collapse; width: 100%; }
th { cursor: pointer; text-align: left; border-bottom: 2px solid #999; padding: 4px 8px; }
td { border-bottom: 1px solid #e3e3e3; padding: 3px 8px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.tok { font-family: monospace; font-size: .9em; white-space: pre; }
#search { font-size: 1em; padding: 4px 6px; }
.cols { display: flex; gap: 2.5em; flex-wrap: wrap; }
.cols ol { font-size: .9em; margin: 0; padding-left: 1.6em; }
.cols code { unicode-bidi: isolate; }  /* a right-to-left token must not reorder its line */
.ctx { font-family: monospace; font-size: .9em; margin: 2px 0; white-space: pre-wrap; }
.ctx .val { display: inline-block; width: 4.5em; color: #666; }
.ctx .max { outline: 1px solid #c05000; }
svg.hist rect { fill: #e08020; } svg.hist text { font-size: 10px; fill: #555; }
.nbs li { display: inline; margin-right: 1em; }
"""
