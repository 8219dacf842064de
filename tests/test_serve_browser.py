"""`vsae serve` in a real browser: uvicorn on a free local port (in a thread), headless Chromium (Debian's `chromium`)
driven by Playwright, as tests/test_browser.py drives the static pages.

Checked: a typed text (holding markup) shows its tokens and each run's top latents, as text; a latent opens, with
"try your own text"; steering shows the plain and the steered continuation; ablation and search answer; a served
dashboard's latent page gains "try your own text"; no console errors or uncaught exceptions, no dialog, and no
request leaves the server's origin. Skips as tests/test_browser.py does where chromium or playwright is missing.
"""

import pytest

from tests.test_browser import ARTIFACTS, new_page, offline_chromium
from tests.test_serve import live, served  # noqa: F401  (pytest fixtures: the app and uvicorn serving it)

expect = None  # playwright's expect, set once playwright is found

TYPED = "Tom said <b>hi</b> & left <script>alert(1)</script> The quick brown fox"


@pytest.fixture(scope="module")
def browser(tmp_path_factory, live):  # noqa: F811
    global expect
    origin = f"http://127.0.0.1:{live}"
    with offline_chromium(tmp_path_factory.mktemp("chromium-profile"),
                          (origin + "/", "data:", "blob:", "about:")) as context:
        expect = pytest.importorskip("playwright.sync_api").expect
        context.origin = origin
        yield context


def test_serve_app_in_chromium(browser, served):  # noqa: F811
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = new_page(browser)
    page.goto(browser.origin + "/")
    assert page.locator("#runs tr").count() == 3  # header and the two runs
    assert served["names"][0] in page.inner_text("#runs")  # the hostile run name, as text

    # test text: tokens and each run's top latents
    page.fill("#text", TYPED)
    page.click("#text-go")
    page.wait_for_selector("#text-out table.tokens")
    n_tokens = page.locator("#text-out table.tokens tr").count() - 1
    want = served["client"].post("/api/activations", json={"text": TYPED}).json()
    assert n_tokens == len(want["tokens"]) and n_tokens > 10
    assert "<script>alert(1)</script>" in "".join(page.locator("#text-out .toks .tok").all_inner_texts())
    assert page.locator("#text-out b, #text-out script").count() == 0  # no element came from the text
    assert page.locator("#text-out a[href^='/dash/0/latent.html#']").count() > 0  # run 0 has a dashboard
    page.screenshot(path=str(ARTIFACTS / "serve-text.png"), full_page=True)

    # open a latent: its logit effects and "try your own text"
    first = page.locator("#text-out button.lat").first
    latent = first.inner_text()
    first.click()
    # (locator waits, not wait_for_function: the page's CSP forbids the eval that one needs)
    expect(page.locator("#latent-title")).to_have_text(f"Latent {latent} of {served['names'][0]}")
    assert page.locator("#latent-body table.data tr").count() >= 2
    page.click("#try-go")
    page.wait_for_selector("#try-out .tok")
    assert page.locator("#try-out .tok").count() == n_tokens
    assert page.locator("#try-out .tok").first.get_attribute("title").startswith("activation ")

    # steer with it: the plain and the steered continuation side by side
    page.click("#latent-steer")
    page.locator("#steer-list tr.iv .iv-value").fill("200")
    page.fill("#steer-prompt", "The quick brown")
    page.fill("#steer-n", "8")
    page.click("#steer-go")
    page.wait_for_selector("#steer-steered .tok")
    n_prompt = page.locator("#steer-plain .tok.prompt").count()
    assert n_prompt > 0 and page.locator("#steer-plain .tok").count() == n_prompt + 8
    assert page.locator("#steer-steered .tok").count() == n_prompt + 8
    assert page.locator("#steer-steered .tok.diff").count() > 0  # adding 200 x its decoder row changes the text
    page.screenshot(path=str(ARTIFACTS / "serve-steer.png"), full_page=True)

    # ablate it on the test text
    page.click("#latent-ablate")
    assert page.input_value("#ablate-latent") == latent
    page.click("#ablate-go")
    page.wait_for_selector("#ablate-out .tok")
    assert page.locator("#ablate-out .toks").count() == 2

    # search by id: both runs have latent 20
    page.fill("#search-q", "20")
    page.press("#search-q", "Enter")
    page.wait_for_selector("#search-out table tr:nth-child(3)")
    assert page.locator("#search-out button.lat").count() >= 2
    page.close()

    # a served dashboard's latent page gains "try your own text"
    page = new_page(browser)
    page.goto(browser.origin + "/dash/0/latent.html#5")
    expect(page.locator("h1")).to_have_text("Latent 5")
    page.wait_for_selector("#latent .try #try-text")
    page.fill("#try-text", TYPED)
    page.click("#try-go")
    page.wait_for_selector("#try-out .tok")
    assert page.locator("#try-out .tok").count() == n_tokens
    page.evaluate("window.location.hash = '#6'")  # another latent: its own box, once
    expect(page.locator("h1")).to_have_text("Latent 6")
    page.wait_for_selector("#latent .try")
    assert page.locator("#latent .try").count() == 1
    page.screenshot(path=str(ARTIFACTS / "serve-dashboard-latent.png"), full_page=True)
    page.close()
    assert browser.log == {"errors": [], "external": [], "failed": [], "dialogs": []}
