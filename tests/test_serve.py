"""`vsae serve`: the steering tensor code against the plain model, and the app's API through Starlette's TestClient
(test text, search, steering, ablation, bounds, path traversal, the host check) and over real HTTP (uvicorn in a
thread: concurrent requests queue on the model, raw `..` paths), on the tiny model and a harvested cache."""

import asyncio
import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dashboards.build import DashboardConfig, build_dashboard
from dashboards.serve import ServeConfig, create_app
from dashboards.serve_model import Explorer, RequestError, ServeError
from dashboards.serve_search import dashboard_top_tokens
from dashboards.steer import Intervention, generate, intervention_delta, intervention_hook, latent_values
from dashboards.weights import logit_effects
from evals.splice import log_probs, next_token_ce
from tests.ports import free_port
from tests.test_dashboards import HOSTILE_RUN_NAME, hostile_cache, random_sae, save_run
from tests.test_harvest import HOOK

TEXT = "The quick brown fox jumps over the lazy dog. To be, or not to be"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    """Two runs (24 and 32 latents) on a harvested cache of hostile text; a dashboard of the first."""
    from starlette.testclient import TestClient

    tmp = tmp_path_factory.mktemp("serve")
    cache = hostile_cache(tmp, tiny_checkpoint)
    runs = [save_run(tmp / "runs" / f"{HOSTILE_RUN_NAME}{i}", random_sae(32, d_sae, 4, seed=i, dead=(3,)), HOOK,
                     model=tiny_checkpoint.name) for i, d_sae in enumerate((24, 32))]
    dash = tmp / "dash"
    build_dashboard(runs[0], DashboardConfig(cache=str(cache), out=str(dash), contexts=5, progress=False))
    cfg = ServeConfig(cache=str(cache), dashboards=[str(dash)], max_text_chars=500, max_new_tokens=16)
    explorer = Explorer.load(runs, cache, cfg.dashboards, "cpu", cfg.limits())
    app = create_app(explorer, cfg)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield {"client": client, "explorer": explorer, "app": app, "runs": runs, "dash": dash, "cache": cache,
               "tmp": tmp, "cfg": cfg, "names": [r.name for r in runs]}


def tokens_of(explorer, text: str) -> torch.Tensor:
    ids = explorer.model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([[explorer.bos, *ids]])


def hook_input(model, tokens: torch.Tensor) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    return cache[HOOK]


# ---- the tensor code ------------------------------------------------------------------------------------------


def test_empty_intervention_reproduces_the_model(served):
    ex = served["explorer"]
    run = ex.runs[served["names"][0]]
    tokens = tokens_of(ex, TEXT)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        plain = ex.model(tokens, return_type="logits")
        hooked = ex.model.run_with_hooks(tokens, return_type="logits",
                                         fwd_hooks=[(HOOK, intervention_hook(run.sae, [], mask))])
        # clamping a latent to the value it already has is no edit either (up to float rounding)
        code = run.sae.encode_topk(hook_input(ex.model, tokens))
        j = int(code.vals[0, 3].argmax())
        latent, value = int(code.idx[0, 3, j]), float(code.vals[0, 3, j])
        assert value > 0 and float(latent_values(code, torch.tensor([latent]))[0, 3, 0]) == value
        only_there = torch.zeros_like(mask)
        only_there[0, 3] = True
        same = ex.model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[
            (HOOK, intervention_hook(run.sae, [Intervention(latent, "clamp", value)], only_there))])
        moved = ex.model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[
            (HOOK, intervention_hook(run.sae, [Intervention(latent, "clamp", value + 5)], only_there))])
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(moved[:, :3], plain[:, :3]) and not torch.allclose(moved[:, 3:], plain[:, 3:])


def test_intervention_keeps_the_error_term(served):
    """x + delta == x_hat(z') + (x - x_hat(z)), with z' the edited dense code."""
    ex = served["explorer"]
    sae = ex.runs[served["names"][0]].sae
    with torch.no_grad():
        x = hook_input(ex.model, tokens_of(ex, TEXT))[0]
        ivs = [Intervention(2, "clamp", 1.5), Intervention(7, "add", -0.75), Intervention(2, "add", 0.25)]
        z = sae.encode(x)
        edited = z.clone()
        edited[:, 2] = 1.75
        edited[:, 7] -= 0.75
        want = sae.decode(edited) + (x - sae.decode(z))
        got = x + intervention_delta(x, sae, ivs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generate_greedy_is_the_argmax_loop(served):
    model = served["explorer"].model
    tokens = tokens_of(served["explorer"], "The quick brown")
    with torch.no_grad():
        out = generate(model, tokens, 6, lambda t: [])
        want = tokens
        for _ in range(6):
            want = torch.cat([want, model(want, return_type="logits")[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, want)


def test_intervention_mode_is_checked():
    with pytest.raises(ValueError, match="clamp, add"):
        Intervention(0, "set", 1.0)


# ---- the API ------------------------------------------------------------------------------------------------------


def test_test_text_lists_each_runs_top_latents(served):
    ex, client = served["explorer"], served["client"]
    r = client.post("/api/activations", json={"text": TEXT, "top": 3})
    assert r.status_code == 200, r.text
    doc = r.json()
    tokens = tokens_of(ex, TEXT)
    assert doc["tokens"] == ex.text(tokens[0, 1:])  # BOS not shown
    assert [x["run"] for x in doc["runs"]] == served["names"]
    assert doc["runs"][0]["dashboard"] == "/dash/0/" and doc["runs"][1]["dashboard"] is None
    with torch.no_grad():
        x = hook_input(ex.model, tokens)[0, 1:]
    for run_doc, name in zip(doc["runs"], served["names"], strict=True):
        dense = ex.runs[name].sae.encode(x)
        assert len(run_doc["latents"]) == len(doc["tokens"])
        for t, listed in enumerate(run_doc["latents"]):
            v, i = dense[t].topk(3)
            want = [(int(j), float(a)) for a, j in zip(v, i, strict=True) if a > 0]
            assert [j for j, _ in listed] == [j for j, _ in want]
            assert [a for _, a in listed] == pytest.approx([a for _, a in want], rel=1e-3)


def test_special_tokens_in_a_text_have_no_latents(served):
    r = served["client"].post("/api/activations", json={"text": "The fox<|endoftext|>The dog"}).json()
    at = r["special"].index(True)
    assert r["tokens"][at] == "<|endoftext|>" and r["special"].count(True) == 1
    for run in r["runs"]:
        assert run["latents"][at] == [] and all(run["latents"][t] for t in range(len(r["tokens"])) if t != at)


def test_try_your_own_text_gives_the_latents_activation(served):
    ex, client = served["explorer"], served["client"]
    name = served["names"][1]
    r = client.post("/api/latent/activations", json={"run": name, "latent": 30, "text": TEXT})
    assert r.status_code == 200, r.text
    doc = r.json()
    with torch.no_grad():
        want = ex.runs[name].sae.encode(hook_input(ex.model, tokens_of(ex, TEXT))[0, 1:])[:, 30]
    assert doc["acts"] == pytest.approx(want.tolist(), rel=1e-3, abs=1e-6)
    assert doc["max"] == pytest.approx(float(want.max()), rel=1e-3)


def test_latent_info_has_logit_effects_and_its_dashboard_page(served):
    ex, client = served["explorer"], served["client"]
    name = served["names"][0]
    doc = client.get("/api/latent", params={"run": name, "latent": 5}).json()
    assert doc["dashboard"] == "/dash/0/latent.html#5"
    top_v, top_i, _, _ = logit_effects(ex.runs[name].sae.W_dec[5:6], ex.model.W_U, ex.model.ln_final.w)
    assert [t for t, _ in doc["logits"]["pos"]] == ex.text(top_i[0])
    assert [v for _, v in doc["logits"]["pos"]] == pytest.approx(top_v[0].tolist(), rel=1e-3)
    assert client.get("/api/latent", params={"run": served["names"][1], "latent": 5}).json()["dashboard"] is None


def test_search_by_id_and_by_token(served):
    ex, client = served["explorer"], served["client"]
    a, b = served["names"]
    hits = client.get("/api/search", params={"q": "30"}).json()["hits"]
    assert {(h["run"], h["latent"]) for h in hits if h["why"][0] == "latent id"} == {(b, 30)}  # run a has 24 latents
    hits = client.get("/api/search", params={"q": "20"}).json()["hits"]
    assert {(a, 20), (b, 20)} <= {(h["run"], h["latent"]) for h in hits}
    # by a logit-effect token: the top token of latent 7 of run b, typed with other case and spaces
    _, top_i, _, _ = logit_effects(ex.runs[b].sae.W_dec[7:8], ex.model.W_U, ex.model.ln_final.w)
    token = ex.text(top_i[0, :1])[0]
    hits = client.get("/api/search", params={"q": f"  {token.strip().upper()} "}).json()["hits"]
    hit = next(h for h in hits if (h["run"], h["latent"]) == (b, 7))
    assert "logit effect #1" in hit["why"][0] and hit["dashboard"] is None
    # by a token of the dashboard's top contexts (run a only has a dashboard)
    contexts = dashboard_top_tokens(served["dash"])
    latent, tokens = next((i, t) for i, t in sorted(contexts.items()) if t[0].strip())
    hits = client.get("/api/search", params={"q": tokens[0]}).json()["hits"]
    hit = next(h for h in hits if (h["run"], h["latent"]) == (a, latent))
    assert any("top contexts" in w for w in hit["why"]) and hit["dashboard"] == f"/dash/0/latent.html#{latent}"
    assert client.get("/api/search", params={"q": "no such token at all"}).json()["hits"] == []


def test_steering_without_interventions_is_the_plain_model(served):
    ex, client = served["explorer"], served["client"]
    r = client.post("/api/steer", json={"run": served["names"][0], "prompt": "The quick brown", "interventions": [],
                                        "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    doc = r.json()
    tokens = tokens_of(ex, "The quick brown")
    with torch.no_grad():
        want = generate(ex.model, tokens, 8, lambda t: [])
    assert doc["unsteered"] == doc["steered"] == ex.text(want[0, tokens.shape[1]:])
    assert doc["prompt"] == ex.text(tokens[0, 1:])


def test_clamping_a_latent_changes_the_continuation(served):
    client = served["client"]
    body = {"run": served["names"][0], "prompt": "The quick brown", "max_new_tokens": 8, "temperature": 0}
    plain = client.post("/api/steer", json=body | {"interventions": []}).json()
    steered = client.post("/api/steer", json=body | {"interventions": [
        {"latent": 5, "mode": "clamp", "value": 40.0}]}).json()
    assert steered["unsteered"] == plain["unsteered"]  # the plain row is untouched by the steering
    assert steered["steered"] != plain["unsteered"]
    added = client.post("/api/steer", json=body | {"interventions": [{"latent": 5, "mode": "add", "value": 40.0}]})
    assert added.json()["steered"] != plain["unsteered"]


def test_sampling_is_seeded(served):
    client = served["client"]
    body = {"run": served["names"][0], "prompt": "To be", "max_new_tokens": 12, "temperature": 1.0,
            "interventions": []}
    a = client.post("/api/steer", json=body | {"seed": 3}).json()
    assert a["steered"] == a["unsteered"]  # same seed, same distributions: the same draws
    assert client.post("/api/steer", json=body | {"seed": 3}).json()["steered"] == a["steered"]
    others = {tuple(client.post("/api/steer", json=body | {"seed": s}).json()["steered"]) for s in range(4, 8)}
    assert others != {tuple(a["steered"])}


def test_ablation_gives_the_per_token_loss_change(served):
    ex, client = served["explorer"], served["client"]
    name = served["names"][0]
    sae = ex.runs[name].sae
    tokens = tokens_of(ex, TEXT)
    with torch.no_grad():
        x = hook_input(ex.model, tokens)
        z = sae.encode(x)[0]
    fires = (z[1:] > 0).any(dim=0)
    latent = int(torch.nonzero(fires)[0])  # a latent that fires on the text
    r = client.post("/api/ablate", json={"run": name, "latent": latent, "text": TEXT})
    assert r.status_code == 200, r.text
    doc = r.json()

    def remove(acts, hook):  # noqa: ARG001
        out = acts.clone()
        out[0, 1:] -= z[1:, latent, None] * sae.W_dec[latent]  # not at BOS, a special token
        return out

    with torch.no_grad():
        ce = next_token_ce(log_probs(ex.model(tokens, return_type="logits")), tokens)[0]
        ce_abl = next_token_ce(log_probs(ex.model.run_with_hooks(tokens, return_type="logits",
                                                                 fwd_hooks=[(HOOK, remove)])), tokens)[0]
    assert doc["delta"] == pytest.approx((ce_abl - ce).tolist(), abs=1e-4)
    assert doc["loss"] == pytest.approx(ce.tolist(), rel=1e-3)
    assert doc["acts"] == pytest.approx(z[1:, latent].tolist(), rel=1e-3, abs=1e-6)
    first = int(torch.nonzero(z[1:, latent] > 0)[0])
    # token j is predicted from token j - 1: nothing before the first firing can change
    assert all(d == 0 for d in doc["delta"][: first + 1])
    assert any(d != 0 for d in doc["delta"][first + 1 :])


@pytest.mark.parametrize("path, body, status, message", [
    ("/api/activations", {"text": "x" * 501}, 413, "max-text-chars"),
    ("/api/activations", {"text": "~" * 100}, 413, "max-tokens"),
    ("/api/activations", {"text": ""}, 400, "non-empty"),
    ("/api/activations", {"text": "hi", "top": 0}, 400, "top"),
    ("/api/steer", {"run": "R0", "prompt": "hi", "max_new_tokens": 17}, 413, "max-new-tokens"),
    ("/api/steer", {"run": "R0", "prompt": "~" * 50, "max_new_tokens": 16}, 413, "plus 16 to generate"),
    ("/api/steer", {"run": "R0", "prompt": "hi", "interventions": [{"latent": 24, "mode": "add", "value": 1}]},
     400, "latents 0..23"),
    ("/api/steer", {"run": "R0", "prompt": "hi", "interventions": [{"latent": 1, "mode": "set", "value": 1}]},
     400, "clamp, add"),
    ("/api/steer", {"run": "R0", "prompt": "hi", "interventions": [{"latent": 1, "mode": "add", "value": 1e9}]},
     400, "within"),
    ("/api/steer", {"run": "R0", "prompt": "hi", "interventions": [{"latent": 1, "mode": "add", "value": 1}] * 17},
     413, "max-interventions"),
    ("/api/steer", {"run": "R0", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/api/ablate", {"run": "nope", "latent": 1, "text": "hi"}, 404, "no served run"),
    ("/api/ablate", {"run": "R0", "latent": True, "text": "hi"}, 400, "latent True"),
    ("/api/latent/activations", {"run": "R0", "latent": -1, "text": "hi"}, 400, "latents 0..23"),
])
def test_requests_beyond_the_bounds_get_a_clear_4xx(served, path, body, status, message):
    if body.get("run") == "R0":
        body = body | {"run": served["names"][0]}
    r = served["client"].post(path, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_malformed_requests(served):
    client = served["client"]
    form = {"content-type": "application/x-www-form-urlencoded"}
    r = client.post("/api/activations", content=b"text=hi", headers=form)
    assert r.status_code == 415 and "JSON" in r.json()["error"]
    r = client.post("/api/activations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/api/activations", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "object" in r.json()["error"]
    r = client.post("/api/activations", content=json.dumps({"text": "x" * 20_000}).encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["error"]
    nan = {"run": served["names"][0], "prompt": "hi", "interventions": [{"latent": 1, "mode": "add", "value": "N"}]}
    r = client.post("/api/steer", content=json.dumps(nan).replace('"N"', "NaN").encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "within" in r.json()["error"]
    assert client.get("/api/search", params={"q": "the", "limit": "x"}).status_code == 400
    assert client.get("/api/latent", params={"run": served["names"][0]}).status_code == 400
    assert client.get("/api/steer").status_code == 405
    assert client.get("/no/such/page").json() == {"error": "Not Found"}


def test_requests_for_another_host_are_refused(served):
    """A page elsewhere that rebinds its DNS name to 127.0.0.1 still sends its own name as Host."""
    r = served["client"].get("/api/runs", headers={"host": "attacker.example"})
    assert r.status_code == 400
    assert served["client"].get("/api/runs", headers={"host": "localhost:8000"}).status_code == 200


def test_the_page_is_self_contained_and_escapes_run_names(served):
    r = served["client"].get("/")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    html = r.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing loaded from elsewhere
    assert HOSTILE_RUN_NAME not in html and "VSAEServe.start(" in html  # names only as escaped JSON
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html


def test_dashboards_are_served_and_their_latent_page_gains_try_your_own_text(served):
    client, dash = served["client"], served["dash"]
    assert client.get("/dash/0/").text == (dash / "index.html").read_text()
    assert client.get("/dash/0/assets/vsae.js").status_code == 200
    page = client.get("/dash/0/latent.html").text
    on_disk = (dash / "latent.html").read_text()
    assert 'src="/app/latent-try.js" data-run="run&lt;&amp;&quot;&#x27;&gt;0"' in page
    assert page.replace('<script src="/app/latent-try.js" data-run="run&lt;&amp;&quot;&#x27;&gt;0"></script>\n',
                        "") == on_disk
    js = client.get("/app/latent-try.js")
    assert js.status_code == 200 and "tryBox" in js.text and js.headers["content-type"].startswith("text/javascript")
    assert client.get("/dash/1/latent.html").status_code == 404  # one dashboard served


def asgi_get(app, raw_path: bytes) -> tuple[int, bytes]:
    """GET `raw_path` through the ASGI app as a server would hand it over (path decoded, `..` left in)."""
    from urllib.parse import unquote_to_bytes

    messages, requested = [], []

    async def receive():
        if not requested:
            requested.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        while not any(m["type"] == "http.response.body" and not m.get("more_body") for m in messages):
            await asyncio.sleep(0.001)  # a client waits for the whole response before it goes away
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)

    path = unquote_to_bytes(raw_path).decode("utf-8", "replace")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": raw_path, "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def test_no_file_outside_the_dashboards_is_served(served):
    app, dash, tmp = served["app"], served["dash"], served["tmp"]
    secret = tmp / "secret.txt"
    secret.write_text("SECRET")
    (dash / "escape").symlink_to(tmp)  # a symlink inside the dashboard leading out of it
    try:
        assert asgi_get(app, b"/dash/0/index.html")[0] == 200
        for raw in (b"/dash/0/../secret.txt", b"/dash/0/%2e%2e/secret.txt", b"/dash/0/%2E%2E%2Fsecret.txt",
                    b"/dash/0/..%2f..%2f" + str(secret).lstrip("/").encode(), b"/dash/0/" + str(secret).encode(),
                    b"/dash/0//" + str(secret).encode(), b"/dash/0/escape/secret.txt",
                    b"/dash/0/%2e%2e/runs/" + f"{HOSTILE_RUN_NAME}0/cfg.json".encode(), b"/dash/0/..\\secret.txt",
                    b"/" + str(secret).encode(), b"/dash/../secret.txt", b"/dash/0/assets/../../secret.txt"):
            status, body = asgi_get(app, raw)
            assert status in (400, 404), raw
            assert b"SECRET" not in body and b"d_sae" not in body, raw
    finally:
        (dash / "escape").unlink()


def test_serving_checks_runs_and_dashboards(served, tmp_path):
    cache, runs, dash = served["cache"], served["runs"], served["dash"]
    with pytest.raises(ServeError, match="not one of the served runs"):
        Explorer.load([runs[1]], cache, [dash], "cpu", served["cfg"].limits())
    with pytest.raises(ServeError, match="not a dashboard vsae wrote"):
        Explorer.load([runs[0]], cache, [tmp_path], "cpu", served["cfg"].limits())
    with pytest.raises(ServeError, match="at least one run"):
        Explorer.load([], cache, [], "cpu", served["cfg"].limits())


def test_explorer_refuses_a_text_beyond_the_models_context(served):
    ex = served["explorer"]
    assert ex.max_tokens == ex.n_ctx == 64  # --max-tokens 128, but the tiny model's context is 64
    with pytest.raises(RequestError, match="context of 64") as e:
        ex.tokenize("a b " * 40)
    assert e.value.status == 413


def test_cli_serve_loads_once_and_binds_loopback(served, monkeypatch):
    import uvicorn

    from cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    rc = main(["serve", str(served["runs"][0]), "--cache", str(served["cache"]), "--dashboards", str(served["dash"]),
               "--port", "8123"])
    assert rc == 0 and seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert main(["serve", str(served["runs"][1]), "--cache", str(served["cache"]), "--dashboards",
                 str(served["dash"])]) == 2  # the dashboard's run is not served: a one-line error


# ---- over real HTTP ---------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def live(served):
    """The app under uvicorn on a free local port, in a thread."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(served["app"], host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def http_request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict | bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, json.loads(raw) if r.getheader("content-type", "").startswith("application/json") else raw


def test_concurrent_requests_queue_on_the_model(served, live, monkeypatch):
    """Requests fired at once all succeed, with the answers they get alone, and never overlap on the model."""
    model = served["explorer"].model
    inside, most = [0], [0]
    count = threading.Lock()

    def one_at_a_time(method):
        def wrapped(*args, **kwargs):
            with count:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)  # widen the window in which an unguarded second request would overlap
            try:
                return method(*args, **kwargs)
            finally:
                with count:
                    inside[0] -= 1
        return wrapped

    for name in ("run_with_cache", "run_with_hooks"):
        monkeypatch.setattr(model, name, one_at_a_time(getattr(model, name)))
    name = served["names"][0]
    jobs = [("/api/activations", {"text": TEXT}),
            ("/api/steer", {"run": name, "prompt": "The quick", "max_new_tokens": 4,
                            "interventions": [{"latent": 5, "mode": "clamp", "value": 20}]}),
            ("/api/ablate", {"run": name, "latent": 5, "text": TEXT}),
            ("/api/latent/activations", {"run": name, "latent": 5, "text": TEXT})] * 3
    alone = [http_request(live, "POST", path, body) for path, body in jobs[:4]]
    most[0] = 0
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: http_request(live, "POST", *job), jobs))
    assert all(status == 200 for status, _ in together), together
    assert together == alone * 3
    assert most[0] == 1


def test_raw_http_traversal_is_refused(served, live):
    secret = served["tmp"] / "secret.txt"
    secret.write_text("SECRET")
    assert http_request(live, "GET", "/dash/0/index.html")[0] == 200
    for path in ("/dash/0/../secret.txt", "/dash/0/%2e%2e/secret.txt", "/dash/0/%2e%2e%2fsecret.txt",
                 "/dash/0/" + str(secret), "/dash/0/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd"):
        status, body = http_request(live, "GET", path)
        assert status in (400, 404), path
        assert b"SECRET" not in (body if isinstance(body, bytes) else json.dumps(body).encode()), path
