#!/usr/bin/env bash
# Load figures of docs/performance.md: the reference service under a bounded loopback load, with caching disabled,
# observing, serving `user` from Redis, and serving while Redis is stopped (SIGSTOP) for 3 seconds.
#
#   bash scripts/load.sh [seconds per case, default 10] [concurrency, default 32] [origin delay ms, default 1]
#
# Starts its own redis-server and service on free loopback ports and stops them on exit. Needs redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
CONC=${2:-32}
DELAY=${3:-1}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release --quiet --bin cache-rollout --example load
TMP=$(mktemp -d)
RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" >"$TMP/redis.log" 2>&1 &
RPID=$!
SPID=
cleanup() {
  kill -CONT "$RPID" 2>/dev/null || true
  [ -n "$SPID" ] && kill "$SPID" 2>/dev/null || true
  kill "$RPID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
for _ in $(seq 1 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

# run_case LABEL PAUSE(yes|no) ENV...
run_case() {
  local label=$1 pause=$2; shift 2
  local sport; sport=$(free_port)
  env "$@" BIND_ADDR="127.0.0.1:$sport" REDIS_URL="redis://127.0.0.1:$RPORT" RUST_LOG=warn \
    ./target/release/cache-rollout serve --origin-delay-ms "$DELAY" >"$TMP/$label.log" 2>&1 &
  SPID=$!
  for _ in $(seq 1 100); do curl -sf "127.0.0.1:$sport/health" >/dev/null && break; sleep 0.1; done
  redis-cli -p "$RPORT" flushall >/dev/null
  if [ "$pause" = yes ]; then
    ( sleep 3; kill -STOP "$RPID"; sleep 3; kill -CONT "$RPID" ) &
  fi
  ./target/release/examples/load --url "http://127.0.0.1:$sport" --duration-secs "$SECS" \
    --concurrency "$CONC" --keys 1000 --label "$label"
  if [ "$pause" = yes ]; then
    wait $! 2>/dev/null || true
    echo "rollbacks during the run:"
    curl -s "127.0.0.1:$sport/metrics" | grep '^cache_rollback_total' || echo "  none"
  fi
  kill "$SPID"; wait "$SPID" 2>/dev/null || true; SPID=
}

run_case disabled no FEATURE_CACHE=false
run_case observe no CACHE_IMPL=null
run_case serve no CACHE_IMPL=redis CACHE_PATTERNS=user
run_case serve_redis_paused yes CACHE_IMPL=redis CACHE_PATTERNS=user CACHE_ROLLOUT_CACHE__ROLLBACK__COOLDOWN_SECS=2
