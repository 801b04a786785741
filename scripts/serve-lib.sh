# Sourced by the CI scripts that run mmserve as a child, from the repository root: builds the
# binary ($bin), makes a folder for logs ($tmp) and kills the children (pids) on exit.
cargo build --locked --bin mmserve
bin="${CARGO_TARGET_DIR:-target}/debug/mmserve"
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"' EXIT

# venv_with MODULE PIP_SPEC: makes .venv-ci if needed and installs PIP_SPEC there unless MODULE
# imports already.
venv_with() {
  [ -x .venv-ci/bin/python ] || python3 -m venv .venv-ci
  .venv-ci/bin/python -c "import $1" 2>/dev/null || .venv-ci/bin/pip install -q "$2"
}

# serve PORT ARGS...: starts mmserve and waits until /ready answers 200 (loaded and warmed up).
serve() {
  local p=$1
  shift
  "$bin" serve "$@" --port "$p" >"$tmp/$p.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 120); do
    if curl -sf "http://127.0.0.1:$p/ready" >/dev/null; then return; fi
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then cat "$tmp/$p.log"; exit 1; fi
    sleep 0.5
  done
  echo "mmserve on port $p never became ready"; cat "$tmp/$p.log"; exit 1
}
