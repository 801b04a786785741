#!/usr/bin/env bash
# Installs the system packages mmserve builds and tests with (Debian/Ubuntu):
# libjpeg-turbo's TurboJPEG library (JPEG decoding identical to Pillow's),
# pkg-config to find it, python3-venv + curl for the OpenAI SDK check, and
# Chromium for the playground's browser check.
# Does nothing when they are already there.
set -euo pipefail
need=()
pkg-config --exists libturbojpeg 2>/dev/null || need+=(pkg-config libturbojpeg0-dev)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v curl >/dev/null || need+=(curl)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
