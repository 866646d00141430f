#!/usr/bin/env bash
# nbd_server.sh: ferry's NBD server against qemu-nbd and qemu-storage-daemon --nbd-server,
# each exporting the same 1 GiB file on /dev/shm (cache=writeback for all), measured by the
# same client (`ferry bench --nbd`: one connection, requests pipelined at QD 32): 4 KiB
# random reads and writes and 128 KiB sequential reads and writes, plaintext over TCP on
# loopback and TLS 1.3 with client certificates (made here with openssl). Servers alternate
# within each round; prints each server's median IOPS and MiB/s per workload and ferry's
# ratio to each of the others.
#
# Usage: benches/nbd_server.sh ROUNDS SECS
#   e.g. benches/nbd_server.sh 5 5      (FERRY=target/release/ferry by default)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
(( $# == 2 )) || { echo "usage: $0 ROUNDS SECS" >&2; exit 2; }
ROUNDS=$1; SECS=$2
FERRY=${FERRY:-target/release/ferry}
IMG=/dev/shm/ferry-nbd-bench.img
WORK=$(mktemp -d /tmp/ferry-nbd-bench.XXXXXX)
OUT=$WORK/runs.txt
PORT=${PORT:-10850}
trap 'rm -rf "$IMG" "$WORK"' EXIT

source benches/bench_pki.sh  # (the script runs from the repository root)

# Starts server $1 (ferry, qemu-nbd, qsd) with TLS or not ($2: plain|tls); sets $pid.
start_server() {
    local server=$1 tls=$2 creds=()
    case $server in
        ferry)
            [[ $tls == tls ]] && creds=(--tls-creds "$WORK/pki/server")
            "$FERRY" serve --volume "name=bench,path=$IMG,socket=$WORK/ferry.sock,nbd=rw" \
                --nbd-listen "127.0.0.1:$PORT" "${creds[@]}" >"$WORK/server.log" 2>&1 &
            ;;
        qemu-nbd)
            [[ $tls == tls ]] && creds=(--object "tls-creds-x509,id=tls0,dir=$WORK/pki/server,endpoint=server" --tls-creds tls0)
            qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$PORT" -t -e 8 --cache=writeback --aio=io_uring \
                "${creds[@]}" "$IMG" >"$WORK/server.log" 2>&1 &
            ;;
        qsd)
            local tls_opt=""
            [[ $tls == tls ]] && { creds=(--object "tls-creds-x509,id=tls0,dir=$WORK/pki/server,endpoint=server"); tls_opt=",tls-creds=tls0"; }
            qemu-storage-daemon "${creds[@]}" \
                --blockdev "driver=file,node-name=file0,filename=$IMG,aio=io_uring,cache.direct=off" \
                --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$PORT$tls_opt" \
                --export "type=nbd,id=e0,node-name=file0,name=bench,writable=on" \
                >"$WORK/server.log" 2>&1 &
            ;;
    esac
    pid=$!
    for _ in $(seq 200); do
        ss -ltn "sport = :$PORT" | grep -q LISTEN && return 0
        sleep 0.05
    done
    echo "$server did not listen:" >&2; cat "$WORK/server.log" >&2; return 1
}

make_pki "$WORK/pki" "nbd bench CA"
fio --name=fill --filename="$IMG" --size=1G --rw=write --bs=1M --ioengine=psync \
    --refill_buffers >/dev/null
WORKLOADS=("randread 4K" "randwrite 4K" "read 128K" "write 128K")
for round in $(seq "$ROUNDS"); do
    for tls in plain tls; do
        for server in ferry qemu-nbd qsd; do
            start_server "$server" "$tls"
            scheme=nbd; creds=()
            [[ $tls == tls ]] && { scheme=nbds; creds=(--tls-creds "$WORK/pki/client"); }
            for w in "${WORKLOADS[@]}"; do
                set -- $w
                json=$("$FERRY" bench --nbd "$scheme://127.0.0.1:$PORT/bench" "${creds[@]}" \
                    --rw "$1" --bs "$2" --qd 32 --secs "$SECS" --ramp 1 --json)
                read -r iops mib < <(python3 -c 'import json,sys; r=json.load(sys.stdin); print(int(r["iops"]), round(r["mib_per_sec"],1))' <<<"$json")
                echo "$round $tls $server $1-$2 $iops $mib" | tee -a "$OUT"
            done
            kill "$pid"; wait "$pid" 2>/dev/null || true
        done
    done
done
python3 - "$OUT" <<'PY'
import collections, statistics, sys
iops, mib = collections.defaultdict(list), collections.defaultdict(list)
for line in open(sys.argv[1]):
    _, tls, server, workload, i, m = line.split()
    iops[(tls, workload, server)].append(int(i))
    mib[(tls, workload, server)].append(float(m))
keys = sorted({(t, w) for t, w, _ in iops})
for tls, workload in keys:
    med = {s: statistics.median(iops[(tls, workload, s)]) for s in ("ferry", "qemu-nbd", "qsd")}
    for s, v in med.items():
        print(f"{tls:<5} {workload:<13} {s:<9} median {v:>9,.0f} IOPS {statistics.median(mib[(tls, workload, s)]):>8.1f} MiB/s  runs {iops[(tls, workload, s)]}")
    print(f"{tls:<5} {workload:<13} ferry/qemu-nbd {med['ferry'] / med['qemu-nbd']:.2f}x  ferry/qsd {med['ferry'] / med['qsd']:.2f}x")
PY
