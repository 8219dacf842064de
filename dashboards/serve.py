"""`vsae serve`: a local web app over the served runs: test text, search, steering, ablation, and their dashboards.

Starlette routes over an `Explorer` (dashboards/serve_model.py), served by uvicorn:

    GET  /                          the app's one page (inline CSS and JS: dashboards/serve_page.py)
    GET  /api/runs                  the served runs
    POST /api/activations           {text, top}: per token, each run's top latents
    GET  /api/latent?run=&latent=   a latent's logit effects and dashboard page
    POST /api/latent/activations    {run, latent, text}: its activation per token ("try your own text")
    GET  /api/search?q=&limit=      latents by token or id, across runs
    POST /api/steer                 {run, prompt, interventions, max_new_tokens, temperature, seed}
    POST /api/ablate                {run, latent, text}: per-token change in next-token loss
    GET  /dash/I/...                dashboard I, read-only (its latent page gains "try your own text")
    GET  /app/latent-try.js         the script that adds it

Safety: binds 127.0.0.1 unless told otherwise, and then answers only requests addressed to a loopback name (a page
elsewhere cannot reach it by DNS rebinding); POSTs must be JSON (a plain cross-site form cannot send one); request
bodies, texts, token counts and generation lengths are bounded, with a 4xx JSON error {"error": ...} beyond; no
file outside the dashboards' directories is served (Starlette's StaticFiles resolves the path, symlinks included,
and refuses one that leaves the directory). Model work runs one request at a time (`Explorer.lock`), in worker
threads, so the server keeps accepting requests while one computes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from activations.devices import resolve_device
from dashboards.feature_pages import LATENT_PAGE
from dashboards.html import esc
from dashboards.serve_model import DASH_PREFIX, Explorer, Limits, RequestError, ServeError
from dashboards.serve_page import LATENT_TRY_JS, app_page

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Host names a loopback-bound app answers to (TrustedHostMiddleware cannot read an IPv6 Host header, so ::1 is
# served without the check).
LOOPBACK_NAMES = ["127.0.0.1", "localhost"]
TRY_SCRIPT = "/app/latent-try.js"
# The app's page talks only to its own origin; inline CSS / JS are its own (no CDN, no other source).
APP_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

__all__ = ["ServeConfig", "ServeError", "create_app", "serve"]


@dataclass
class ServeConfig:
    cache: str = field(metadata={"help": "activation cache the runs were trained on (its model is loaded)"})
    dashboards: list[str] = field(default_factory=list, metadata={
        "help": "dashboard directories of the served runs (vsae dashboard), served read-only and linked from the "
                "app"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind; anything but a loopback address exposes the app (which has no login) to the "
                "network"})
    port: int = field(default=8000, metadata={"help": "port to bind"})
    device: str = field(default="auto", metadata={
        "help": "torch device of the model and the SAEs; auto: CUDA when this machine has it, else CPU"})
    max_text_chars: int = field(default=4000, metadata={"help": "longest text or prompt a request may send"})
    max_tokens: int = field(default=128, metadata={
        "help": "most tokens of a text (BOS included; prompt plus generation when steering), at most the model's "
                "context"})
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens one steering request may generate"})
    max_interventions: int = field(default=16, metadata={"help": "most latents one steering request may edit"})
    top_latents: int = field(default=5, metadata={"help": "latents listed per token and run in the test text"})

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)

    def limits(self) -> Limits:
        return Limits(max_text_chars=self.max_text_chars, max_tokens=self.max_tokens,
                      max_new_tokens=self.max_new_tokens, max_interventions=self.max_interventions,
                      max_top=max(Limits.max_top, self.top_latents))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _request_error(request: Request, exc: Exception) -> Response:  # noqa: ARG001
    return _error(exc.status, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:  # noqa: ARG001
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _json_body(request: Request, limit: int) -> dict:
    """The request's JSON object, read up to `limit` bytes."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, "send the request body as JSON (Content-Type: application/json)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError:
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.strip().lstrip("-").isdigit() or not lo <= int(raw) <= hi:
        raise RequestError(400, f"{name}={raw!r}: give an integer in {lo}..{hi}")
    return int(raw)


def _bounded_int(value: object, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise RequestError(400, f"{name} {value!r}: give an integer in {lo}..{hi}")
    return value


def create_app(explorer: Explorer, cfg: ServeConfig) -> Starlette:
    """The ASGI app over `explorer` (loaded once by the caller)."""
    limit = 4 * cfg.max_text_chars + 16_384  # UTF-8 text (at most 4 bytes a character) and the JSON around it
    runs = explorer.runs_info()

    def post(work: Callable[[dict], dict]) -> Callable:
        async def endpoint(request: Request) -> Response:
            body = await _json_body(request, limit)
            return JSONResponse(await run_in_threadpool(work, body))
        return endpoint

    html = app_page(runs, asdict(explorer.limits) | {"max_tokens": explorer.max_tokens, "top_latents": cfg.top_latents})

    async def index(request: Request) -> Response:  # noqa: ARG001
        return HTMLResponse(html, headers={"Content-Security-Policy": APP_CSP})

    async def api_runs(request: Request) -> Response:  # noqa: ARG001
        return JSONResponse({"runs": runs, "limits": asdict(explorer.limits) | {"max_tokens": explorer.max_tokens}})

    async def api_latent(request: Request) -> Response:
        latent = _int_param(request, "latent", -1, 0, 2**31)
        return JSONResponse(await run_in_threadpool(explorer.latent_info, request.query_params.get("run"), latent))

    async def api_search(request: Request) -> Response:
        limit_hits = _int_param(request, "limit", 50, 1, 500)
        return JSONResponse(await run_in_threadpool(explorer.search, request.query_params.get("q"), limit_hits))

    async def latent_page(request: Request) -> Response:
        """A dashboard's latent page with the "try your own text" script added (the file itself is unchanged)."""
        d = request.path_params["index"]
        if not 0 <= d < len(explorer.dashboards):
            raise HTTPException(404)
        served = next((r for r in explorer.runs.values() if r.dashboard == d), None)
        try:
            shell = (explorer.dashboards[d] / LATENT_PAGE).read_text(encoding="utf-8")
        except OSError:
            raise HTTPException(404) from None
        tag = f'<script src="{TRY_SCRIPT}" data-run="{esc(served.name)}"></script>\n' if served else ""
        cut = shell.rfind("</body>")
        return HTMLResponse(shell[:cut] + tag + shell[cut:] if cut >= 0 else shell + tag)

    async def try_script(request: Request) -> Response:  # noqa: ARG001
        return Response(LATENT_TRY_JS, media_type="text/javascript")

    routes = [
        Route("/", index),
        Route("/api/runs", api_runs),
        Route("/api/activations", post(lambda b: explorer.activations(
            b.get("text"), _bounded_int(b.get("top", cfg.top_latents), "top", 1, explorer.limits.max_top))),
            methods=["POST"]),
        Route("/api/latent", api_latent),
        Route("/api/latent/activations", post(lambda b: explorer.latent_activations(
            b.get("text"), b.get("run"), b.get("latent"))), methods=["POST"]),
        Route("/api/search", api_search),
        Route("/api/steer", post(lambda b: explorer.steer(
            b.get("prompt"), b.get("run"), b.get("interventions", []),
            b.get("max_new_tokens", min(32, cfg.max_new_tokens)),
            b.get("temperature", 0), b.get("seed", 0))), methods=["POST"]),
        Route("/api/ablate", post(lambda b: explorer.ablate(b.get("text"), b.get("run"), b.get("latent"))),
              methods=["POST"]),
        Route(TRY_SCRIPT, try_script),
        Route(f"{DASH_PREFIX}/{{index:int}}/{LATENT_PAGE}", latent_page),
        *(Mount(f"{DASH_PREFIX}/{d}", app=StaticFiles(directory=path, html=True, follow_symlink=False))
          for d, path in enumerate(explorer.dashboards)),
    ]
    middleware = []
    if cfg.host in LOOPBACK_NAMES:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_NAMES))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={RequestError: _request_error, HTTPException: _http_error})


def serve(runs: list[str | Path], cfg: ServeConfig) -> None:
    """Load the model and the runs once, then serve until interrupted."""
    import uvicorn

    for flag, value in (("--max-text-chars", cfg.max_text_chars), ("--max-tokens", cfg.max_tokens),
                        ("--max-new-tokens", cfg.max_new_tokens), ("--max-interventions", cfg.max_interventions),
                        ("--top-latents", cfg.top_latents)):
        if value < 1:
            raise ValueError(f"{flag} {value}: give a positive number")
    if not 0 <= cfg.port < 65536:
        raise ValueError(f"--port {cfg.port}: give a port in 0..65535")
    explorer = Explorer.load(runs, cfg.cache, cfg.dashboards, cfg.device, cfg.limits())
    app = create_app(explorer, cfg)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"vsae serve: {len(explorer.runs)} run(s) at {explorer.runs[next(iter(explorer.runs))].hook_name}, "
          f"{len(explorer.dashboards)} dashboard(s): http://{host}:{cfg.port}/  (Ctrl-C stops)")
    if cfg.host not in LOOPBACK:
        print(f"vsae serve: warning: bound to {cfg.host}, reachable from the network; the app has no login",
              file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
