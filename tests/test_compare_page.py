"""The compare page answers "which run is better": the headline summary (best run per metric in the stated
direction, significance from intervals or plainly not assessed), the sparsity-fidelity frontier, and the metric
tables grouped by metric group with their definitions on hover. Tiny random runs on a synthetic cache, eval.json
files written by hand; fast, CPU."""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dashboards.compare import (
    BEST,
    NO_INTERVAL,
    NOT_SIGNIFICANT,
    CompareConfig,
    compare_runs,
    headline_rows,
)
from evals.registry import GROUPS
from tests.test_dashboards import HOSTILE_RUN_NAME, random_sae, save_run, synthetic


def metrics(ev=None, ce=None, l0=None, dead=None, scr=None, tpp=None, rho=None, intervals=None) -> dict:
    """An eval.json `metrics` block with the given headline numbers (None leaves a number out); `intervals` maps a
    group to its `intervals` dict."""
    intervals = intervals or {}
    core = {k: v for k, v in (("explained_variance", ev), ("ce_score", ce), ("l0", l0)) if v is not None}
    out = {"core": core, "density": {"dead_fraction": dead} if dead is not None else {}}
    if scr is not None:
        out["scr"] = {"metrics": {f"scr_metric_threshold_{n}": v for n, v in scr.items()}, "n_values": list(scr)}
    if tpp is not None:
        out["tpp"] = {"metrics": {f"tpp_threshold_{n}_total_metric": v for n, v in tpp.items()},
                      "n_values": list(tpp)}
    if rho is not None:
        out["independence"] = {"mean_abs_rho_excess": rho}
    for group, ivals in intervals.items():
        out.setdefault(group, {})["intervals"] = ivals
    return out


def row(rows, label, n=20):
    return next(r for r in rows if r.headline.title(n) == label)


# ---- the ranking, on eval.json blocks -----------------------------------------------------------------------------


def test_best_run_follows_the_direction_of_better():
    runs = [metrics(ev=0.80, ce=0.95, l0=32.0, dead=0.05, rho=0.02, scr={5: 0.4, 20: 0.1}),
            metrics(ev=0.90, ce=0.90, l0=64.0, dead=0.30, rho=0.05, scr={5: 0.1, 20: 0.3}),
            metrics(ev=0.70, ce=0.99, l0=16.0, dead=0.10, rho=0.01, scr={5: 0.2, 20: 0.2})]
    rows = headline_rows(runs, 20)
    assert [r.headline.title(20) for r in rows] == [
        "explained variance", "CE score", "L0", "dead fraction", "SCR at N=20",
        "independence: mean |rho| above the permutation null"]
    assert row(rows, "explained variance").best == [1]  # higher is better
    assert row(rows, "CE score").best == [2]
    assert row(rows, "dead fraction").best == [0]  # lower is better: the lowest, not the highest
    assert row(rows, "independence: mean |rho| above the permutation null").best == [2]
    assert row(rows, "SCR at N=20").best == [1]  # the score at the chosen N ...
    assert row(headline_rows(runs, 5), "SCR at N=5", n=5).best == [0]  # ... not at another
    l0 = row(rows, "L0")
    assert l0.best == [] and l0.marks == ["", "", ""] and "set by k" in l0.note  # no direction, said so
    assert row(rows, "explained variance").marks == [NO_INTERVAL, BEST, NO_INTERVAL]


def test_ties_missing_values_and_absent_headlines():
    runs = [metrics(ev=0.9, dead=0.1), metrics(ev=0.9), metrics(ev=float("nan"), dead=0.2), {}]
    rows = headline_rows(runs, 20)
    ev = row(rows, "explained variance")
    assert ev.best == [0, 1] and ev.values[2] is None and ev.marks == [BEST, BEST, "", ""]
    assert ev.note == "equal in every run that has it"
    dead = row(rows, "dead fraction")
    assert dead.best == [0] and dead.values == [0.1, None, 0.2, None]
    assert {r.headline.key for r in rows} == {"explained_variance", "dead_fraction"}  # no run has the others


def test_overlapping_intervals_are_not_significant_and_disjoint_ones_are():
    ivals = [{"core": {"explained_variance": [0.85, 0.95], "ce_score": [0.90, 0.99]}},
             {"core": {"explained_variance": [0.80, 0.88], "ce_score": [0.70, 0.80]}},
             {"core": {"explained_variance": [0.60, 0.70]}}]
    runs = [metrics(ev=0.90, ce=0.95, intervals=ivals[0]), metrics(ev=0.84, ce=0.75, intervals=ivals[1]),
            metrics(ev=0.65, ce=0.85, intervals=ivals[2])]
    rows = headline_rows(runs, 20)
    ev = row(rows, "explained variance")
    assert ev.best == [0] and ev.intervals[1] == (0.80, 0.88)
    assert ev.marks == [BEST, NOT_SIGNIFICANT, ""]  # [.80, .88] overlaps [.85, .95]; [.60, .70] does not
    assert NOT_SIGNIFICANT in ev.note and "not assessed" not in ev.note
    ce = row(rows, "CE score")
    assert ce.marks == [BEST, "", NO_INTERVAL]  # disjoint: a real difference; run 3 has no CE interval
    assert "significance not assessed" in ce.note


def test_no_intervals_means_significance_not_assessed():
    rows = headline_rows([metrics(ev=0.9, dead=0.1), metrics(ev=0.8, dead=0.2)], 20)
    for r in rows:
        assert r.note == NO_INTERVAL and r.marks[1] == NO_INTERVAL and NOT_SIGNIFICANT not in r.marks
    # the best run's interval alone does not make a difference significant
    one = headline_rows([metrics(ev=0.9, intervals={"core": {"explained_variance": [0.8, 1.0]}}),
                         metrics(ev=0.5)], 20)
    assert row(one, "explained variance").marks == [BEST, NO_INTERVAL]
    # nor does another run's interval when the best run has none
    other = headline_rows([metrics(ev=0.9), metrics(ev=0.5, intervals={"core": {"explained_variance": [0.4, 1.0]}})],
                          20)
    assert row(other, "explained variance").marks == [BEST, NO_INTERVAL]


def test_every_headline_reads_from_its_groups_result():
    """Each registry headline has a direction or says why not, and reads the number its group writes."""
    for group in GROUPS:
        for h in group.headlines:
            assert h.better in ("higher", "lower") or h.why, h
            result = {h.section: {h.name(20): 0.5}} if h.section else {h.name(20): 0.5}
            result["intervals"] = {h.name(20): [0.4, 0.6]}
            assert h.read(result, 20) == (0.5, (0.4, 0.6))
            assert h.read({"intervals": {h.name(20): [0.6, 0.4]}}, 20) == (None, None)  # lo > hi: no interval


# ---- the page --------------------------------------------------------------------------------------------------


class Cells(HTMLParser):
    """Every table cell (tag, attributes, text) and every <details> (open?, summary text) of a page, in order."""

    def __init__(self):
        super().__init__()
        self.cells, self.details, self.tables = [], [], []
        self._cell = self._summary = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"cls": attrs.get("class", ""), "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = {"tag": tag, "attrs": attrs, "text": ""}
        elif tag == "details":
            self.details.append({"open": "open" in attrs, "summary": ""})
        elif tag == "summary":
            self._summary = self.details[-1]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(self._cell)
            self.tables[-1]["rows"][-1].append(self._cell)
            self._cell = None
        elif tag == "summary":
            self._summary = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._summary is not None:
            self._summary["summary"] += data


def parse(text: str) -> Cells:
    p = Cells()
    p.feed(text)
    return p


def write_eval(run: Path, block: dict, cache_hash: str = "h1") -> None:
    (run / "eval.json").write_text(json.dumps({"cache_hash": cache_hash, "metrics": block}))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A compare page of three runs (one named with markup) on a synthetic cache, eval.json written by hand: run 0
    best on EV with an interval overlapping run 1's, run 2 best on dead fraction, no intervals elsewhere."""
    tmp = tmp_path_factory.mktemp("cmp")
    cache = synthetic(tmp / "cache")
    names = ["alpha", HOSTILE_RUN_NAME, "gamma"]
    blocks = [metrics(ev=0.90, ce=0.95, l0=4.0, dead=0.25, scr={20: 0.1}, tpp={20: 0.3},
                      intervals={"core": {"explained_variance": [0.85, 0.95]}}),
              metrics(ev=0.86, ce=0.97, l0=3.5, dead=0.20, scr={20: 0.2}, tpp={20: 0.1},
                      intervals={"core": {"explained_variance": [0.82, 0.88]}}),
              metrics(ev=0.50, l0=2.0, dead=0.05, scr={20: 0.05}, tpp={20: 0.2},
                      intervals={"core": {"explained_variance": [0.45, 0.55]}})]
    blocks[0]["core"]["note"] = "<b>a string row</b>"  # strings stay off the metric table
    runs = []
    for i, (name, block) in enumerate(zip(names, blocks, strict=True)):
        run = save_run(tmp / "runs" / name, random_sae(8, 16, 2 + i, seed=i), "synthetic", model="test")
        (run / "train.json").write_text(json.dumps({"sae": {"variant": "topk" if i else "vsae", "k": 2 + i},
                                                    "train": {"lr": 1e-3}}))
        write_eval(run, block, cache_hash="h1" if i < 2 else "h2")
        runs.append(run)
    out = tmp / "compare.html"
    compare_runs(runs, CompareConfig(cache=str(cache), out=str(out), tokens=200, matches=5, progress=False))
    text = out.read_text()
    return {"text": text, "html": parse(text), "names": names}


def summary_rows(html: Cells) -> dict[str, list[dict]]:
    table = next(t for t in html.tables if "summary" in t["cls"])
    return {r[0]["text"]: r for r in table["rows"][1:]}


def test_summary_marks_the_best_run_with_direction_and_significance(page):
    rows = summary_rows(page["html"])
    assert list(rows) == ["explained variance", "CE score", "L0", "dead fraction", "TPP at N=20", "SCR at N=20"]
    ev = rows["explained variance"]
    assert ev[1]["text"] == "higher is better" and ev[2]["text"].startswith("alpha")
    assert "best" in ev[4]["attrs"]["class"] and "\u2605 best" in ev[4]["text"]
    assert NOT_SIGNIFICANT in ev[5]["text"] and "[0.82, 0.88]" in ev[5]["text"]  # overlaps alpha's interval
    assert NOT_SIGNIFICANT not in ev[6]["text"] and "disjoint" in ev[6]["attrs"]["title"]
    dead = rows["dead fraction"]
    assert dead[1]["text"] == "lower is better" and dead[2]["text"].startswith("gamma")
    assert "best" in dead[6]["attrs"]["class"] and dead[3]["text"] == NO_INTERVAL
    assert dead[4]["attrs"]["title"] == NO_INTERVAL and NOT_SIGNIFICANT not in dead[4]["text"]  # said once: note
    assert rows["CE score"][6]["text"] == "n/a" and rows["CE score"][2]["text"].startswith(HOSTILE_RUN_NAME)
    l0 = rows["L0"]
    assert l0[1]["text"] == "no better direction" and "set by k" in l0[3]["text"]
    assert not any("best" in c["attrs"].get("class", "") for c in l0[4:])
    assert ev[0]["attrs"]["title"].startswith("global: 1 - sum")  # the definition on hover
    assert rows["SCR at N=20"][2]["text"].startswith(HOSTILE_RUN_NAME)
    # what is missing, said
    assert "independence" in page["text"] and re.search(r"--metrics [a-z_,]*independence", page["text"])


def test_summary_flags_runs_on_different_caches(page):
    text = page["text"]
    assert "evaluated on different caches" in text and "cache 2 (hash h2): gamma" in text
    head = next(t for t in page["html"].tables if "summary" in t["cls"])["rows"][0]
    assert head[6]["text"] == "gamma (cache 2)"


def test_summary_comes_first(page):
    text = page["text"]
    order = [text.index(s) for s in ("Summary: which run is better", "Sparsity-fidelity frontier",
                                     "Configuration differences", "<h2>Metrics</h2>", "Latents matched across runs")]
    assert order == sorted(order)


def figures(text: str) -> dict[str, dict]:
    return {f[0]: f[1] for f in json.loads(re.search(r"VSAE\.figures\((.*)\);</script>", text).group(1))}


def test_frontier_has_one_point_per_run_named_in_its_hover(page):
    figs = figures(page["text"])
    frontier = [figs[k] for k in figs if k.startswith("fig-frontier")]
    assert [f["layout"]["title"]["text"] for f in frontier] == [
        "L0 against explained variance", "L0 against CE score", "dead fraction against k"]
    ev, ce, dead = ([p for t in f["data"] for p in zip(t["x"], t["y"], t["text"], strict=True)] for f in frontier)
    assert sorted(p[:2] for p in ev) == [(2.0, 0.5), (3.5, 0.86), (4.0, 0.9)]
    assert sorted(p[:2] for p in dead) == [(2, 0.25), (3, 0.2), (4, 0.05)]  # k from the weights
    assert len(ce) == 2 and "L0 against CE score: gamma" in page["text"]  # a run without a CE score, said so
    escaped = "run&lt;&amp;\"'&gt;"  # plotly reads tags and entities in hover text: escaped for it
    hovers = sorted(p[2] for p in ev)
    assert [h.split("<br>")[0] for h in hovers] == ["<b>alpha</b>", "<b>gamma</b>", f"<b>{escaped}</b>"]
    assert all("sae.variant = " in h and "sae.k = " in h for h in hovers)  # the switches between runs
    assert all("train.lr" not in h for h in hovers)  # the same in every run: not a switch
    assert {t["name"] for t in frontier[0]["data"]} == {"topk", "vsae"}  # one colour per variant
    for fig_id in figs:
        assert f'id="{fig_id}" data-lazy' in page["text"]  # drawn when it scrolls into view


def test_metric_groups_are_collapsible_with_definitions(page):
    html = page["html"]
    summaries = [d["summary"].split(" (")[0] for d in html.details if d["open"]]
    groups = [g.name for g in GROUPS if g.compare_rows]
    shown = [s for s in summaries if s in groups]
    assert shown == [g for g in groups if g in ("core", "density", "tpp", "scr")]  # registry order, open
    ev = next(c for c in html.cells if c["text"] == "core.explained_variance")
    core = next(g for g in GROUPS if g.name == "core")
    assert ev["attrs"]["title"] == core.definitions["explained_variance"]
    scr = next(c for c in html.cells if c["text"] == "scr.scr_metric_threshold_20")
    assert scr["attrs"]["title"].startswith("SAEBench spurious correlation removal")
    assert "core.note" not in page["text"] and "a string row" not in page["text"]


def test_definitions_and_names_are_escaped(page, tmp_path, monkeypatch):
    text = page["text"]
    assert HOSTILE_RUN_NAME not in text and "run&lt;&amp;&quot;&#x27;&gt;" in text
    assert "<b>a string row" not in text
    # a definition holding markup is escaped in its title attribute
    import evals.registry as registry

    core = next(g for g in registry.GROUPS if g.name == "core")
    monkeypatch.setitem(core.definitions, "l0", 'L0 <script>"x"</script>')
    cache = synthetic(tmp_path / "cache")
    runs = []
    for i in range(2):
        run = save_run(tmp_path / f"r{i}", random_sae(8, 16, 2, seed=i), "synthetic", model="test")
        write_eval(run, metrics(l0=2.0 + i, ev=0.5))
        runs.append(run)
    out = tmp_path / "c.html"
    compare_runs(runs, CompareConfig(cache=str(cache), out=str(out), tokens=100, progress=False))
    body = out.read_text()
    assert 'title="L0 &lt;script&gt;&quot;x&quot;&lt;/script&gt;"' in body and '<script>"x"' not in body


def test_n_must_be_a_measured_n(tmp_path):
    with pytest.raises(ValueError, match="--n 7: SCR and TPP are measured at N in 2, 5"):
        compare_runs(["a", "b"], CompareConfig(cache="c", out=str(tmp_path / "x.html"), n=7))


def test_a_score_not_separated_from_its_random_sae_null_says_so():
    null_ok = {"difference": 0.2, "interval": [0.1, 0.3], "includes_zero": False}
    null_zero = {"difference": 0.01, "interval": [-0.05, 0.07], "includes_zero": True}
    runs = [metrics(scr={20: 0.5}), metrics(scr={20: 0.3})]
    runs[0]["scr"]["null"] = {"scr_metric_threshold_20": null_ok}
    runs[1]["scr"]["null"] = {"scr_metric_threshold_20": null_zero}
    r = row(headline_rows(runs, 20), "SCR at N=20")
    assert r.nulls == [null_ok, null_zero]
    assert r.note.startswith("not separated from a random SAE for 1 of 2 runs")
    from dashboards.compare import _null_text

    assert "not separated" in _null_text(null_zero) and "not separated" not in _null_text(null_ok)
    assert "+0.2 [0.1, 0.3]" in _null_text(null_ok)
