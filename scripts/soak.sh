#!/usr/bin/env bash
# The soak under faults of tests/soak.rs, longer and in release: three instances of the reference service sharing one
# origin (a SQLite file) and one redis-server, then a Redis Cluster of six nodes, under a mixed load of reads and
# writes checked against a history, while a driver changes the rollout and breaks Redis every 3 seconds.
#
#   bash scripts/soak.sh [seconds on one Redis, default 600] [seconds on the cluster, default half of it]
#
# Loopback only, bounded in time (at most 3,600 s each). Every process it starts (redis-server, the instances) is
# its own, on free ports, and stopped at the end. Needs redis-server and redis-cli (scripts/test.sh installs them).
# CI runs the same test for 60 + 30 seconds, in debug, as part of scripts/test.sh. Fails if a request failed or a
# read was stale; prints requests, failures, stale reads, latency, rollbacks, RSS and series at start and end.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-600}
CLUSTER_SECS=${2:-$((SECS / 2))}
SOAK_SECS="$SECS" SOAK_CLUSTER_SECS="$CLUSTER_SECS" \
  cargo test --release --locked --test soak -- --nocapture --test-threads 1
