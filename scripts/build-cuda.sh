#!/usr/bin/env bash
# Builds mmserve with the `cuda` feature on a machine with no CUDA toolkit and no GPU.
#
#   scripts/build-cuda.sh [OUT]     OUT: where the binary goes (default target/cuda/mmserve-cuda)
#
# nvcc, the CUDA headers and the libraries the binary links (cuBLAS, cuRAND, NVRTC, cudart) come
# from NVIDIA's PyPI wheels, unpacked into .cuda-toolkit/ (git-ignored; about 1.2 GB, once).
# The versions are CUDA 13.0: the lent GPU machines run driver 580 (CUDA 13.0), which cannot load
# PTX from a newer toolkit, and they carry CUDA 13 libraries in their Python environment.
# libcuda.so belongs to the driver, which is not on PyPI: the link uses a stub with the driver
# API's symbol names (made from cudarc's bindings) and the soname libcuda.so.1, as the CUDA
# toolkit's own stubs/libcuda.so does; at run time the driver's real library is loaded.
#
# Environment: PYTHON (a python3 with pip; default python3), CUDA_COMPUTE_CAP (default 90,
# Hopper), CARGO_TARGET_DIR (default target/cuda, apart from the CPU build).
# The binary needs LD_LIBRARY_PATH to hold the CUDA 13 libraries at run time; scripts/gpu-check.sh
# finds them in the GPU machine's Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CUDA_VERSION=13.0
TOOLKIT=$PWD/.cuda-toolkit
CUDA_HOME=$TOOLKIT/nvidia/cu13
OUT=${1:-target/cuda/mmserve-cuda}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
WHEELS=(
  "nvidia-cuda-nvcc==$CUDA_VERSION.*" "nvidia-nvvm==$CUDA_VERSION.*"
  "nvidia-cuda-crt==$CUDA_VERSION.*" "nvidia-cuda-runtime==$CUDA_VERSION.*"
  "nvidia-cuda-cccl==$CUDA_VERSION.*" "nvidia-cuda-nvrtc==$CUDA_VERSION.*"
  "nvidia-cublas==$CUDA_VERSION.*" "nvidia-curand"
)

# The toolkit, from the wheels (unpacked, not installed: only their files are needed).
install_toolkit() {
  [ -x "$CUDA_HOME/bin/nvcc" ] && [ -d "$CUDA_HOME/include/nv" ] && return
  local wheels=$TOOLKIT/wheels
  mkdir -p "$wheels"
  "$PYTHON" -m pip download --quiet --no-deps --dest "$wheels" "${WHEELS[@]}"
  for w in "$wheels"/*.whl; do "$PYTHON" -m zipfile -e "$w" "$TOOLKIT"; done
  chmod +x "$CUDA_HOME"/bin/* "$CUDA_HOME"/nvvm/bin/*
  rm -rf "$wheels"
}

# Unversioned names for the linker, and the driver stub.
link_dir() {
  local dir=$TOOLKIT/link lib
  mkdir -p "$dir"
  for lib in cublas cublasLt curand nvrtc cudart; do
    ln -sf "$(ls "$CUDA_HOME"/lib/lib$lib.so.* | grep -v builtins | grep -v '\.alt\.' | head -n1)" \
      "$dir/lib$lib.so"
  done
  local cudarc
  cudarc=$(cargo metadata --locked --format-version 1 --features cuda |
    "$PYTHON" -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
  grep -rhoE 'fn cu[A-Z][A-Za-z0-9_]*' "$(dirname "$cudarc")/src/driver/sys" | sort -u |
    awk '{print "void " $2 "(void) {}"}' >"$dir/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 "$dir/cuda_stub.c" -o "$dir/libcuda.so"
  echo "$dir"
}

install_toolkit
"$CUDA_HOME/bin/nvcc" --version | tail -n2
LINK=$(link_dir)
export PATH=$CUDA_HOME/bin:$PATH CUDA_ROOT=$CUDA_HOME CUDA_PATH=$CUDA_HOME
export RUSTFLAGS="${RUSTFLAGS:-} -L $LINK"
cargo build --release --locked --features cuda
mkdir -p "$(dirname "$OUT")"
strip -o "$OUT" "$CARGO_TARGET_DIR/release/mmserve"
ls -l "$OUT"
