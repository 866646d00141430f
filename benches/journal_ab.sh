#!/usr/bin/env bash
# journal_ab.sh: compares ferry binaries on what the journal costs. For every binary given as
# NAME=PATH, 4 KiB random writes at QD 32 (`ferry bench --wait`) with the journal off, sync and
# async; all runs of a round in rotated order, ROUNDS rounds; prints per binary the median of
# the per-round ratios journal/off (each ratio from the same round, so the machine's load
# cancels as far as it can) and the CPU time per write of the daemon (utime+stime of the serve
# process over the run / writes) and of the client (GNU time, /usr/bin/time: the machine's two
# cores are shared by both). Image and journal on /dev/shm. MODES="sync" (default "sync
# async") runs only those journal modes.
#
# With SPARES=N (default 0) every binary also runs sync-sp and async-sp: the journal with
# `spares=N`, its directory pre-formatted with N spares of CAPACITY (default 4G; `ferry journal
# format`, not timed) before the run. FORMATTED=M (default N) pre-formats M spares instead: with
# M above what a run takes and N=1 the background formatter stays idle, which separates the gain
# of writing over formatted media from the cost of refilling spares during the run.
#
# With DISK=DIR (a directory on a disk filesystem, e.g. /var/tmp) every binary also runs
# sync-disk and async-disk: the journal in DIR, where media are appended with O_DIRECT
# (the default `cache=auto`), the image still on /dev/shm; with SPARES=N as well, the disk
# journal is pre-formatted and run with spares too (like sync-sp).
#
# CLIENT=--poll runs the client busy-polling for completions instead of waiting (--wait, the
# default, as a guest waiting for interrupts does).
#
# Usage: [SPARES=N CAPACITY=1G] [DISK=/var/tmp] [CLIENT=--poll] benches/journal_ab.sh ROUNDS SECS NAME=BIN [NAME=BIN ...]
#   e.g. benches/journal_ab.sh 6 3 before=/tmp/ferry-before after=target/release/ferry
#        SPARES=6 CAPACITY=1G benches/journal_ab.sh 5 3 ferry=target/release/ferry
set -euo pipefail
ROUNDS=$1; SECS=$2; shift 2
W=${WORKDIR:-/dev/shm/ferry-jab.$$}
mkdir -p "$W"; truncate -s 512M "$W/img"
DISK=${DISK:-}
CLIENT=${CLIENT:---wait}
DJ=${DISK:+$DISK/ferry-jab-journal.$$}
trap 'rm -rf "$W" ${DJ:+"$DJ"}' EXIT
SPARES=${SPARES:-0}; CAPACITY=${CAPACITY:-4G}; FORMATTED=${FORMATTED:-$SPARES}
read -ra MODES <<<"${MODES:-sync async}"
CONFIGS=(off "${MODES[@]}")
((SPARES > 0)) && CONFIGS+=("${MODES[@]/%/-sp}")
[[ -n $DISK ]] && CONFIGS+=("${MODES[@]/%/-disk}")
RUNS=()
for nb in "$@"; do for c in "${CONFIGS[@]}"; do RUNS+=("${nb%%=*}:${nb#*=}:$c"); done; done
TICK_US=$((1000000 / $(getconf CLK_TCK)))

run() {
    local round=$1 name=$2 bin=$3 config=$4 args=(--volume "name=bench,path=$W/img,socket=$W/s.sock")
    rm -rf "$W/j" ${DJ:+"$DJ"}
    case $config in
    sync | async) args+=(--journal "dir=$W/j,mode=$config,capacity=$CAPACITY") ;;
    *-sp)
        "$bin" journal format "$W/j" --spares "$FORMATTED" --capacity "$CAPACITY" --json >/dev/null
        args+=(--journal "dir=$W/j,mode=${config%-sp},capacity=$CAPACITY,spares=$SPARES") ;;
    *-disk)
        local spares=()
        if ((SPARES > 0)); then
            "$bin" journal format "$DJ" --spares "$FORMATTED" --capacity "$CAPACITY" --json >/dev/null
            spares=(",spares=$SPARES")
        fi
        args+=(--journal "dir=$DJ,mode=${config%-disk},capacity=$CAPACITY${spares[*]}") ;;
    esac
    "$bin" serve "${args[@]}" >"$W/serve.log" 2>&1 &
    local pid=$! i json t0 t1
    for ((i = 0; i < 200; i++)); do [[ -S $W/s.sock ]] && break; sleep 0.05; done
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    json=$(/usr/bin/time -f '%U %S' -o "$W/client.time" \
        "$bin" bench --socket "$W/s.sock" --rw randwrite --bs 4K --qd 32 --secs "$SECS" --ramp 1 "$CLIENT" --json)
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill -TERM "$pid"; wait "$pid"; rm -rf "$W/j" ${DJ:+"$DJ"}
    local client_us
    client_us=$(awk '{printf "%d", ($1 + $2) * 1000000}' "$W/client.time")
    jq -r --arg r "$round" --arg n "$name" --arg c "$config" --argjson t $(((t1 - t0) * TICK_US)) --argjson s "$SECS" \
        --argjson cl "$client_us" \
        '"\($r) \($n) \($c) \(.iops | floor) \($t / (.iops * ($s + 1))) \($cl / (.iops * ($s + 1)))"' <<<"$json"
}

dd if=/dev/zero of="$W/warm" bs=1M count=3072 2>/dev/null; rm -f "$W/warm"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
N=${#RUNS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    for ((k = 0; k < N; k++)); do
        IFS=: read -r n b c <<<"${RUNS[(k + r - 1) % N]}"
        run "$r" "$n" "$b" "$c"
    done
done >"$W/results"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 - "$W/results" <<'PY'
import statistics as st
import sys
iops, cpu, client = {}, {}, {}
for line in open(sys.argv[1]):
    r, n, c, v, us, cl = line.split()
    iops.setdefault((n, c), {})[r] = int(v)
    cpu.setdefault((n, c), []).append(float(us))
    client.setdefault((n, c), []).append(float(cl))
for n in sorted({k[0] for k in iops}):
    off = iops[(n, "off")]
    for c in [c for c in ("sync", "async", "sync-sp", "async-sp", "sync-disk", "async-disk") if (n, c) in iops]:
        ratios = [iops[(n, c)][r] / off[r] for r in off]
        print(f"{n} {c}: ratio {st.median(ratios):.2f}x (rounds {[round(x, 2) for x in ratios]}), "
              f"IOPS {int(st.median(iops[(n, c)].values()))} vs off {int(st.median(off.values()))}, "
              f"daemon CPU {st.median(cpu[(n, c)]):.2f} us/write vs off {st.median(cpu[(n, 'off')]):.2f}, "
              f"client CPU {st.median(client[(n, c)]):.2f} vs off {st.median(client[(n, 'off')]):.2f}")
PY
