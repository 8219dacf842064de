# Sourced by demo.sh and test.sh: create .venv if missing and install vsae into it,
# skipping the install when pyproject.toml, constraints.txt and the extras are unchanged.
# torch comes first as `torch==2.13.0`: on this kind of machine that takes a local CPU
# wheel, while any other spec downloads a multi-GB CUDA build. constraints.txt then
# keeps it (and pins every other package to the versions vsae was tested with).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VSAE_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
PY="$(command -v python3.11 || command -v python3)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$VENV/.vsae-installed" 2>/dev/null)" != "$STAMP" ]; then
  echo "installing vsae${EXTRAS:+[$EXTRAS]} into $VENV (first run: about 3 minutes)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
  echo "$STAMP" > "$VENV/.vsae-installed"
fi
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
