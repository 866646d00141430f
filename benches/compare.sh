#!/usr/bin/env bash
# compare.sh: measures ferry against qemu-storage-daemon (both through `ferry bench`, a libblkio
# vhost-user-blk client) and fio on the raw file (the ceiling), on the same image in /dev/shm,
# alternating backends round by round; then benches/report.py writes target/bench/results.json,
# docs/BENCHMARKS.md (from benches/report-template.md) and docs/bench-iops-by-qd.png.
#
# Environment (defaults in brackets):
#   SECS [5] RAMP [1] ROUNDS [3]   measurement / warm-up seconds per run, rounds (A B A B ...)
#   SIZE [1G]                      image size (fio size syntax)
#   BACKENDS ["qsd ferry fio"]     which to run, in this order each round
#   MODES ["poll wait"]            ferry bench completion modes
#   QUICK=1                        smoke run: SECS=1 RAMP=0 ROUNDS=1 SIZE=256M, fewer workloads
#   FERRY [target/release/ferry]   the ferry binary (built with cargo unless FERRY is set)
#   WORKDIR [/dev/shm/ferry-bench.PID]  image and sockets; OUT [target/bench]  results
#   FIO_ENGINE [io_uring]          fio's ioengine for the ceiling runs (e.g. psync)
#   NO_REPORT=1                    skip benches/report.py
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "${QUICK:-0}" == 1 ]]; then
    SECS=${SECS:-1}; RAMP=${RAMP:-0}; ROUNDS=${ROUNDS:-1}; SIZE=${SIZE:-256M}
fi
SECS=${SECS:-5}
RAMP=${RAMP:-1}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
BACKENDS=${BACKENDS:-"qsd ferry fio"}
MODES=${MODES:-"poll wait"}
FIO_ENGINE=${FIO_ENGINE:-io_uring}
OUT=${OUT:-$ROOT/target/bench}
WORKDIR=${WORKDIR:-/dev/shm/ferry-bench.$$}
SOCKET_WAIT_SECS=10

# name rw bs qd
if [[ "${QUICK:-0}" == 1 ]]; then
    WORKLOADS=(
        "randread-4k-qd1 randread 4K 1"
        "randread-4k-qd32 randread 4K 32"
        "randwrite-4k-qd32 randwrite 4K 32"
        "read-128k-qd8 read 128K 8"
    )
else
    WORKLOADS=(
        "randread-4k-qd1 randread 4K 1"
        "randread-4k-qd32 randread 4K 32"
        "randread-4k-qd128 randread 4K 128"
        "randwrite-4k-qd1 randwrite 4K 1"
        "randwrite-4k-qd32 randwrite 4K 32"
        "randwrite-4k-qd128 randwrite 4K 128"
        "read-128k-qd8 read 128K 8"
        "write-128k-qd8 write 128K 8"
    )
fi

log() { printf '[compare %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

IMG=$WORKDIR/bench.img
SOCK=$WORKDIR/vhost.sock
BACKEND_PID=
QSD_CMD=(qemu-storage-daemon
    --blockdev "driver=file,node-name=f0,filename=$IMG,aio=io_uring,cache.direct=off"
    --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1")

cleanup() {
    stop_backend
    rm -f "$IMG" "$SOCK"
    rmdir "$WORKDIR" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ferry_cmd() { FERRY_CMD=("$FERRY" serve --volume "name=bench,path=$IMG,socket=$SOCK"); }

# Starts backend $1 and waits for its socket.
start_backend() {
    local name=$1 logfile=$OUT/logs/$1.log
    rm -f "$SOCK"
    case $name in
        qsd) "${QSD_CMD[@]}" >>"$logfile" 2>&1 & ;;
        ferry) ferry_cmd; "${FERRY_CMD[@]}" >>"$logfile" 2>&1 & ;;
        *) die "unknown backend $name" ;;
    esac
    BACKEND_PID=$!
    local waited=0
    until [[ -S $SOCK ]]; do
        kill -0 "$BACKEND_PID" 2>/dev/null || die "$name exited early; see $logfile"
        (( waited++ < SOCKET_WAIT_SECS * 20 )) || die "$name did not create $SOCK; see $logfile"
        sleep 0.05
    done
}

stop_backend() {
    if [[ -n ${BACKEND_PID:-} ]]; then
        kill "$BACKEND_PID" 2>/dev/null || true
        wait "$BACKEND_PID" 2>/dev/null || true
        BACKEND_PID=
    fi
}

# CPU ticks (user + system) used so far by a process.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# Runs one `ferry bench` against the running backend: $1 backend $2 mode $3 round $4 workload line.
run_bench() {
    local backend=$1 mode=$2 round=$3 name rw bs qd
    read -r name rw bs qd <<<"$4"
    local out=$OUT/raw/$backend-$mode-$name-r$round.json t0 t1
    t0=$(cpu_ticks "$BACKEND_PID")
    "$FERRY" bench --socket "$SOCK" --rw "$rw" --bs "$bs" --qd "$qd" --secs "$SECS" --ramp "$RAMP" \
        "--$mode" --json >"$out.tmp" || die "ferry bench failed ($backend $mode $name)"
    t1=$(cpu_ticks "$BACKEND_PID")
    python3 - "$out.tmp" "$out" "$backend" "$mode" "$name" "$round" "$((t1 - t0))" "$(getconf CLK_TCK)" <<'PY'
import json, sys
src, dst, backend, mode, name, rnd, ticks, hz = sys.argv[1:]
r = json.load(open(src))
r.update(tool="ferry-bench", backend=backend, client_mode=mode, workload=name, round=int(rnd),
         backend_cpu_secs=int(ticks) / int(hz))
json.dump(r, open(dst, "w"))
PY
    rm -f "$out.tmp"
    log "$backend $mode $name round $round: $(python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("%.0f IOPS, p50 %.1f us, p99 %.1f us" % (r["iops"], r["latency_us"]["p50"], r["latency_us"]["p99"]))' "$out")"
}

# fio on the raw image (the ceiling): $1 round $2 workload line.
run_fio() {
    local round=$1 name rw bs qd
    read -r name rw bs qd <<<"$2"
    local out=$OUT/raw/fio-none-$name-r$round.json
    fio --name="$name" --filename="$IMG" --ioengine="$FIO_ENGINE" --direct=0 --rw="$rw" --bs="$bs" \
        --iodepth="$qd" --runtime="$SECS" --ramp_time="$RAMP" --time_based --size="$SIZE" \
        --norandommap --randrepeat=0 --percentile_list=50:90:99:99.9 --output-format=json \
        --output="$out" >/dev/null || die "fio failed ($name)"
    log "fio $name round $round done"
}

machine_info() {
    python3 - "$OUT/machine.json" <<PY
import json, sys, subprocess, platform, datetime, os
def sh(cmd):
    try: return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception: return ""
model = ""
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        model = line.split(":", 1)[1].strip(); break
json.dump({
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "nproc": sh("nproc"), "kernel": sh("uname -r"), "cpu_model": model,
    "mem_total": sh("free -h | awk '/Mem:/{print \$2}'"),
    "qemu": sh("qemu-storage-daemon --version | head -1"), "fio": sh("fio --version"),
    "loadavg_start": open("/proc/loadavg").read().split()[:3],
    "ferry_commit": sh("git -C '$ROOT' rev-parse --short HEAD"),
    "secs": $SECS, "ramp": $RAMP, "rounds": $ROUNDS, "size": "$SIZE",
    "backends": "$BACKENDS".split(), "modes": "$MODES".split(), "quick": "${QUICK:-0}" == "1",
    "commands": {
        "image": "fio --name=fill --filename=IMG --size=$SIZE --rw=write --bs=1M --ioengine=psync --refill_buffers",
        "qsd": "${QSD_CMD[*]}".replace("$IMG", "IMG").replace("$SOCK", "SOCK"),
        "ferry": "ferry serve --volume name=bench,path=IMG,socket=SOCK",
        "bench": "ferry bench --socket SOCK --rw RW --bs BS --qd QD --secs $SECS --ramp $RAMP --poll|--wait --json",
        "fio": "fio --name=W --filename=IMG --ioengine=$FIO_ENGINE --direct=0 --rw=RW --bs=BS --iodepth=QD --runtime=$SECS --ramp_time=$RAMP --time_based --size=$SIZE --norandommap --randrepeat=0 --output-format=json",
    },
}, open(sys.argv[1], "w"), indent=1)
PY
}

main() {
    command -v fio >/dev/null || die "fio is not installed"
    if [[ " $BACKENDS " == *" qsd "* ]]; then command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon is not installed"; fi
    if [[ -z ${FERRY:-} ]]; then
        log "building ferry (release)"
        (cd "$ROOT" && cargo build --release -p ferry --quiet) || die "cargo build failed"
        FERRY=$ROOT/target/release/ferry
    fi
    [[ -x $FERRY ]] || die "no ferry binary at $FERRY"
    rm -rf "$OUT/raw" "$OUT/logs"
    mkdir -p "$OUT/raw" "$OUT/logs" "$WORKDIR"
    log "filling $IMG ($SIZE) with data"
    fio --name=fill --filename="$IMG" --size="$SIZE" --rw=write --bs=1M --ioengine=psync \
        --refill_buffers --output=/dev/null || die "could not create the image"
    machine_info
    local round backend mode w
    for ((round = 1; round <= ROUNDS; round++)); do
        for backend in $BACKENDS; do
            if [[ $backend == fio ]]; then
                for w in "${WORKLOADS[@]}"; do run_fio "$round" "$w"; done
                continue
            fi
            start_backend "$backend"
            for w in "${WORKLOADS[@]}"; do
                for mode in $MODES; do run_bench "$backend" "$mode" "$round" "$w"; done
            done
            stop_backend
        done
    done
    python3 - "$OUT/machine.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
json.dump(m, open(sys.argv[1], "w"), indent=1)
PY
    if [[ "${NO_REPORT:-0}" != 1 ]]; then
        python3 "$ROOT/benches/report.py" --raw "$OUT/raw" --machine "$OUT/machine.json" \
            --json "$OUT/results.json" --markdown "$ROOT/docs/BENCHMARKS.md" \
            --plot "$ROOT/docs/bench-iops-by-qd.png"
    fi
}

main "$@"
