# Sourced by the CI scripts that run mmserve as a child. Needs $bin (the binary), $tmp (a folder
# for logs) and the array pids (the children, for the caller's exit trap).

# serve PORT ARGS...: starts mmserve and waits until /health answers 200.
serve() {
  local p=$1
  shift
  "$bin" serve "$@" --port "$p" >"$tmp/$p.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 120); do
    if curl -sf "http://127.0.0.1:$p/health" >/dev/null; then return; fi
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then cat "$tmp/$p.log"; exit 1; fi
    sleep 0.5
  done
  echo "mmserve on port $p never became healthy"; cat "$tmp/$p.log"; exit 1
}
