#!/usr/bin/env bash
# Starts mmserve on its embedded demo models and drives the playground page at / in headless
# Chromium (tests/browser/playground_check.py): upload an example image, ask "Describe the
# image.", and see the streamed caption; rank the examples on the embeddings tab. About half a
# minute. Installs Playwright (the Python package; it drives Debian's chromium, no browser
# download) into .venv-ci on first use. --screenshot PNG saves the page after the answer.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/serve-lib.sh
venv_with playwright "playwright==1.65.2"
port=${MMSERVE_PLAYGROUND_PORT:-18447}

serve "$port"
timeout 180 .venv-ci/bin/python tests/browser/playground_check.py "http://127.0.0.1:$port" models/demo/examples "$@"
