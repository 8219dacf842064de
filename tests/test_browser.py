"""The dashboard and compare pages in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright,
pages opened from file://.

Checked: no console errors or uncaught exceptions, no request leaves the machine, no dialog opens (the corpus holds
`<script>alert(1)</script>`), every plot renders, the index's search filters and its headers sort, clicking a latent
opens its page, links between latents work, model text shows as text. Screenshots go to `test-artifacts/` (or
$VSAE_TEST_ARTIFACTS).

Needs: `playwright` (the `test` extra; its bundled browsers are not used) and Debian's chromium. The test installs
chromium with apt-get where it is missing and it can (root, apt-get present); otherwise it skips and says why.
"""

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dashboards.build import DashboardConfig, build_dashboard
from dashboards.compare import CompareConfig, compare_runs
from tests.test_dashboards import HOSTILE_RUN_NAME, fake_eval, hostile_cache, load_data, random_sae, save_run
from tests.test_harvest import HOOK

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("VSAE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
LOCAL = ("file:", "data:", "blob:", "about:")


def chromium_binary() -> str:
    """Debian's chromium, installed with apt-get when missing (where possible), else skip with the reason."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if not shutil.which("apt-get"):
        pytest.skip("no chromium and no apt-get to install it (Debian: apt-get install -y chromium)")
    if os.geteuid() != 0:
        pytest.skip("no chromium, and installing it needs root (run: apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium"]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if cmd[1] == "install" and result.returncode == 0 and shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip(f"chromium is missing and `apt-get install -y chromium` failed: {result.stderr.strip()[-300:]}")


@contextmanager
def offline_chromium(profile: Path, allowed: tuple[str, ...]) -> Iterator:
    """A headless Chromium context (fresh --user-data-dir `profile`) whose requests to anything but the URL
    prefixes `allowed` are aborted and logged in `context.log` (with failed requests, errors and dialogs)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra: "
                                   "pip install -e '.[test]' -c constraints.txt")
    executable = chromium_binary()
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=executable, headless=True,
                                                       args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 900})
        log = {"errors": [], "external": [], "failed": [], "dialogs": []}
        context.route(re.compile("^(?!" + "|".join(map(re.escape, allowed)) + ")"), lambda route: route.abort())
        context.on("request", lambda r: None if r.url.startswith(allowed) else log["external"].append(r.url))
        context.on("requestfailed", lambda r: log["failed"].append(r.url))
        context.log = log
        yield context
        context.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with offline_chromium(tmp_path_factory.mktemp("chromium-profile"), LOCAL) as context:
        yield context


def new_page(context):
    page = context.new_page()
    log = context.log
    page.on("console", lambda m: log["errors"].append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: log["errors"].append(f"uncaught: {e}"))
    page.on("dialog", lambda d: (log["dialogs"].append(d.message), d.dismiss()))
    return page


def assert_clean(context):
    log = context.log
    assert log == {"errors": [], "external": [], "failed": [], "dialogs": []}


def wait_latent(page, latent) -> None:
    page.wait_for_function(f"(document.querySelector('h1') || {{}}).textContent === 'Latent {latent}'")


def plots_rendered(page) -> list[bool]:
    return page.eval_on_selector_all(".plot", "els => els.map(e => !!e.querySelector('.main-svg'))")


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_checkpoint):
    """A dashboard (random SAE, latent 3 dead, eval.json with a t-SNE map) and a compare page of two runs."""
    tmp = tmp_path_factory.mktemp("site")
    cache = hostile_cache(tmp, tiny_checkpoint)
    runs = []
    for i, d_sae in enumerate((24, 32)):
        run = save_run(tmp / "runs" / f"{HOSTILE_RUN_NAME}{i}", random_sae(32, d_sae, 4, seed=i, dead=(3,)), HOOK,
                       model=tiny_checkpoint.name)
        fake_eval(run, d_sae)
        log = [{"step": s, "tokens": 128 * s, "loss": 1 / s, "mse": 1 / s, "l0": 4, "dead_fraction": 0.1 / s}
               for s in range(1, 6)]
        (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
        runs.append(run)
    dash = tmp / "dash"
    build_dashboard(runs[0], DashboardConfig(cache=str(cache), out=str(dash), contexts=5, progress=False))
    compare = tmp / "compare" / "compare.html"
    compare_runs(runs, CompareConfig(cache=str(cache), out=str(compare), dashboards=[str(dash)], tokens=600,
                                     progress=False))
    return {"dash": dash, "compare": compare}


def test_dashboard_in_chromium(browser, site):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    dash = site["dash"]
    page = new_page(browser)
    page.goto((dash / "index.html").as_uri())
    page.wait_for_function("document.getElementById('count').textContent.includes('of 24 latents')")
    page.wait_for_function("[...document.querySelectorAll('.plot')].every(e => e.querySelector('.main-svg'))")
    assert len(plots_rendered(page)) == 3  # scanned density, eval density, t-SNE
    assert "run<&\"'>0" in page.inner_text("h1")  # the run name shown as text
    page.screenshot(path=str(ARTIFACTS / "dashboard-index.png"))

    rows = page.locator("#latents tbody tr")
    assert rows.count() == 24
    page.fill("#search", "17")
    page.wait_for_function("document.getElementById('count').textContent.startsWith('1 of')")
    assert page.locator("#latents tbody tr").first.inner_text().startswith("17")
    page.fill("#search", "no such token anywhere")
    page.wait_for_function("document.getElementById('count').textContent.startsWith('0 of')")
    page.select_option("#dead-filter", "dead")
    page.fill("#search", "")
    page.wait_for_function("document.getElementById('count').textContent.startsWith('1 of')")
    assert page.locator("#latents tbody tr").first.inner_text().split()[:2] == ["3", "dead"]
    page.select_option("#dead-filter", "all")

    index = load_data(dash / "data" / "index.js")
    densest = max(index["rows"], key=lambda r: r[1])[0]
    page.click("#latents th:has-text('density')")  # numbers sort descending first
    assert page.locator("#latents tbody tr").first.inner_text().split()[0] == str(densest)

    page.click(f"#latents a[href='latent.html#{densest}']")
    page.wait_for_url(re.compile(rf"latent\.html#{densest}$"))
    wait_latent(page, densest)
    page.wait_for_function("document.querySelector('#hist .main-svg') && document.querySelector('#tsne .main-svg')"
                           if densest % 2 == 0 else "document.querySelector('#hist .main-svg')")
    assert page.locator(".ctx").count() >= 5 and page.locator(".tok.mark").count() >= 5
    title = page.locator(".tok.mark").first.get_attribute("title")
    assert title.startswith("activation ")
    page.screenshot(path=str(ARTIFACTS / "dashboard-latent.png"), full_page=True)

    # model text renders as text: find a latent whose contexts hold the script tag, open it
    hostile = next(i for i in range(24) if any("<script>alert(1)</script>" in "".join(c["t"])
                                               for c in load_data(dash / "data" / "latents" / f"{i}.js")["top"]))
    page.evaluate(f"window.location.hash = '#{hostile}'")
    wait_latent(page, hostile)
    assert "<script>alert(1)</script>" in page.inner_text("#latent")
    assert page.locator("#latent .toks *:not(span.tok)").count() == 0  # no element came from model text

    neighbour = page.locator("table a[href^='#']").first
    target = neighbour.get_attribute("href")[1:]
    neighbour.click()
    wait_latent(page, target)
    page.evaluate("window.location.hash = '#3'")
    page.wait_for_selector(".dead-banner")
    assert "never fired" in page.inner_text(".dead-banner")
    page.close()
    assert_clean(browser)


def render_every_plot(page) -> None:
    """Open every <details> and bring each plot into view in turn: the compare page draws a figure only when it
    nears the viewport."""
    page.evaluate("document.querySelectorAll('details').forEach(d => { d.open = true; })")
    for i in range(page.locator(".plot").count()):
        page.locator(".plot").nth(i).scroll_into_view_if_needed()
        page.wait_for_function(f"document.querySelectorAll('.plot')[{i}].querySelector('.main-svg')")


def test_compare_in_chromium(browser, site):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = new_page(browser)
    page.goto(site["compare"].as_uri())
    # the answer first: the summary table, then the frontier plots, drawn at once as they are in view
    page.wait_for_function("document.querySelectorAll('.plot')[0].querySelector('.main-svg')")
    # fake_eval: EV, L0 and dead fraction, equal in both runs: a tie, both best, L0 with no direction
    assert page.locator("table.summary tr").count() == 4 and page.locator("table.summary td.best").count() == 4
    assert "equal in every run that has it" in page.inner_text("table.summary")
    assert page.locator("table.summary td[title^='global: 1 - sum']").count() == 1  # a definition on hover
    frontier = page.locator("[id^='fig-frontier']")
    assert frontier.count() == 3
    page.wait_for_function("[...document.querySelectorAll('[id^=fig-frontier]')].every(e => e.querySelector("
                           "'.main-svg'))")
    assert page.locator("#fig-frontier-0 .point").count() == 2  # one point per run
    assert not all(plots_rendered(page))  # figures far below wait until they are scrolled to
    page.screenshot(path=str(ARTIFACTS / "compare-top.png"))
    box = page.locator("#fig-frontier-0 .point").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # plotly's drag layer takes it
    page.wait_for_selector("#fig-frontier-0 .hovertext")
    hover = page.locator("#fig-frontier-0 .hovertext").text_content()
    assert "run<&\"'>" in hover and "d_sae = " in hover  # the run's name, as text, and its switch (d_sae)
    render_every_plot(page)
    rendered = plots_rendered(page)
    assert len(rendered) >= 8 and all(rendered)  # 3 frontier, density, curves, 2 t-SNE maps, best-match histogram
    assert "Configuration differences" in page.inner_text("body")
    assert page.locator("details.group[open]").count() >= 3  # metric groups, open and collapsible
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    link = page.locator("a[href*='latent.html#']").first
    href = link.get_attribute("href")
    link.click()
    wait_latent(page, href.split("#")[1])
    page.close()
    assert_clean(browser)
