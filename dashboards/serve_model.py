"""What `vsae serve` asks of the model: one model and its SAEs, loaded once, answering one request at a time.

`Explorer` holds the cache's model, the served runs' SAEs (all read at the cache's hook) and their dashboards, and
answers the app's questions as JSON-able dicts: the top latents per token of a text, one latent's activation per
token, its logit effects, steered generation beside the plain one, the per-token loss change of removing a latent,
and search. Model work holds `Explorer.lock`, so concurrent requests queue instead of interleaving on the model.
A request beyond the limits raises `RequestError` with the HTTP status the app answers (no HTTP here otherwise).

Texts are read as the cache's contexts were: BOS first (the SAEs never saw a context without it), then the text's
tokens; BOS is not shown.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from activations.cache import read_manifest
from activations.models import check_hook, load_model, source_from_manifest, special_token_ids, stop_layer
from dashboards.build import DASHBOARD_META, check_run_matches_cache, is_dashboard
from dashboards.feature_pages import LATENT_PAGE, TokenText
from dashboards.serve_search import SearchIndex, dashboard_top_tokens
from dashboards.steer import Intervention, generate, intervention_hook, latent_values, top_latents
from dashboards.weights import LOGIT_EFFECT_DEFINITION, logit_effects
from evals.splice import counted_mask, log_probs, next_token_ce
from vsae.checkpoint import SAEWeights, read_sae
from vsae.run import read_run

DASH_PREFIX = "/dash"  # the app serves dashboard i under /dash/i/
SEARCH_LOGIT_TOKENS = 10  # top logit-effect tokens per latent that search looks through


class ServeError(ValueError):
    """Runs, a cache or dashboards that cannot be served together; the message says why and what to do."""


class RequestError(Exception):
    """A request the app refuses: `status` is the HTTP status (4xx), the message says what to change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Bounds on one request's work (from `ServeConfig`)."""

    max_text_chars: int = 4000
    max_tokens: int = 128
    max_new_tokens: int = 64
    max_top: int = 20
    max_interventions: int = 16
    max_value: float = 1e4


@dataclass
class ServedRun:
    name: str  # unique among the served runs: the directory name, numbered when two share one
    path: Path
    sae: SAEWeights
    hook_name: str
    dashboard: int | None = None  # index of its dashboard among the served ones


def _round(v: float) -> float | None:
    return float(f"{v:.4g}") if math.isfinite(v) else None


def _dashboard_run(dashboard: Path) -> tuple[str, str]:
    """(resolved run path, run name) a dashboard says it was built from (its dashboard.json)."""
    try:
        meta = json.loads((dashboard / DASHBOARD_META).read_text())
        return str(meta.get("run", "")), str(meta.get("run_name", ""))
    except (OSError, ValueError, AttributeError):
        return "", ""


def _match_dashboards(runs: list[Path], dashboards: list[Path]) -> dict[int, int]:
    """run index -> dashboard index: by the run path each dashboard.json records, else by the run's name."""
    out: dict[int, int] = {}
    for d, dashboard in enumerate(dashboards):
        if not is_dashboard(dashboard):
            raise ServeError(f"--dashboards {dashboard}: not a dashboard vsae wrote (no {DASHBOARD_META}); "
                             f"build one with `vsae dashboard RUN --out {dashboard}`")
        path, name = _dashboard_run(dashboard)
        by_path = [i for i, r in enumerate(runs) if str(r.resolve()) == path]
        candidates = by_path or [i for i, r in enumerate(runs) if r.name == name]
        if len(candidates) != 1:
            raise ServeError(f"--dashboards {dashboard} was built from the run {path or name!r}, which is not "
                             f"{'one' if not candidates else 'exactly one'} of the served runs; serve that run too, "
                             f"or leave this dashboard out")
        if candidates[0] in out:
            raise ServeError(f"--dashboards: two dashboards of the run {runs[candidates[0]]}; give one")
        out[candidates[0]] = d
    return out


class Explorer:
    """The model and the served runs; every method answers one request (see the module docstring)."""

    def __init__(self, model, runs: list[ServedRun], dashboards: list[Path], limits: Limits) -> None:
        self.model = model
        self.runs = {r.name: r for r in runs}
        self.dashboards = dashboards
        self.limits = limits
        self.lock = threading.Lock()
        self.text = TokenText(model.tokenizer)
        self.special = special_token_ids(model.tokenizer)
        self.bos = model.tokenizer.bos_token_id
        self.n_ctx = int(model.cfg.n_ctx)
        self.max_tokens = min(limits.max_tokens, self.n_ctx)
        self.device = next(model.parameters()).device
        self.index = self._search_index()

    # ---- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, runs: list[str | Path], cache: str | Path, dashboards: list[str | Path], device: str,
             limits: Limits) -> Explorer:
        """Read the cache's manifest, its model and every run's SAE; check they belong together."""
        if not runs:
            raise ServeError("give at least one run directory to serve")
        manifest = read_manifest(cache)
        description = manifest["settings"]["model"]
        if not isinstance(description, dict) or description.get("kind") == "synthetic":
            raise ServeError(f"the cache {cache} names no model (synthetic activations): vsae serve runs the model "
                             f"the activations came from; use a cache harvested from a model")
        paths = [Path(r) for r in runs]
        dash_paths = [Path(d) for d in dashboards]
        matched = _match_dashboards(paths, dash_paths)
        hook = manifest["settings"]["hook_name"]  # every run is checked to read it
        served, names = [], set()
        for i, path in enumerate(paths):
            sae, _ = read_sae(path, device=device)
            check_run_matches_cache(read_run(path), manifest, sae.d_in, str(cache))
            name, n = path.name, 1
            while name in names:
                n += 1
                name = f"{path.name}#{n}"
            names.add(name)
            served.append(ServedRun(name, path, sae, hook, matched.get(i)))
        model = load_model(source_from_manifest(description), device=device)  # last: the slowest to load
        check_hook(model, hook)
        return cls(model, served, dash_paths, limits)

    def _logit_effects(self, W_dec: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ln = getattr(getattr(self.model, "ln_final", None), "w", None)
        with torch.no_grad():
            out = logit_effects(W_dec.float(), self.model.W_U.detach(), ln.detach() if ln is not None else None, n=n)
        return tuple(t.cpu() for t in out)

    def _search_index(self) -> SearchIndex:
        index = SearchIndex()
        for run in self.runs.values():
            index.d_sae[run.name] = run.sae.d_sae
            top_v, top_i, _, _ = self._logit_effects(run.sae.W_dec, SEARCH_LOGIT_TOKENS)
            index.add_logit_tokens(run.name, [self.text(row) for row in top_i], top_v.tolist())
            if run.dashboard is not None:
                index.add_context_tokens(run.name, dashboard_top_tokens(self.dashboards[run.dashboard]))
        return index

    # ---- request checks --------------------------------------------------------------------------------------

    def run(self, name: object) -> ServedRun:
        if not isinstance(name, str) or name not in self.runs:
            raise RequestError(404, f"no served run {name!r}; served: {', '.join(self.runs)}")
        return self.runs[name]

    def latent(self, run: ServedRun, latent: object) -> int:
        if not isinstance(latent, int) or isinstance(latent, bool) or not 0 <= latent < run.sae.d_sae:
            raise RequestError(400, f"latent {latent!r}: {run.name} has latents 0..{run.sae.d_sae - 1}")
        return latent

    def tokenize(self, text: object, what: str = "text", room: int = 0) -> Tensor:
        """LongTensor [1, T]: BOS then the tokens of `text`, leaving `room` positions of the context free."""
        if not isinstance(text, str) or not text.strip():
            raise RequestError(400, f"{what}: give a non-empty string")
        if len(text) > self.limits.max_text_chars:
            raise RequestError(413, f"{what} has {len(text)} characters; the limit is {self.limits.max_text_chars} "
                                    f"(vsae serve --max-text-chars)")
        ids = self.model.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([self.bos] if self.bos is not None else []) + list(ids)
        limit = self.max_tokens - room
        if len(ids) > limit:
            extra = f" plus {room} to generate" if room else ""
            raise RequestError(413, f"{what} is {len(ids)} tokens (with BOS){extra}; the limit is {self.max_tokens} "
                                    f"(vsae serve --max-tokens, and the model's context of {self.n_ctx})")
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def _shown(self, tokens: Tensor) -> tuple[list[str], int]:
        """(display strings of the tokens after the prepended BOS, index of the first shown position)."""
        first = 1 if self.bos is not None else 0
        return self.text(tokens[0, first:].cpu()), first

    def _hook_input(self, tokens: Tensor, hooks: set[str]) -> dict[str, Tensor]:
        """The activations [T, d_in] of `tokens` [1, T] at each hook, in one forward up to the deepest."""
        stops = [stop_layer(self.model, h) for h in hooks]
        stop = None if None in stops else max(stops)
        _, cache = self.model.run_with_cache(tokens, names_filter=list(hooks), stop_at_layer=stop)
        return {h: cache[h][0] for h in hooks}

    # ---- requests --------------------------------------------------------------------------------------------

    def runs_info(self) -> list[dict]:
        return [{"name": r.name, "path": str(r.path), "d_sae": r.sae.d_sae, "k": r.sae.k, "hook": r.hook_name,
                 "dashboard": self.dashboard_url(r)} for r in self.runs.values()]

    def dashboard_url(self, run: ServedRun, latent: int | None = None) -> str | None:
        if run.dashboard is None:
            return None
        base = f"{DASH_PREFIX}/{run.dashboard}/"
        return base if latent is None else f"{base}{LATENT_PAGE}#{latent}"

    @torch.no_grad()
    def activations(self, text: object, top: int) -> dict:
        """Per shown token, each run's `top` most active latents: {tokens, special, runs: [{run, latents}]} with
        latents[t] = [[id, activation], ...], largest first, firing ones only."""
        tokens = self.tokenize(text)
        with self.lock:
            acts = self._hook_input(tokens, {r.hook_name for r in self.runs.values()})
            shown, first = self._shown(tokens)
            special = (~counted_mask(tokens, self.special))[0, first:].tolist()
            out = []
            for run in self.runs.values():
                code = top_latents(run.sae.encode_topk(acts[run.hook_name][first:]), top)
                rows = [[[i, _round(v)] for v, i in zip(vals, ids, strict=True) if v > 0] if not sp else []
                        for vals, ids, sp in zip(code.vals.tolist(), code.idx.tolist(), special, strict=True)]
                out.append({"run": run.name, "dashboard": self.dashboard_url(run), "latents": rows})
        return {"tokens": shown, "special": special, "runs": out}

    @torch.no_grad()
    def latent_activations(self, text: object, run_name: object, latent: object) -> dict:
        """One latent's activation per shown token of `text`: {run, latent, tokens, acts, max}."""
        run = self.run(run_name)
        latent = self.latent(run, latent)
        tokens = self.tokenize(text)
        with self.lock:
            x = self._hook_input(tokens, {run.hook_name})[run.hook_name]
            shown, first = self._shown(tokens)
            values = latent_values(run.sae.encode_topk(x[first:]), torch.tensor([latent]))[:, 0]
            special = (~counted_mask(tokens, self.special))[0, first:]
            values = values.masked_fill(special.to(values.device), 0)
        acts = [_round(v) for v in values.tolist()]
        return {"run": run.name, "latent": latent, "tokens": shown, "acts": acts, "max": max(acts, default=0)}

    def latent_info(self, run_name: object, latent: object, n: int = 10) -> dict:
        """{run, latent, d_sae, dashboard, logits: {definition, pos, neg}}: what the weights say of the latent."""
        run = self.run(run_name)
        latent = self.latent(run, latent)
        top_v, top_i, bot_v, bot_i = self._logit_effects(run.sae.W_dec[latent : latent + 1], n)  # weights only
        pos = [[t, _round(v)] for t, v in zip(self.text(top_i[0]), top_v[0].tolist(), strict=True)]
        neg = [[t, _round(v)] for t, v in zip(self.text(bot_i[0]), bot_v[0].tolist(), strict=True)]
        return {"run": run.name, "latent": latent, "d_sae": run.sae.d_sae, "hook": run.hook_name,
                "dashboard": self.dashboard_url(run, latent),
                "logits": {"definition": LOGIT_EFFECT_DEFINITION, "pos": pos, "neg": neg}}

    def interventions(self, run: ServedRun, items: object) -> list[Intervention]:
        if not isinstance(items, list):
            raise RequestError(400, "interventions: give a list of {latent, mode, value}")
        if len(items) > self.limits.max_interventions:
            raise RequestError(413, f"{len(items)} interventions; the limit is {self.limits.max_interventions} "
                                    f"(vsae serve --max-interventions)")
        out = []
        for item in items:
            if not isinstance(item, dict):
                raise RequestError(400, "interventions: each is an object {latent, mode, value}")
            value = item.get("value")
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) \
                    or abs(value) > self.limits.max_value:
                raise RequestError(400, f"intervention value {value!r}: give a number within "
                                        f"+-{self.limits.max_value:g}")
            try:
                out.append(Intervention(self.latent(run, item.get("latent")), item.get("mode"), float(value)))
            except ValueError as e:
                raise RequestError(400, str(e)) from None
        return out

    @torch.no_grad()
    def steer(self, prompt: object, run_name: object, interventions: object, n_new: object, temperature: object,
              seed: object) -> dict:
        """The prompt continued `n_new` tokens by the plain model and by the model with `interventions` at the run's
        hook, from the same seed: {prompt, unsteered, steered} (token display strings), plus the settings."""
        run = self.run(run_name)
        ivs = self.interventions(run, interventions)
        if not isinstance(n_new, int) or isinstance(n_new, bool) or not 1 <= n_new <= self.limits.max_new_tokens:
            raise RequestError(413 if isinstance(n_new, int) and n_new > self.limits.max_new_tokens else 400,
                               f"max_new_tokens {n_new!r}: give 1..{self.limits.max_new_tokens} "
                               f"(vsae serve --max-new-tokens)")
        if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not 0 <= temperature <= 10:
            raise RequestError(400, f"temperature {temperature!r}: give a number in 0..10 (0 is greedy)")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise RequestError(400, f"seed {seed!r}: give a non-negative integer")
        tokens = self.tokenize(prompt, "prompt", room=n_new)
        T = tokens.shape[1]

        def hooks(tok: Tensor) -> list:
            mask = counted_mask(tok, self.special)
            mask[0] = False  # row 0 is the plain model
            return [(run.hook_name, intervention_hook(run.sae, ivs, mask))]

        with self.lock:
            out = generate(self.model, tokens.repeat(2, 1), n_new, hooks, float(temperature), seed)
            shown, first = self._shown(tokens)
            plain, steered = (self.text(row[T:].cpu()) for row in out)
        return {"run": run.name, "prompt": shown, "unsteered": plain, "steered": steered,
                "interventions": [vars(iv) for iv in ivs], "temperature": temperature, "seed": seed}

    @torch.no_grad()
    def ablate(self, text: object, run_name: object, latent: object) -> dict:
        """The latent removed (clamped to 0, error term kept) on `text`: per shown token, its activation and the
        change in the next-token loss of predicting that token: {tokens, acts, loss, delta, mean_delta}."""
        run = self.run(run_name)
        latent = self.latent(run, latent)
        tokens = self.tokenize(text)
        mask = counted_mask(tokens, self.special)
        with self.lock:
            logits, cache = self.model.run_with_cache(tokens, names_filter=[run.hook_name], return_type="logits")
            x = cache[run.hook_name][0]
            hook = intervention_hook(run.sae, [Intervention(latent, "clamp", 0.0)], mask)
            ablated = self.model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(run.hook_name, hook)])
            shown, first = self._shown(tokens)
            acts = latent_values(run.sae.encode_topk(x), torch.tensor([latent]))[:, 0] * mask[0].to(x.dtype)
            ce = next_token_ce(log_probs(logits), tokens)[0]  # [T-1]: position t predicts token t+1
            delta = next_token_ce(log_probs(ablated), tokens)[0] - ce
        counted = mask[0, :-1]
        # Shown token j (position first + j) is predicted from position first + j - 1; the first token after BOS
        # is predicted from BOS, and a text without BOS has no prediction for its first token.
        start = first - 1
        pad = [None] * (-start if start < 0 else 0)
        loss = pad + [_round(v) for v in ce[max(start, 0):].tolist()]
        d = pad + [_round(v) for v in delta[max(start, 0):].tolist()]
        mean = float(delta[counted].double().mean()) if counted.any() else float("nan")
        return {"run": run.name, "latent": latent, "tokens": shown, "acts": [_round(v) for v in acts[first:].tolist()],
                "loss": loss, "delta": d, "mean_delta": _round(mean)}

    def search(self, query: object, limit: int) -> dict:
        """Latents by id or token across the runs (`SearchIndex.search`), each with its dashboard page."""
        if not isinstance(query, str) or not query.strip():
            raise RequestError(400, "search: give a token or a latent id")
        if len(query) > 200:
            raise RequestError(413, "search: a query is one token or id (at most 200 characters)")
        hits = self.index.search(query, limit)
        for hit in hits:
            hit["dashboard"] = self.dashboard_url(self.runs[hit["run"]], hit["latent"])
        return {"query": query, "hits": hits}
