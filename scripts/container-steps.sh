#!/usr/bin/env bash
# The install and build steps of the container images, in one place: the Dockerfiles run them
# (so the image is built by exactly these steps), and this machine or CI can run them without a
# Docker engine to prove them.
#
#   container-steps.sh build-deps          packages the build stage needs (apt)
#   container-steps.sh build [CARGO ARGS]  the release binary (extra args, e.g. --features cuda)
#   container-steps.sh runtime-deps        packages the run stage needs (apt)
#   container-steps.sh user                the non-root user mmserve (uid and gid 10001)
#   container-steps.sh check BINARY        without installing anything: every package name of
#                                          both stages resolves in apt, and every shared library
#                                          BINARY links comes from a runtime package or the
#                                          slim base image
set -euo pipefail

# Packages, for Debian bookworm (the rust and debian:bookworm-slim images) and Ubuntu (the CUDA
# images).
BUILD_PACKAGES=(ca-certificates curl pkg-config libturbojpeg0-dev)
RUNTIME_PACKAGES=(ca-certificates curl libturbojpeg0)
# Ubuntu names TurboJPEG's runtime package libturbojpeg.
ubuntu_names() {
  if [ "$(. /etc/os-release && echo "$ID")" = ubuntu ]; then RUNTIME_PACKAGES[2]=libturbojpeg; fi
}
ubuntu_names
# Libraries' packages already in debian:bookworm-slim (and the CUDA runtime images).
BASE_PACKAGES=(libc6 libgcc-s1 libstdc++6 zlib1g)
USER_ID=10001

apt_install() {
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@"
}

# The Debian package that installed the shared library at path $1.
owner() {
  local p
  for p in "$1" "$(readlink -f "$1")" "/usr$1"; do
    if dpkg -S "$p" 2>/dev/null | head -n1 | cut -d: -f1; then return; fi
  done
  echo "?"
}

check() {
  local bin=$1 ok=1 lib path pkg
  echo "apt resolves: ${BUILD_PACKAGES[*]} ${RUNTIME_PACKAGES[*]}"
  local all=("${BUILD_PACKAGES[@]}" "${RUNTIME_PACKAGES[@]}")
  apt-get install -s -qq "${all[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -s -qq "${all[@]}" >/dev/null; }
  while read -r lib path; do
    pkg=$(owner "$path")
    if [[ " ${RUNTIME_PACKAGES[*]} ${BASE_PACKAGES[*]} " == *" $pkg "* ]]; then
      echo "  $lib: $pkg"
    else
      echo "  $lib: $pkg, which the run stage does not install"
      ok=0
    fi
  done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}')
  [ "$ok" = 1 ] || { echo "the run stage lacks a library $bin needs"; exit 1; }
  echo "container steps: every library $bin links is in the run stage"
}

case "${1:-}" in
  build-deps) apt_install "${BUILD_PACKAGES[@]}" ;;
  build) shift && cargo build --release --locked --bin mmserve "$@" ;;
  runtime-deps) apt_install "${RUNTIME_PACKAGES[@]}" ;;
  user)
    groupadd --system --gid "$USER_ID" mmserve
    useradd --system --uid "$USER_ID" --gid "$USER_ID" --no-create-home --shell /usr/sbin/nologin mmserve
    ;;
  check) check "${2:?check needs the binary}" ;;
  *) sed -n '2,13p' "$0" >&2 && exit 2 ;;
esac
