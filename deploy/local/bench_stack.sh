#!/usr/bin/env bash
# Cold and warm `make up` time of the local stack, and its memory at rest.
#   cold: empty state dir and empty jar cache (temp dirs), so it includes the Maven fetch
#         (Maven's own ~/.m2 may be warm: the output says which);
#   warm: `down`, then `make up` again on the same dirs.
# Runs on its own ports (the usual ones + DHUB_BENCH_PORT_OFFSET, default 10000) so a dev
# stack can keep running; stops everything it started and deletes its temp dirs at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="$ROOT/.venv/bin/python"
STACK=("$PY" "$ROOT/deploy/local/stack.py")
off="${DHUB_BENCH_PORT_OFFSET:-10000}"
sample_s="${DHUB_BENCH_SAMPLE_S:-10}"

work="$(mktemp -d "${TMPDIR:-/tmp}/dhub-bench.XXXXXX")"
chmod 755 "$work"  # the postgres user (the server will not run as root) must reach its data
export DHUB_STATE_DIR="$work/state" DHUB_CACHE_DIR="$work/cache"
export DHUB_REDIS_PORT=$((6379 + off)) DHUB_REDIS_URL="redis://127.0.0.1:$((6379 + off))/0"
export DHUB_KAFKA_BOOTSTRAP="127.0.0.1:$((9092 + off))"
export DHUB_PREFECT_PORT=$((4200 + off)) DHUB_PREFECT_API_URL="http://127.0.0.1:$((4200 + off))/api"
export DHUB_API_PORT=$((8080 + off)) DHUB_POSTGRES_PORT=$((5433 + off))
unset DHUB_STACK_PARTS  # the whole stack

cleanup() {
    "${STACK[@]}" down >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# Kafka's controller listens on the broker port + 1.
for port in "$DHUB_REDIS_PORT" $((9092 + off)) $((9093 + off)) "$DHUB_PREFECT_PORT" "$DHUB_API_PORT" \
        "$DHUB_POSTGRES_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "bench: port $port is in use; set DHUB_BENCH_PORT_OFFSET to another offset" >&2
        exit 1
    fi
done

now() { date +%s.%N; }
# make up == setup.sh + stack.py up; time each half. Prints "setup_s up_s".
timed_up() {
    local t0 t1 t2
    t0=$(now)
    bash "$ROOT/deploy/local/setup.sh" >"$work/setup.out" 2>&1 || { cat "$work/setup.out"; exit 1; }
    t1=$(now)
    "${STACK[@]}" up >"$work/up.out" 2>&1 || { cat "$work/up.out"; exit 1; }
    t2=$(now)
    sed 's/^/    /' "$work/up.out" >&2
    awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "%.1f %.1f\n", b - a, c - b }'
}

kafka_version="$(sed -nE 's:.*<kafka.version>([^<]+)</kafka.version>.*:\1:p' "$ROOT/deploy/local/kafka/pom.xml")"
if [[ -d "$HOME/.m2/repository/org/apache/kafka/kafka_2.13/$kafka_version" ]]; then
    m2="warm (~/.m2 already holds kafka_2.13 $kafka_version: the fetch only copies jars)"
else
    m2="cold (~/.m2 lacks kafka_2.13 $kafka_version: the fetch downloads ~40 MB)"
fi

echo "bench: state and jar cache in $work, ports +$off; Maven ~/.m2 cache: $m2" >&2
echo "cold up:" >&2
cold="$(timed_up)"
read -r cold_setup cold_up <<<"$cold"
# What must survive a down/up: a Redis key (AOF), the topics (Kafka's log dirs), Prefect's
# rows (its PostgreSQL database): the work pool keeps its id.
"$PY" "$ROOT/deploy/local/survival.py" mark "$work/marker"
echo "warm up (after down):" >&2
"${STACK[@]}" down >/dev/null
warm="$(timed_up)"
read -r warm_setup warm_up <<<"$warm"
survived="$("$PY" "$ROOT/deploy/local/survival.py" check "$work/marker")"

# Memory at rest: sum of RSS of every process of every part (children included), sampled.
"$PY" - "$ROOT" "$sample_s" "$work/pids" <<'EOF' >"$work/mem"
import sys, time
sys.path.insert(0, sys.argv[1])  # the repository root, where the `deploy` package is
from core.settings import get_settings
from deploy.local.config import StackConfig
from deploy.local.parts import NAMES
from deploy.local.procs import members, read_pid
config = StackConfig(get_settings())

def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0

peak, per_part, seen, samples = 0, {}, set(), 0
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    total = 0
    for part in NAMES:
        pid = read_pid(config, part)
        procs = members(pid) if pid else set()
        kib, seen = sum(map(rss_kib, procs)), seen | procs
        per_part[part] = max(per_part.get(part, 0), kib)
        total += kib
    peak, samples = max(peak, total), samples + 1
    time.sleep(0.5)
open(sys.argv[3], "w").write(" ".join(map(str, sorted(seen))))
parts = ", ".join(f"{p} {k / 1024:.0f}" for p, k in per_part.items() if k)
print(f"{peak / 1024:.0f} MiB|{parts}|{samples}")
EOF
IFS='|' read -r mem_total mem_parts mem_samples <"$work/mem"

"${STACK[@]}" down >/dev/null
# Nothing may be left: every process seen while sampling must be gone (zombies count as gone).
left=""
for pid in $(cat "$work/pids"); do
    if [[ -r /proc/$pid/stat ]] && ! awk '{ exit ($0 ~ /\) Z /) ? 0 : 1 }' "/proc/$pid/stat"; then
        left+=" $pid"
    fi
done

printf '\n%-26s %8s %8s %8s\n' "make up" "setup" "stack up" "total"
awk -v s="$cold_setup" -v u="$cold_up" 'BEGIN { printf "%-26s %7.1fs %7.1fs %7.1fs\n", "cold (empty state+cache)", s, u, s + u }'
awk -v s="$warm_setup" -v u="$warm_up" 'BEGIN { printf "%-26s %7.1fs %7.1fs %7.1fs\n", "warm (down, then up)", s, u, s + u }'
printf '%-26s %s (peak of %s samples over %ss; MiB per part: %s)\n' "memory at rest" "$mem_total" "$mem_samples" "$sample_s" "$mem_parts"
printf '%-26s %s\n' "Maven ~/.m2" "$m2"
printf '%-26s %s\n' "data survived down/up" "$survived"
if [[ "$survived" != yes* ]]; then
    echo "bench: data did not survive down/up: $survived" >&2
    exit 1
fi
if [[ -n "$left" ]]; then
    echo "bench: processes left after down:$left" >&2
    exit 1
fi
printf '%-26s %s\n' "after down" "no stack process left"
