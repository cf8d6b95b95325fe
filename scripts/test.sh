#!/usr/bin/env bash
# The whole test suite. Installs what the tests need when it is missing (Debian, as root), or says what to install.
# The tests start their own redis-server processes on free loopback ports; nothing else needs to be running.
set -euo pipefail
cd "$(dirname "$0")/.."

need_redis() {
    if command -v redis-server >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "redis-server is missing: installing Debian's redis-server"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
        # The package may start a system instance; the tests do not use it.
    else
        echo "redis-server is missing. Install it, e.g.: sudo apt-get install redis-server" >&2
        exit 1
    fi
}

need_redis
redis-server --version

if [ ! -d ../shared/traces ]; then
    echo "../shared/traces is missing: the replay tests read the real traces from there (see ../shared/traces/README.md)" >&2
    exit 1
fi

# Unit, integration and doc tests; benches are built and run once each in test mode.
cargo test --locked --all-targets
cargo test --locked --doc
