#!/usr/bin/env bash
# Run the OpenAI-compatible server (grpo_ds/serve.py) in the background.
#
#   bash scripts/serve.sh start MODEL [--port N] [--host ADDR] [more flags of scripts/serve.py]
#   bash scripts/serve.sh status      # "running (pid P, port N)" and exit 0, or "not running" and exit 3
#   bash scripts/serve.sh stop
#
# The pid, port and log live in ${GRPO_DS_SERVE_DIR:-runs/serve} (server.pid, server.port, server.log), runs/ being the
# repository's whatever the current directory. `start` returns once /health answers, or fails with the log's tail
# after ${GRPO_DS_SERVE_WAIT:-180} s or as soon as the server exits.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$root/.venv/bin/python"
[ -x "$python" ] || python="python3"
dir="${GRPO_DS_SERVE_DIR:-$root/runs/serve}"
pid_file="$dir/server.pid"
port_file="$dir/server.port"
log_file="$dir/server.log"

usage() {
  echo "usage: serve.sh start MODEL [--port N] [--host ADDR] [flags] | stop | status" >&2
  exit 2
}

# The server's pid when the pid file names a live grpo_ds server (not a recycled pid), else nothing.
live_pid() {
  [ -f "$pid_file" ] || return 0
  local pid
  pid="$(cat "$pid_file")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && ps -p "$pid" -o args= | grep -q "scripts/serve.py"; then
    echo "$pid"
  fi
}

health() {  # exit 0 when http://HOST:PORT/health answers 200
  "$python" - "$1" "$2" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/health", timeout=2).read()
except Exception:
    sys.exit(1)
PY
}

start() {
  [ $# -ge 1 ] || usage
  local model="$1"
  shift
  local port=8000 host=127.0.0.1 args=("$@")
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port="${2:?--port needs a number}"; shift 2 ;;
      --port=*) port="${1#--port=}"; shift ;;
      --host) host="${2:?--host needs an address}"; shift 2 ;;
      --host=*) host="${1#--host=}"; shift ;;
      *) shift ;;
    esac
  done
  local pid
  pid="$(live_pid)"
  if [ -n "$pid" ]; then
    echo "error: already running (pid $pid, port $(cat "$port_file" 2>/dev/null)); run 'serve.sh stop' first" >&2
    exit 1
  fi
  mkdir -p "$dir"
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" nohup "$python" "$root/scripts/serve.py" "$model" "${args[@]}" \
    >"$log_file" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pid_file"
  echo "$port" >"$port_file"
  # /health is polled on loopback when the server binds every address.
  local probe="$host"
  [ "$host" = "0.0.0.0" ] && probe=127.0.0.1
  local wait_s="${GRPO_DS_SERVE_WAIT:-180}" waited=0
  while ! health "$probe" "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pid_file" "$port_file"
      echo "error: the server exited during start; last lines of $log_file:" >&2
      tail -n 20 "$log_file" >&2
      exit 1
    fi
    if [ "$waited" -ge "$wait_s" ]; then
      kill "$pid" 2>/dev/null || true
      rm -f "$pid_file" "$port_file"
      echo "error: /health did not answer within ${wait_s} s (GRPO_DS_SERVE_WAIT); stopped it; last lines of $log_file:" >&2
      tail -n 20 "$log_file" >&2
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "running (pid $pid, port $port): http://$probe:$port/v1  log: $log_file"
}

stop() {
  local pid
  pid="$(live_pid)"
  if [ -z "$pid" ]; then
    rm -f "$pid_file" "$port_file"
    echo "not running"
    return 0
  fi
  kill "$pid"
  for _ in $(seq 1 30); do  # uvicorn finishes requests in flight for up to 5 s, then exits
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file" "$port_file"
  echo "stopped (pid $pid)"
}

status() {
  local pid
  pid="$(live_pid)"
  if [ -n "$pid" ]; then
    echo "running (pid $pid, port $(cat "$port_file" 2>/dev/null))"
    return 0
  fi
  if [ -f "$pid_file" ]; then
    rm -f "$pid_file" "$port_file"
    echo "not running (removed a stale pid file)"
  else
    echo "not running"
  fi
  exit 3
}

[ $# -ge 1 ] || usage
command="$1"
shift
case "$command" in
  start) start "$@" ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
