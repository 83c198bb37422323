"""Feature dashboards: the collector against brute force, exact merges, the real pipeline on
Gemma 3 270M, the site in a real headless Chromium, and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dictlearn import lm
from dictlearn.config import ConfigError
from dictlearn.corpus import (
    CorpusConfig,
    batch_contexts,
    iter_documents,
    pack_documents,
    plan_corpus_shards,
)
from dictlearn.export import InferenceSAE, write_export
from dictlearn.inspect import SourceModel
from dictlearn.inspect.dashboard import DashboardConfig, main
from dictlearn.inspect.dashboard import collector as col
from dictlearn.inspect.dashboard.run import check_memory, context_budgets
from launch.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
HOOK = "resid_post.1"


# ---------------------------------------------------------------------------------------------
# The collector alone, fed activations directly


def _reference(latents, tokens, valid, ids, spec: col.CollectorSpec) -> dict:
    """Brute force over every context at once: sort everything, keep the first N."""
    lat = np.where(valid[..., None], latents, 0.0).astype(np.float32)
    _, t, f = lat.shape
    length = spec.window_length
    ctx_max, ctx_pos = lat.max(1), lat.argmax(1)  # [C, F]
    priority = np.asarray(col.context_priority(jnp.arange(f)[None, :], jnp.asarray(ids)[:, None]))

    def entries(order_key, n, feature):
        fired = np.flatnonzero(ctx_max[:, feature] > 0)
        order = fired[np.lexsort((ids[fired], order_key[fired]))][:n]
        out = []
        for ci in order:
            pos = int(ctx_pos[ci, feature])
            start = min(max(pos - length // 2, 0), t - length)
            out.append(
                (
                    float(ctx_max[ci, feature]),
                    int(ids[ci]),
                    pos,
                    start,
                    tokens[ci, start : start + length].tolist(),
                    lat[ci, start : start + length, feature].tolist(),
                )
            )
        return out

    edges = np.log10(spec.hist_edges.astype(np.float64))
    hist = np.zeros((f, spec.hist_bins), np.int64)
    for feature in range(f):
        a = lat[..., feature][lat[..., feature] > 0]
        b = np.floor((np.log10(a) - edges[0]) * spec.hist_bins / (edges[-1] - edges[0]))
        np.add.at(hist[feature], np.clip(b, 0, spec.hist_bins - 1).astype(int), 1)
    return {
        "top": [entries(-ctx_max[:, i], spec.top_n, i) for i in range(f)],
        "sample": [entries(priority[:, i], spec.n_samples, i) for i in range(f)],
        "hist": hist,
        "fires": (lat > 0).sum((0, 1)),
        "tokens_seen": int(valid.sum()),
    }


def _as_lists(buffer: dict, f: int) -> list:
    keys = ("value", "context", "position", "start", "tokens", "acts")
    return [
        [
            tuple(buffer[k][f, j].tolist() for k in keys)
            for j in range(buffer["context"].shape[1])
            if buffer["context"][f, j] >= 0
        ]
        for f in range(buffer["context"].shape[0])
    ]


def _random_batches(seed: int, contexts: int = 24, t: int = 16, f: int = 12):
    rng = np.random.default_rng(seed)
    # Quantised activations: many exact ties, which must go to the smaller context id.
    lat = np.maximum(np.round(rng.normal(size=(contexts, t, f)) * 4) / 4 - 0.75, 0)
    lat *= rng.random((contexts, 1, f)) < 0.7  # some features skip whole contexts
    lat[:, :, 0] = 0  # a feature that never fires
    tokens = rng.integers(0, 1000, (contexts, t)).astype(np.int32)
    valid = np.ones((contexts, t), bool)
    valid[:, 0] = False  # BOS
    valid[rng.random((contexts, t)) < 0.1] = False  # separators
    return lat.astype(np.float32), tokens, valid, np.arange(contexts, dtype=np.int32) * 3 + 5


def _stream(spec, lat, tokens, valid, ids, batch: int):
    state = col.init_state(spec)
    for lo in range(0, len(lat), batch):
        state = col.update(
            state,
            lat[lo : lo + batch],
            tokens[lo : lo + batch],
            valid[lo : lo + batch],
            ids[lo : lo + batch],
            spec=spec,
        )
    return col.to_numpy(state)


def _assert_matches(state, ref, spec):
    f = spec.n_features
    for name in ("top", "sample"):
        got = _as_lists(state[name], f)
        for feature in range(f):
            want = [tuple(e) for e in ref[name][feature]]
            assert [g[1] for g in got[feature]] == [w[1] for w in want], (name, feature)
            for g, w in zip(got[feature], want, strict=True):
                assert g[:5] == w[:5], (name, feature)
                np.testing.assert_array_equal(g[5], w[5])
    np.testing.assert_array_equal(state["hist"], ref["hist"])
    np.testing.assert_array_equal(state["fires"], ref["fires"])
    assert int(state["tokens_seen"]) == ref["tokens_seen"]


@pytest.mark.parametrize("batch", [1, 5, 24])
def test_collector_matches_brute_force(batch):
    spec = col.CollectorSpec(n_features=12, context_length=16, top_n=5, n_samples=4, window=3)
    lat, tokens, valid, ids = _random_batches(0)
    state = _stream(spec, lat, tokens, valid, ids, batch)
    _assert_matches(state, _reference(lat, tokens, valid, ids, spec), spec)
    assert not (state["top"]["context"][0] >= 0).any()  # feature 0 never fired: empty buffers
    assert state["top"]["value"][1, 0] == np.where(valid[..., None], lat, 0)[..., 1].max()


def test_merging_worker_states_is_exact():
    spec = col.CollectorSpec(n_features=12, context_length=16, top_n=6, n_samples=5, window=20)
    lat, tokens, valid, ids = _random_batches(1, contexts=30)
    parts = [slice(0, 7), slice(7, 19), slice(19, 30)]  # shards of unequal size
    states = [_stream(spec, lat[p], tokens[p], valid[p], ids[p], batch=4) for p in reversed(parts)]
    merged = col.merge_states(states)
    _assert_matches(merged, _reference(lat, tokens, valid, ids, spec), spec)
    assert spec.window_length == 16  # the window is capped at the context length


def test_a_feature_subset_keeps_each_features_buffers():
    spec = col.CollectorSpec(n_features=12, context_length=16, top_n=4, n_samples=4, window=2)
    lat, tokens, valid, ids = _random_batches(2)
    full = _stream(spec, lat, tokens, valid, ids, batch=6)
    chosen = np.array([3, 7], np.int32)
    sub_spec = col.CollectorSpec(n_features=2, context_length=16, top_n=4, n_samples=4, window=2)
    state = col.init_state(sub_spec)
    for lo in range(0, len(lat), 6):
        part = slice(lo, lo + 6)
        state = col.update(
            state, lat[part][..., chosen], tokens[part], valid[part], ids[part], chosen,
            spec=sub_spec,
        )  # fmt: skip
    state = col.to_numpy(state)
    for name in ("top", "sample"):
        for field, value in state[name].items():
            np.testing.assert_array_equal(value, full[name][field][chosen], err_msg=name + field)


def test_topk_sparse_histogram_equals_the_dense_one():
    """A TopK SAE's (values, indices) give the same histogram and counts as its dense latents,
    also when only some features are collected."""
    rng = np.random.default_rng(3)
    b, t, f, k = 6, 16, 20, 4
    pre = rng.normal(size=(b, t, f)).astype(np.float32) * 3
    indices = np.argsort(-pre, axis=-1)[..., :k]
    values = np.maximum(np.take_along_axis(pre, indices, -1), 0)  # some of the k are zero
    dense = np.zeros_like(pre)
    np.put_along_axis(dense, indices, values, -1)
    tokens = rng.integers(0, 100, (b, t)).astype(np.int32)
    valid = rng.random((b, t)) > 0.2
    ids = np.arange(b, dtype=np.int32)
    for chosen in (np.arange(f), np.array([2, 5, 11, 19])):
        spec = col.CollectorSpec(n_features=len(chosen), context_length=t, top_n=3, n_samples=3)
        column_of = np.full(f, -1, np.int32)
        column_of[chosen] = np.arange(len(chosen))
        lat = dense[..., chosen]
        want = col.to_numpy(col.update(col.init_state(spec), lat, tokens, valid, ids, spec=spec))
        got = col.update(
            col.init_state(spec), lat, tokens, valid, ids, None, (values, column_of[indices]),
            spec=spec,
        )  # fmt: skip
        got = col.to_numpy(got)
        np.testing.assert_array_equal(got["hist"], want["hist"])
        np.testing.assert_array_equal(got["fires"], want["fires"])
        assert want["fires"].sum() == ((lat > 0) & valid[..., None]).sum() > 0


def test_buffers_past_the_memory_cap_are_refused():
    spec = col.CollectorSpec(n_features=1 << 20, context_length=128)
    with pytest.raises(ConfigError, match=r"GiB per worker .*\(first=N"):
        check_memory(spec)
    check_memory(col.CollectorSpec(n_features=16384, context_length=128))


# ---------------------------------------------------------------------------------------------
# End to end on Gemma 3 270M


def _sae(d_in: int = 640, d_sae: int = 96, b_dec=None, **metadata) -> InferenceSAE:
    rng = np.random.default_rng(0)
    w_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    return InferenceSAE(
        architecture="topk",
        W_enc=w_dec.T.copy(),
        b_enc=np.zeros(d_sae, np.float32),
        W_dec=w_dec,
        b_dec=np.zeros(d_in, np.float32) if b_dec is None else b_dec,
        k=8,
        metadata={"model_name": "gemma3-270m", "hook_name": HOOK} | metadata,
    )


CORPUS = {"paths": ["builtin:python-docs"], "n_shards": 2}
TOKENS, CONTEXT = 2048, 64


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A random SAE centred on the hook's mean activation (so features fire on varied tokens),
    its dashboards over 2k tokens of the built-in corpus, and the LM to check them against."""
    tmp = tmp_path_factory.mktemp("dashboard")
    source = SourceModel.for_sae(_sae())
    sample = source.activations(source.tokenizer.encode("def f(x):\n    return x + 1  # add"))
    sae = _sae(b_dec=sample[1:].mean(0))
    write_export(sae, str(tmp / "sae"), "native")
    config = DashboardConfig(
        sae=str(tmp / "sae"),
        out=str(tmp / "site"),
        tokens=TOKENS,
        context_length=CONTEXT,
        batch_size=4,
        top_n=8,
        n_samples=8,
        corpus=CORPUS,
    )
    result = main(config)
    return tmp, sae, source, config, result


def _reference_contexts(config: DashboardConfig, tokenizer) -> np.ndarray:
    shards = plan_corpus_shards(CorpusConfig(**CORPUS))
    budgets = context_budgets(config.tokens, config.context_length, len(shards))
    out = []
    for shard, budget in zip(shards, budgets, strict=True):
        packed = list(pack_documents(iter_documents(shard), tokenizer, config.context_length))
        out += packed[:budget]
    return np.stack(out)


def test_dashboard_pass_matches_the_lm_and_sae(built):
    tmp, sae, source, config, result = built
    assert result.features == sae.d_sae and result.lm_tokens == TOKENS and result.workers == 0
    contexts = _reference_contexts(config, source.tokenizer)
    acts = np.concatenate(
        [
            np.asarray(lm.forward(source.params, source.config, b, hooks=(HOOK,))[HOOK])
            for b in batch_contexts(contexts, 8)
        ]
    )
    latents = np.asarray(sae.encode(acts))
    valid = contexts != source.config.bos_id
    assert result.tokens == valid.sum()
    lat = np.where(valid[..., None], latents, 0)
    ctx_max = lat.max(1)
    fired = 0
    for f in range(sae.d_sae):
        page = json.loads((tmp / "site" / "neuronpedia" / f"{f}.json").read_text())
        order = np.argsort(-ctx_max[:, f], kind="stable")
        if ctx_max[order[0], f] == 0:
            assert page["activations"] == [] and page["maxActApprox"] == 0
            continue
        fired += 1
        np.testing.assert_allclose(page["maxActApprox"], ctx_max[order[0], f], rtol=1e-4)
        np.testing.assert_allclose(page["frac_nonzero"], (lat[..., f] > 0).sum() / valid.sum())
        top = page["activations"][0]
        if ctx_max[order[0], f] - ctx_max[order[1], f] > 1e-3 * ctx_max[order[0], f]:
            ci = order[0]
            pos = int(lat[ci, :, f].argmax())
            assert top["tokens"][top["maxValueTokenIndex"]] == source.tokenizer.decode(
                [int(contexts[ci, pos])], skip_special_tokens=False
            )
        assert top["maxValue"] == max(top["values"])
        assert len(top["tokens"]) == len(top["values"]) == 2 * config.window + 1
    assert fired >= sae.d_sae // 2

    # Logit attribution: the decoder row through the final norm weight and the unembedding.
    page = json.loads((tmp / "site" / "neuronpedia" / "3.json").read_text())
    logits = (sae.W_dec[3] * np.asarray(source.params["final_norm"])) @ np.asarray(
        source.params["embed"]
    ).T
    best = np.argsort(-logits)[:10]
    assert page["pos_str"] == [
        source.tokenizer.decode([int(i)], skip_special_tokens=False) for i in best
    ]
    np.testing.assert_allclose(page["pos_values"], logits[best], rtol=1e-4)
    np.testing.assert_allclose(page["neg_values"], np.sort(logits)[:10], rtol=1e-4)
    # Neighbours: exact decoder cosines.
    cos = sae.W_dec @ sae.W_dec[3]
    cos[3] = -np.inf
    assert page["topkCosSimIndices"] == np.argsort(-cos)[:5].tolist()
    assert len(page["freq_hist_data_bar_heights"]) == len(page["freq_hist_data_bar_values"])


def test_site_files_and_escaping(built):
    tmp, sae, _, _, _ = built
    site = tmp / "site"
    index = (site / "index.html").read_text()
    assert 'src="features.js"' in index and "http" not in index  # offline: no CDN
    data = json.loads((site / "features.js").read_text().split("=", 1)[1].rstrip().rstrip(";"))
    assert [r[0] for r in data["features"]] == list(range(sae.d_sae))
    for f in range(sae.d_sae):
        page = (site / "features" / f"{f}.html").read_text()
        for href in re.findall(r'href="(\d+)\.html"', page):
            assert (site / "features" / f"{href}.html").is_file()
        # No raw corpus text escapes into markup: every '<' starts one of our tags.
        for tag in re.findall(r"<(/?[a-zA-Z!][a-zA-Z0-9]*)", page):
            assert tag.lstrip("/").lower() in {
                "!doctype", "html", "head", "meta", "title", "link", "body", "p", "a", "h1",
                "h2", "h3", "div", "span", "svg", "rect", "text", "ol", "ul", "li", "code",
            }  # fmt: skip


def test_dashboard_reads_neighbours_from_an_index(built, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, sae, _, config, _ = built
    index = tmp_path / "index"
    index.mkdir()
    (index / "index.json").write_text("{}")
    for part, features in enumerate(([0, 1], [2])):
        rows = [(f, r, (f + r + 1) % sae.d_sae, 0.5 - 0.1 * r) for f in features for r in range(3)]
        columns = zip(*rows, strict=True)
        table = pa.table(dict(zip(("feature", "rank", "neighbor", "cosine"), columns, strict=True)))
        pq.write_table(table, index / f"part-{part}.parquet")
    out = tmp_path / "site"
    config = config.model_copy(
        update={"out": str(out), "index": str(index), "features": [0, 2], "tokens": 256}
    )
    result = main(config)
    assert result.features == 2
    assert sorted(p.name for p in (out / "features").iterdir()) == ["0.html", "2.html"]
    page = json.loads((out / "neuronpedia" / "2.json").read_text())
    assert page["topkCosSimIndices"] == [3, 4, 5]
    np.testing.assert_allclose(page["topkCosSimValues"], [0.5, 0.4, 0.3], rtol=1e-6)
    html = (out / "features" / "0.html").read_text()
    assert 'href="1.html"' not in html and 'href="2.html"' in html  # 1 has no page: no link


@pytest.mark.slow
def test_ray_workers_give_the_same_dashboards(built, tmp_path):
    """Two Ray actors (``generate``'s LM workers) over the shards, buffers merged here: the
    same pages, byte for byte, as the in-process pass."""
    _, _, _, config, _ = built
    out = tmp_path / "site"
    ray_config = config.model_copy(
        update={"out": str(out), "ray": config.ray.model_copy(update={"num_workers": 2})}
    )
    result = main(ray_config)
    assert result.workers == 2
    assert result.lm_tokens == TOKENS
    for name in ("neuronpedia/0.json", "neuronpedia/7.json", "features/7.html", "features.js"):
        assert (out / name).read_text() == (Path(config.out) / name).read_text(), name


# ---------------------------------------------------------------------------------------------
# The site in a real browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_site_in_headless_chromium(built, tmp_path):
    if _chromium() is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    from tests.inspect.cdp import Browser

    site = built[0] / "site"
    data = json.loads((site / "features.js").read_text().split("=", 1)[1].rstrip().rstrip(";"))
    rows = data["features"]
    # A query that keeps some rows but not all: a token shown in the promoted-token column.
    word = next(
        w.strip("'")
        for r in rows
        for w in r[4].split("' '")
        if w.strip("'").strip()
        and 0 < sum(w.strip("'").lower() in (x[3] + x[4]).lower() for x in rows) < len(rows)
    )
    expected = sum(word.lower() in (x[3] + x[4]).lower() or str(x[0]) == word for x in rows)

    with Browser(_chromium(), tmp_path / "profile") as browser:
        browser.open((site / "index.html").as_uri())
        assert browser.eval("document.querySelectorAll('#features tbody tr').length") == len(rows)
        assert browser.eval("document.getElementById('count').textContent").startswith(
            f"{len(rows)} of {len(rows)}"
        )
        # Sorting: a click on "max act" puts the largest first.
        browser.eval("document.querySelectorAll('#features th')[2].click()")
        first = browser.eval("document.querySelector('#features tbody tr td a').textContent")
        assert int(first) == max(rows, key=lambda r: (r[2], -r[0]))[0]
        browser.screenshot(tmp_path / "dashboard.png")
        browser.type_into("#search", word)
        assert browser.eval("document.querySelectorAll('#features tbody tr').length") == expected
        browser.screenshot(tmp_path / "search.png")
        feature = browser.eval("document.querySelector('#features tbody tr td a').textContent")
        browser.click_and_wait("#features tbody tr td a")
        assert browser.eval("location.href").endswith(f"/features/{feature}.html")
        assert browser.eval("document.querySelector('h1').textContent") == f"Feature {feature}"
        assert browser.eval("document.querySelectorAll('#top .ctx').length") > 0
        assert browser.eval("document.querySelectorAll('svg.hist rect').length") > 0
        browser.screenshot(tmp_path / "feature.png")
        neighbour = browser.eval("document.querySelector('a.nb').getAttribute('href')")
        browser.click_and_wait("a.nb")
        assert browser.eval("location.href").endswith(f"/features/{neighbour}")
        browser.click_and_wait("#back")
        assert browser.eval("location.href").endswith("/index.html")
        assert browser.errors == []
    for name in ("dashboard.png", "search.png", "feature.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # DICTLEARN_UPDATE_SCREENSHOTS=1 refreshes the README's images (not on every run).
        if name != "search.png" and os.environ.get("DICTLEARN_UPDATE_SCREENSHOTS"):
            (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / name, REPO / "docs" / "img" / name)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


@pytest.mark.parametrize(
    ("sae", "args", "message"),
    [
        (_sae(), ["--features", "3,96"], r"features: 96 is out of range .* d_sae 96"),
        (_sae(), ["features=[1,200]"], r"features: 200 is out of range"),  # after the options
        (_sae(d_in=32), [], r"reads d_in 32, but gemma3-270m's resid_post\.1 has width 640"),
        (_sae(hook_name="resid_post.40"), [], r"layer"),
        (_sae(hook_name="attn_in.3"), [], r"hook"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, sae, args, message):
    write_export(sae, str(tmp_path / "sae"), "native")
    code = cli_main(["dashboard", str(tmp_path / "sae"), "--out", str(tmp_path / "o"), *args])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert line.startswith("dictlearn dashboard: error: ")
    assert re.search(message, line), line
    assert not (tmp_path / "o").exists()
