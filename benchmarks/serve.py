"""`vsae serve` latency: a 64-token test-text request and a 32-token steered generation (in-process TestClient).

    python benchmarks/serve.py                 # on runs/demo (from `vsae demo`) when present, else a built fixture
    python benchmarks/serve.py --demo DIR      # another demo directory (DIR/cache, DIR/sae/*, DIR/dashboards/*)

Without a demo directory the fixture has the demo's shapes: a random GPT-NeoX of the embedded model's size
(d_model 128, 4 layers, 4 heads, d_mlp 512, context 128, a byte-level BPE of up to 4096 tokens trained on the
`stdlib` corpus), a small cache of its middle residual stream, and two random TopK SAEs of 2048 latents, k 32, as
the demo trains. Each request is timed through the whole app (JSON in, JSON out), median of --repeats after one
warm-up. Targets on the 2-core CPU: test text under 300 ms, steered generation under 2 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.test_dashboards

from dashboards.serve import ServeConfig, create_app  # noqa: E402
from dashboards.serve_model import Explorer  # noqa: E402

TARGETS = {"test text": 0.300, "steered generation": 2.0}
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
        "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
        "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
        "other way.")


def demo_inputs(demo: Path) -> tuple[list[Path], Path, list[Path]] | None:
    """(runs, cache, dashboards) of a `vsae demo` directory, or None when it has none."""
    runs = sorted(p for p in (demo / "sae").glob("*") if (p / "cfg.json").is_file())
    if not runs or not (demo / "cache" / "manifest.json").is_file():
        return None
    dashboards = [demo / "dashboards" / r.name for r in runs if (demo / "dashboards" / r.name).is_dir()]
    return runs, demo / "cache", dashboards


def build_fixture(root: Path) -> tuple[list[Path], Path, list[Path]]:
    """A random model of the embedded model's shape, a small cache of it, two random SAEs of the demo's size."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from activations.corpus import corpus_documents
    from activations.harvest import HarvestConfig, harvest
    from activations.tiny_model import TinyModelConfig
    from activations.tokenizer import train_bpe
    from tests.test_dashboards import random_sae, save_run

    tm = TinyModelConfig()
    texts, n_chars = [], 0
    for doc in corpus_documents("stdlib"):
        texts.append(doc)
        n_chars += len(doc)
        if n_chars > 3_000_000:
            break
    tok = train_bpe(texts, vocab_size=tm.vocab_size)
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=tm.d_model, num_hidden_layers=tm.n_layers,
                        num_attention_heads=tm.n_heads, intermediate_size=tm.d_mlp, max_position_embeddings=tm.context,
                        rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu", bos_token_id=0,
                        eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model_dir = root / "model"
    GPTNeoXForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cache = root / "cache"
    harvest(HarvestConfig(out=str(cache), model_path=str(model_dir), corpus=["stdlib"], tokens=4096,
                          context=tm.context, progress=False))
    hook = f"blocks.{tm.n_layers // 2}.hook_resid_post"
    runs = [save_run(root / "sae" / name, random_sae(tm.d_model, 2048, 32, seed=i), hook, model=model_dir.name)
            for i, name in enumerate(("topk", "vsae"))]
    return runs, cache, []


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and caches
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="runs/demo", help="a `vsae demo` output directory")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from starlette.testclient import TestClient

    with tempfile.TemporaryDirectory() as tmp:
        found = demo_inputs(Path(args.demo))
        where = f"demo runs in {args.demo}" if found else "a built fixture of the demo's shapes (no runs/demo)"
        runs, cache, dashboards = found or build_fixture(Path(tmp))
        cfg = ServeConfig(cache=str(cache), dashboards=[str(d) for d in dashboards], device=args.device)
        t = time.perf_counter()
        explorer = Explorer.load(runs, cache, cfg.dashboards, args.device, cfg.limits())
        load = time.perf_counter() - t
        client = TestClient(create_app(explorer, cfg), base_url="http://127.0.0.1")
        tokenizer = explorer.model.tokenizer
        ids = tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(ids[: args.text_tokens])
        n_text = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        prompt = tokenizer.decode(ids[:16])
        run = next(iter(explorer.runs))

        def test_text() -> None:
            r = client.post("/api/activations", json={"text": text, "top": 5})
            assert r.status_code == 200, r.text

        def steer() -> None:
            r = client.post("/api/steer", json={"run": run, "prompt": prompt, "max_new_tokens": args.new_tokens,
                                                "interventions": [{"latent": 0, "mode": "add", "value": 10.0}]})
            assert r.status_code == 200, r.text

        results = {"test text": median_seconds(test_text, args.repeats),
                   "steered generation": median_seconds(steer, args.repeats)}
    print(f"vsae serve on {where}: {len(runs)} runs, model and SAEs loaded in {load:.2f}s, "
          f"{torch.get_num_threads()} torch threads, median of {args.repeats}")
    what = {"test text": f"{n_text}-token test text, {len(runs)} runs, top 5 per token",
            "steered generation": f"{args.new_tokens} tokens steered beside {args.new_tokens} unsteered, greedy"}
    for name, seconds in results.items():
        target = TARGETS[name]
        print(f"  {what[name]:60s} {seconds * 1000:8.1f} ms   target {target * 1000:.0f} ms   "
              f"{'ok' if seconds <= target else 'MISSED'} ({seconds / target:.2f} of the target)")


if __name__ == "__main__":
    main()
