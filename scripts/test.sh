#!/usr/bin/env bash
# Set up (first run) and run the lint and the test suite. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m slow` for the long tests: corpus download, full model build).
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh" test
ruff check .
python -m pytest "$@"
