# Sourced by bench/run.sh and bench/quantize.sh: starts and stops the mmserve under test.
# Uses the caller's $out (holding the mmserve binary measured) and $port; sets $server.

server=""
trap '[ -z "$server" ] || kill "$server" 2>/dev/null || true' EXIT

# start_mmserve LOG ARGS...: `mmserve serve ARGS` on $port, logging to LOG; returns once /ready
# answers (up to 5 minutes: quantizing at load takes a while), exits with the log if it dies.
start_mmserve() {
  local log=$1
  shift
  "$out/mmserve" serve --port "$port" "$@" >"$log" 2>&1 &
  server=$!
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null && return 0
    kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.5
  done
  echo "mmserve not ready after 5 minutes; see $log" >&2
  exit 1
}

stop_mmserve() {
  kill "$server"
  wait "$server" || true
  server=""
}
