#!/usr/bin/env bash
# benches/mirror_cost.sh: the guest's cost of migrating its volume. 4 KiB random writes at QD 32
# (`ferry bench`, SECS seconds each) on a 1 GiB volume (512 MiB of random data, every other MiB
# a hole) of a release `ferry serve`, images on /dev/shm, in ROUNDS rounds; each round runs,
# one after another:
#   none        no migration;
#   background  a background migration to a new file (writes only mark chunks dirty);
#   active      an active migration to a new file (each write is also written to the target
#               from the volume queue's own ring: a leg);
#   active-nbd  an active migration to a second `ferry serve` exporting a 1 GiB file over
#               NBD with TLS 1.3 on loopback (`--nbd-listen 127.0.0.1:PORT --tls-creds`,
#               volume `nbd=rw`; certificates made here with openssl);
#   nbd-alone   for reference, no migration: the same writes sent straight to that NBD
#               server by `ferry bench --nbd nbds://...` (one TLS connection, QD 32), the
#               most an active mirror to it could reach.
# Every migration is limited to 64 MiB/s, so that its bulk copy lasts the whole run, and
# cancelled after it. Prints each mode's median IOPS and p99 latency and the median of the
# same-round ratios to `none`, as a markdown table (also in target/bench/mirror-cost.md; the
# runs in target/bench/mirror-cost.json).
#
# Usage: benches/mirror_cost.sh [ROUNDS [SECS]]    (default 5 rounds of 5 s; needs python3,
#        openssl; FERRY=BINARY, else target/release/ferry built here; MODES="none active"
#        runs only those modes, none first)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
ROUNDS=${1:-5}
SECS=${2:-5}
PORT=${PORT:-10860}
OUT_DIR=$ROOT/target/bench
mkdir -p "$OUT_DIR"
if [[ -z ${FERRY:-} ]]; then
    cargo build --release -p ferry --quiet
    FERRY=$ROOT/target/release/ferry
fi

WORK=$(mktemp -d /dev/shm/ferry-mirror-cost.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

source benches/bench_pki.sh  # (the script runs from the repository root)

# wait_for_socket PATH LOG: until the daemon's control socket exists.
wait_for_socket() {
    for _ in $(seq 1 1000); do [[ -S $1 ]] && return 0; sleep 0.01; done
    cat "$2" >&2
    return 1
}

python3 - "$WORK/src.img" <<'EOF'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(1 << 30)
    for mib in range(0, 1024, 2):
        f.seek(mib << 20)
        f.write(os.urandom(1 << 20))
EOF
truncate -s 1G "$WORK/nbd-dst.img"
make_pki "$WORK/pki" "mirror bench CA"

RUST_LOG=warn "$FERRY" serve --control "$WORK/src.ctl" \
    --volume "name=src,path=$WORK/src.img,socket=$WORK/src.sock" >"$WORK/src.log" 2>&1 &
PIDS+=($!)
RUST_LOG=warn "$FERRY" serve --control "$WORK/dst.ctl" \
    --volume "name=dst,path=$WORK/nbd-dst.img,socket=$WORK/dst.sock,nbd=rw" \
    --nbd-listen "127.0.0.1:$PORT" --tls-creds "$WORK/pki/server" >"$WORK/dst.log" 2>&1 &
PIDS+=($!)
wait_for_socket "$WORK/src.ctl" "$WORK/src.log"
wait_for_socket "$WORK/dst.ctl" "$WORK/dst.log"

migrate() { "$FERRY" migrate "$1" --control "$WORK/src.ctl" "${@:2}"; }
start_job() { migrate start --json "$@" | python3 -c "import json,sys; print(json.load(sys.stdin)['job'])"; }

# run_mode MODE ROUND: one `ferry bench` run under MODE, into $WORK/MODE-ROUND.json.
run_mode() {
    local mode=$1 round=$2 job=
    rm -f "$WORK/file-dst.img"
    case $mode in
        none | nbd-alone) ;;
        background | active)
            job=$(start_job --volume src --target "$WORK/file-dst.img" --mode "$mode" --max-speed 64M) ;;
        active-nbd)
            job=$(start_job --volume src --target "nbds://127.0.0.1:$PORT/dst" \
                --target-tls-creds "$WORK/pki/client" --mode active --max-speed 64M) ;;
    esac
    local client=(--socket "$WORK/src.sock")
    [[ $mode == nbd-alone ]] && client=(--nbd "nbds://127.0.0.1:$PORT/dst" --tls-creds "$WORK/pki/client")
    "$FERRY" bench "${client[@]}" --rw randwrite --bs 4K --qd 32 --secs "$SECS" --json \
        >"$WORK/$mode-$round.json"
    if [[ -n $job ]]; then
        local state
        state=$(migrate status --job "$job" --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['state'])")
        migrate cancel --job "$job" >/dev/null || true
        [[ $state == copying || $state == ready ]] || { echo "$mode job ended $state" >&2; exit 1; }
    fi
    echo "round $round: $mode done" >&2
}

read -r -a MODES <<<"${MODES:-none background active active-nbd nbd-alone}"
[[ ${MODES[0]} == none ]] || { echo "MODES must start with none (the reference)" >&2; exit 2; }
# Each round starts one mode further on, so that no mode always follows the same one.
for round in $(seq 1 "$ROUNDS"); do
    for i in "${!MODES[@]}"; do
        run_mode "${MODES[$(((i + round - 1) % ${#MODES[@]}))]}" "$round"
    done
done

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$WORK" "$ROUNDS" "$SECS" "$OUT_DIR" "$COMMIT" "$LOAD" "${MODES[@]}" <<'EOF'
import json, statistics, sys
work, rounds, secs, out_dir, commit, load, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:]

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

runs = {m: [json.load(open(f"{work}/{m}-{r}.json")) for r in range(1, rounds + 1)] for m in modes}
iops = {m: [find(x, ["iops"]) for x in runs[m]] for m in modes}
p99 = {m: [find(x, ["p99"]) for x in runs[m]] for m in modes}
label = {"none": "no migration", "background": "background migration to a file",
         "active": "active migration to a file (legs)",
         "active-nbd": "active migration to ferry's NBD server, TLS on loopback",
         "nbd-alone": "reference: the same writes straight to that NBD server (`ferry bench --nbd`, TLS)"}
lines = [f"| 4 KiB randwrite QD 32, {secs} s runs, {rounds} alternating rounds | median IOPS | median p99 (µs) | ratio to no migration: median (min..max) |",
         "| --- | --- | --- | --- |"]
report = {}
for m in modes:
    ratios = [a / b for a, b in zip(iops[m], iops["none"])]
    report[m] = {"iops_all": iops[m], "p99_all": p99[m], "ratio_to_none_all": ratios,
                 "iops_median": statistics.median(iops[m]), "ratio_to_none_median": statistics.median(ratios)}
    ratio = "1" if m == "none" else f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})"
    lines.append(f"| {label[m]} | {statistics.median(iops[m]):,.0f} | {statistics.median(p99[m]):,.0f} | {ratio} |")
text = "\n".join(lines) + f"\n\nBuild of commit {commit}; load average after the run: {load}.\n"
print(text)
json.dump(report, open(f"{out_dir}/mirror-cost.json", "w"), indent=2)
open(f"{out_dir}/mirror-cost.md", "w").write(text)
EOF
