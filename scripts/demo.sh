#!/usr/bin/env bash
# Set up (first run) and run the whole vsae pipeline on the embedded default model and corpus.
# Extra arguments go to `vsae demo` (see `vsae demo --help`).
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh" ""
vsae demo "$@"
