#!/usr/bin/env bash
# benches/migration.sh: measures live migration with a release build of `ferry serve`, images
# on /dev/shm, and prints a markdown table; the numbers also go to target/bench/migration.json.
#
#  (a) bulk copy rate of an idle 1 GiB volume holding 512 MiB of random data (every other MiB
#      a hole) to a new file target, against `cp --sparse=always` of the same image;
#  (b) cutover pause (median, max) over 20 cutovers of an idle 64 MiB volume migrated back
#      and forth between two files;
#  (c) 4 KiB random-write IOPS and p99 latency (`ferry bench`, qd 32, 5 s) without migration,
#      and during an active and a background migration, GUEST_ROUNDS rounds (default 3):
#      medians, and the median of the same-round ratios to no migration (skipped when
#      `ferry bench` fails).
#
# Usage: bash benches/migration.sh   (needs python3 for the JSON handling)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=$ROOT/target/bench
OUT_JSON=$OUT_DIR/migration.json
mkdir -p "$OUT_DIR"

echo "building ferry (release)..." >&2
cargo build --release -p ferry --quiet
FERRY=${FERRY:-$ROOT/target/release/ferry}

WORK=$(mktemp -d /dev/shm/ferry-bench.XXXXXX)
SERVE_PID=
cleanup() {
    if [ -n "$SERVE_PID" ]; then kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

CTL=$WORK/ctl.sock
MIB=$((1 << 20))

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.4f}')" "$1" "$2"; }

# make_image PATH SIZE_MIB DATA_STEP_MIB: random 1 MiB pieces every DATA_STEP_MIB, holes between.
make_image() {
    python3 - "$1" "$2" "$3" <<'EOF'
import os, sys
path, size_mib, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "wb") as f:
    f.truncate(size_mib << 20)
    for mib in range(0, size_mib, step):
        f.seek(mib << 20)
        f.write(os.urandom(1 << 20))
EOF
}

migrate() { "$FERRY" migrate "$1" --control "$CTL" "${@:2}"; }

# job_field ID FIELD: one field of a job's status.
job_field() {
    migrate status --job "$1" --json | python3 -c "import json,sys; v=json.load(sys.stdin)[0]['$2']; print('' if v is None else v)"
}

# wait_state ID STATE: polls until the job is in STATE (fails if it ends otherwise); no
# python per poll, so the poll interval stays a few milliseconds.
wait_state() {
    local status
    for _ in $(seq 1 30000); do
        status=$(migrate status --job "$1" --json)
        [[ $status == *"\"state\":\"$2\""* ]] && return 0
        if [[ $status == *'"state":"completed"'* || $status == *'"state":"failed"'* || $status == *'"state":"cancelled"'* ]]; then
            echo "job $1 ended: $status" >&2
            return 1
        fi
        sleep 0.002
    done
    echo "job $1 never reached $2" >&2
    return 1
}

start_job() { migrate start --json "$@" | python3 -c "import json,sys; print(json.load(sys.stdin)['job'])"; }

# --- the daemon: a 1 GiB volume and a 64 MiB volume -----------------------------------------
echo "creating images on $WORK..." >&2
make_image "$WORK/big.img" 1024 2
make_image "$WORK/small-a.img" 64 1
RUST_LOG=warn "$FERRY" serve --control "$CTL" \
    --volume "name=big,path=$WORK/big.img,socket=$WORK/big.sock" \
    --volume "name=small,path=$WORK/small-a.img,socket=$WORK/small.sock" \
    >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 500); do [ -S "$CTL" ] && break; sleep 0.01; done
[ -S "$CTL" ] || { cat "$WORK/serve.log" >&2; exit 1; }

# --- (a) bulk copy rate vs cp --sparse=always -------------------------------------------------
# BULK_ROUNDS rounds, each one cp and one ferry copy of the same image (the copy job is
# cancelled once ready, so the volume stays on its source); the ratio is the median of the
# per-round ratios, so the machine's load moves both sides of each ratio alike.
BULK_ROUNDS=${BULK_ROUNDS:-5}
cp_once() {
    local t0 t1
    t0=$(now); cp --sparse=always "$WORK/big.img" "$WORK/cp.img"; t1=$(now)
    rm -f "$WORK/cp.img"
    elapsed "$t0" "$t1"
}
ferry_once() {
    local t0 t1 job
    rm -f "$WORK/big-dst.img"
    t0=$(now)
    job=$(start_job --volume big --target "$WORK/big-dst.img")
    wait_state "$job" ready
    t1=$(now)
    COPIED=$(job_field "$job" copied_bytes)
    migrate cancel --job "$job" >/dev/null
    rm -f "$WORK/big-dst.img"
    FERRY_ONCE_S=$(elapsed "$t0" "$t1")
}
CP_ALL=() FERRY_ALL=()
for round in $(seq 1 "$BULK_ROUNDS"); do
    CP_ALL+=("$(cp_once)")
    ferry_once
    FERRY_ALL+=("$FERRY_ONCE_S")
    echo "(a) round $round: ferry $COPIED bytes in $FERRY_ONCE_S s; cp --sparse=always ${CP_ALL[-1]} s" >&2
done

# --- (b) cutover pauses -----------------------------------------------------------------------
make_image "$WORK/small-b.img" 64 64 # exists, full size: a target that is copied over
PAUSES=()
for i in $(seq 1 20); do
    if [ $((i % 2)) = 1 ]; then dst=$WORK/small-b.img; else dst=$WORK/small-a.img; fi
    JOB=$(start_job --volume small --target "$dst")
    wait_state "$JOB" ready
    PAUSES+=("$(migrate cutover --job "$JOB" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['pause_us'])")")
done
echo "(b) cutover pauses (us): ${PAUSES[*]}" >&2

# --- (c) guest random-write IOPS during migration ---------------------------------------------
# GUEST_ROUNDS rounds of: no migration, an active one, a background one (same-round ratios).
GUEST_ROUNDS=${GUEST_ROUNDS:-3}
# bench_json FILE: runs ferry bench on the big volume into FILE, or fails.
bench_json() {
    "$FERRY" bench --socket "$WORK/big.sock" --rw randwrite --bs 4K --qd 32 --secs 5 --json >"$1" 2>"$WORK/bench.err"
}
BENCH_SKIPPED=
for round in $(seq 1 "$GUEST_ROUNDS"); do
    if ! bench_json "$WORK/guest-none-$round.json"; then
        BENCH_SKIPPED="ferry bench failed: $(tr '\n' ' ' <"$WORK/bench.err")"
        echo "(c) skipped: $BENCH_SKIPPED" >&2
        break
    fi
    for mode in active background; do
        rm -f "$WORK/big-dst2.img"
        # Limited so that the copy (and the background drain) lasts the whole run.
        JOB=$(start_job --volume big --target "$WORK/big-dst2.img" --mode "$mode" --max-speed 64M)
        bench_json "$WORK/guest-$mode-$round.json" || { cat "$WORK/bench.err" >&2; exit 1; }
        state=$(job_field "$JOB" state)
        migrate cancel --job "$JOB" >/dev/null || true
        echo "(c) round $round, $mode: job was $state at the end of the run" >&2
    done
done

# --- report -----------------------------------------------------------------------------------
export COPIED BENCH_SKIPPED OUT_JSON GUEST_ROUNDS WORK
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
RUN_DATE=$(date -u +%Y-%m-%d)
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
export COMMIT RUN_DATE LOAD_AFTER
export PAUSES_TEXT="${PAUSES[*]}" CP_ALL_TEXT="${CP_ALL[*]}" FERRY_ALL_TEXT="${FERRY_ALL[*]}"
python3 - <<'EOF'
import json, os, statistics

def find(obj, words):
    """The first number under a key containing all `words` (ferry bench's JSON, any nesting)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if all(w in k.lower() for w in words) and isinstance(v, (int, float)):
                return v
        for v in obj.values():
            r = find(v, words)
            if r is not None:
                return r
    if isinstance(obj, list):
        for v in obj:
            r = find(v, words)
            if r is not None:
                return r
    return None

env = os.environ
mib = 1 << 20
copied = int(env["COPIED"])
ferry_all = [float(x) for x in env["FERRY_ALL_TEXT"].split()]
cp_all = [float(x) for x in env["CP_ALL_TEXT"].split()]
ferry_s, cp_s = statistics.median(ferry_all), statistics.median(cp_all)
ratios = [c / f for c, f in zip(cp_all, ferry_all)]
ratio = statistics.median(ratios)
data_bytes = 512 * mib
pauses = [int(p) for p in env["PAUSES_TEXT"].split()]
report = {
    "bulk_copy": {
        "volume_bytes": 1024 * mib,
        "data_bytes": data_bytes,
        "ferry_copied_bytes": copied,
        "ferry_s": ferry_s,
        "ferry_data_mib_per_s": data_bytes / mib / ferry_s,
        "cp_sparse_s": cp_s,
        "cp_data_mib_per_s": data_bytes / mib / cp_s,
        "ferry_s_all": ferry_all,
        "cp_sparse_s_all": cp_all,
        "ratio_ferry_to_cp_per_round": ratios,
        "ratio_ferry_to_cp": ratio,
    },
    "cutover_pause_us": {
        "count": len(pauses),
        "median": statistics.median(pauses),
        "max": max(pauses),
        "all": pauses,
    },
}
rows = [
    (f"bulk copy, idle 1 GiB (512 MiB data): ferry, median of {len(ferry_all)}", f"{data_bytes / mib / ferry_s:.0f} MiB/s ({ferry_s:.3f} s)"),
    (f"bulk copy: cp --sparse=always, median of {len(cp_all)}", f"{data_bytes / mib / cp_s:.0f} MiB/s ({cp_s:.3f} s)"),
    ("bulk copy: ferry / cp (median of per-round rate ratios, min..max)", f"{ratio:.2f} ({min(ratios):.2f}..{max(ratios):.2f})"),
    ("cutover pause, 20 cutovers: median", f"{statistics.median(pauses):.0f} µs"),
    ("cutover pause: max", f"{max(pauses)} µs"),
]
if env.get("BENCH_SKIPPED"):
    report["guest_randwrite"] = {"skipped": env["BENCH_SKIPPED"]}
    rows.append(("4k randwrite during migration", "skipped: " + env["BENCH_SKIPPED"][:80]))
else:
    guest = {}
    rounds = int(env["GUEST_ROUNDS"])
    runs = {name: [json.load(open(f"{env['WORK']}/guest-{name}-{r}.json")) for r in range(1, rounds + 1)]
            for name in ("none", "active", "background")}
    for name, raws in runs.items():
        iops = [find(raw, ["iops"]) for raw in raws]
        p99 = [find(raw, ["p99"]) for raw in raws]
        ratios = [i / n for i, n in zip(iops, [find(raw, ["iops"]) for raw in runs["none"]])]
        guest[name] = {"iops_median": statistics.median(iops), "p99_median": statistics.median(p99),
                       "ratio_to_none_median": statistics.median(ratios), "iops_all": iops,
                       "p99_all": p99, "ratio_to_none_all": ratios, "raw": raws}
        label = {"none": "no migration", "active": "active migration", "background": "background migration"}[name]
        ratio = "" if name == "none" else (f"; {statistics.median(ratios):.2f}x of no migration"
                                           f" ({min(ratios):.2f}..{max(ratios):.2f})")
        rows.append((f"4k randwrite qd32, {label}, median of {rounds}",
                     f"{statistics.median(iops):,.0f} IOPS, p99 {statistics.median(p99):,.0f} µs{ratio}"))
    report["guest_randwrite"] = guest
with open(env["OUT_JSON"], "w") as f:
    json.dump(report, f, indent=2)
lines = ["| measurement | result |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
print("\n".join(lines))
print(f"\n(JSON: {env['OUT_JSON']})")
# The table for docs/BENCHMARKS.md (benches/report.py puts it in its place).
with open(os.path.join(os.path.dirname(env["OUT_JSON"]), "migration-table.md"), "w") as f:
    f.write("\n".join(lines) + "\n\n")
    f.write(f"Build of commit {env['COMMIT']} ({env['RUN_DATE']}); load average after the run: "
            f"{env['LOAD_AFTER']}.\n")
EOF
