#!/usr/bin/env bash
# Installs the system packages mmserve builds and tests with (Debian/Ubuntu):
# libjpeg-turbo's TurboJPEG library (JPEG decoding identical to Pillow's),
# pkg-config to find it, and python3-venv + curl for the OpenAI SDK check.
# Does nothing when they are already there.
set -euo pipefail
need=()
pkg-config --exists libturbojpeg 2>/dev/null || need+=(pkg-config libturbojpeg0-dev)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${need[@]}"
fi
