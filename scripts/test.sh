#!/usr/bin/env bash
# The whole test suite. Installs what the tests need when it is missing (Debian, as root), or says what to install.
# The tests start their own redis-server and prometheus processes on free loopback ports; nothing else needs to be
# running.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run: redis-server (every Redis test), redis-tools (redis-cli: the cluster tests join their
# nodes with `redis-cli --cluster create`), openssl (the rediss:// test's certificates),
# procps (the kill binary the fault tests stop and resume redis-server with; `type -P` skips the shell builtin) and
# prometheus (prometheus and promtool: tests/prometheus.rs checks the shipped rules and dashboard against it), and
# chromium, chromium-driver and a font (tests/ui.rs loads /internal/cache/ui in headless chromium through chromedriver
# and takes its screenshots).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
type -P kill >/dev/null 2>&1 || missing+=(procps)
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's ${missing[*]}"
        apt-get update -qq
        # The packages would start system instances (redis-server, prometheus on :9090); the tests start their own
        # on free ports, so keep the package scripts from starting services while they install.
        policy=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            policy=/usr/sbin/policy-rc.d
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
            printf '#!/bin/sh\nexit 101\n' > "$policy"
            chmod +x "$policy"
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        [ -z "$policy" ] || { rm -f "$policy"; trap - EXIT; }
    else
        echo "missing: ${missing[*]}. Install them, e.g.: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
redis-server --version
openssl version
prometheus --version 2>&1 | head -1
chromium --version 2>/dev/null || true
chromedriver --version | head -1

if [ ! -d ../shared/traces ]; then
    echo "../shared/traces is missing: the replay tests read the real traces from there (see ../shared/traces/README.md)" >&2
    exit 1
fi

# Unit, integration and doc tests with the default features (all of them: the binary needs `cli`); benches are
# built and run once each in test mode, and the examples are built (tests/integration.rs runs one).
# tests/integration.rs runs examples/existing_service as a program: `cargo test --all-targets` builds examples only
# as test harnesses, so build the program itself first.
cargo build --locked --example existing_service
cargo test --locked --all-targets
cargo test --locked --doc

# The feature sets a library user picks (docs/integration.md): each builds, and runs the library's own tests, its
# doctests, and the integration tests whose features it has (`redis`: the contract, registry and rollout suites).
for features in "" "replay" "redis" "redis,axum"; do
    echo "features: [${features}]"
    cargo test --locked --no-default-features --features "$features" --lib --tests
    cargo test --locked --no-default-features --features "$features" --doc
done
