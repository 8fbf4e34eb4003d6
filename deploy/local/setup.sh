#!/usr/bin/env bash
# Prepares a machine for the local stack: the venv, the Kafka broker jars, redis-server,
# PostgreSQL, and (for the web page's test) headless Chromium with its driver.
# Idempotent and cheap when everything is already there (each step checks a stamp first).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
POM="$ROOT/deploy/local/kafka/pom.xml"
CACHE="${DHUB_CACHE_DIR:-$HOME/.cache/dhub}"
VENV="$ROOT/.venv"

die() { echo "setup: $*" >&2; exit 1; }
log() { echo "setup: $*"; }

# --- tools the stack cannot install itself -------------------------------------------------
command -v java >/dev/null || die "java not found: install a JDK >= 17 (Debian: apt-get install -y openjdk-17-jre-headless)"
java_major="$(java -version 2>&1 | sed -nE '1s/.*version "([0-9]+).*/\1/p')"
[[ "${java_major:-0}" -ge 17 ]] || die "java ${java_major:-?} found, Kafka 4 needs >= 17"
command -v cc >/dev/null || command -v gcc >/dev/null \
    || die "no C compiler: install gcc (Debian: apt-get install -y gcc); it builds core/_offsets_scan.c"
command -v mvn >/dev/null || die "mvn not found: install Maven (Debian: apt-get install -y maven); it fetches the Kafka jars"

# --- venv ------------------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    py="${PYTHON:-python3}"
    command -v "$py" >/dev/null || die "$py not found: install Python >= 3.11"
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$("$py" -V 2>&1) is too old: Python >= 3.11 needed (set PYTHON=/path/to/python3.11+)"
    log "creating $VENV"
    "$py" -m venv "$VENV"
fi
# The versions the suite last passed with, for the venv's Python if it has a file of them: a
# fresh machine then installs what was tested, not whatever was released since (a new redis-py
# once broke `make lint`). Elsewhere pyproject.toml's ranges alone decide.
pyver="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
pins="$ROOT/deploy/local/constraints-py$pyver.txt"
stamp="$VENV/.dhub-installed"
# The install also builds the project's C extension in place (core/_offsets_scan.c, gcc):
# again when its source changed, or its build is gone (a `git clean`).
scan_src="$ROOT/core/_offsets_scan.c"
scan_built="$(compgen -G "$ROOT/core/_offsets_scan.*.so" || true)"
if [[ ! -f "$stamp" || "$ROOT/pyproject.toml" -nt "$stamp" || ( -f "$pins" && "$pins" -nt "$stamp" ) \
      || -z "$scan_built" || "$scan_src" -nt "$stamp" ]]; then
    pinned=() versions="pyproject.toml's ranges (no pinned versions for Python $pyver)"
    if [[ -f "$pins" ]]; then
        pinned=(-c "$pins") versions="the pinned versions"
    fi
    log "installing the project into the venv at $versions (pyproject.toml, its pins or the C extension changed)"
    (cd "$ROOT" && "$VENV/bin/python" -m pip install -q "${pinned[@]}" -e '.[dev]')
    touch "$stamp"
fi

# --- Kafka jars from Maven Central, cached outside git -------------------------------------
kafka_version="$(sed -nE 's:.*<kafka.version>([^<]+)</kafka.version>.*:\1:p' "$POM")"
[[ -n "$kafka_version" ]] || die "cannot read <kafka.version> from $POM"
kdir="$CACHE/kafka-$kafka_version"
# The marker holds the pom's digest: a dependency added to the pom fetches the jars again.
pom_digest="$(sha256sum "$POM" | cut -d' ' -f1)"
if [[ "$(cat "$kdir/.complete" 2>/dev/null)" != "$pom_digest" ]]; then
    log "fetching Kafka $kafka_version jars into $kdir/libs (Maven; ~/.m2 makes repeats cheap)"
    rm -rf "$kdir/libs.tmp"
    mkdir -p "$kdir"
    mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$kdir/libs.tmp"
    # Swap in only a complete download, so an interrupted fetch is redone next time.
    rm -rf "$kdir/libs"
    mv "$kdir/libs.tmp" "$kdir/libs"
    echo "$pom_digest" >"$kdir/.complete"
fi

# --- redis-server --------------------------------------------------------------------------
if ! command -v redis-server >/dev/null; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing redis-server with apt-get"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server
        # Debian's package may start a system-wide Redis on 6379, which would shadow the
        # stack's own (its data dir, AOF); the stack only needs the binary.
        if command -v systemctl >/dev/null && systemctl is-active -q redis-server 2>/dev/null; then
            systemctl disable --now redis-server || true
        elif command -v service >/dev/null && service redis-server status >/dev/null 2>&1; then
            service redis-server stop || true
        fi
    else
        die "redis-server not found: install it (Debian/Ubuntu: sudo apt-get update && sudo apt-get install -y redis-server; macOS: brew install redis)"
    fi
fi

# --- PostgreSQL server (Prefect's database) --------------------------------------------------
pg_initdb() { ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true; }
if [[ -z "$(pg_initdb)" ]] && ! command -v initdb >/dev/null; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing postgresql with apt-get"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
        # Debian may start its default cluster on 5432; the stack runs its own instance.
        if command -v pg_lsclusters >/dev/null; then
            pg_lsclusters -h | awk '$4 == "online" { print $1, $2 }' | while read -r v c; do
                pg_ctlcluster "$v" "$c" stop || true
            done
        fi
    else
        die "PostgreSQL server not found: install it (Debian/Ubuntu: sudo apt-get install -y postgresql; macOS: brew install postgresql)"
    fi
fi

# --- headless Chromium and its driver (tests/test_ui.py drives the web page with them) -----
# Only the tests need them, so without root or apt this warns instead of failing the stack.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing chromium and chromium-driver with apt-get (for the web page's test)"
        # No recommends (the printer, notification and portal packages a desktop wants); apt's
        # chatter goes to a file, shown only when the install fails.
        apt_log="$(mktemp)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends chromium chromium-driver fonts-liberation; } >"$apt_log" 2>&1 \
            || { cat "$apt_log" >&2; rm -f "$apt_log"; die "apt-get could not install chromium"; }
        rm -f "$apt_log"
    else
        log "warning: chromium/chromedriver not found; tests/test_ui.py needs them (Debian/Ubuntu: sudo apt-get install -y chromium chromium-driver)" >&2
    fi
fi

pg="$(pg_initdb)"; pg="${pg:-$(command -v initdb)}"
log "ok (venv: $VENV, kafka jars: $kdir/libs, redis: $(command -v redis-server), postgres: $(dirname "$pg"), chromium: $(command -v chromium || echo none))"
