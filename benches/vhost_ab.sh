#!/usr/bin/env bash
# vhost_ab.sh: compares ferry binaries on the plain request path (no journal, no migration).
# For every binary given as NAME=PATH: 4 KiB random reads and writes at QD 32 with a polling
# and a waiting client (`ferry bench`, the same client binary for all), binaries alternating
# within each round; prints the median IOPS per binary and workload. Image on /dev/shm.
#
# Usage: benches/vhost_ab.sh ROUNDS SECS NAME=BIN [NAME=BIN ...]
#   e.g. benches/vhost_ab.sh 5 3 before=/tmp/ferry-before after=target/release/ferry
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
(( $# >= 3 )) || { echo "usage: $0 ROUNDS SECS NAME=BIN [NAME=BIN ...]" >&2; exit 2; }
ROUNDS=$1; SECS=$2; shift 2
CLIENT=${CLIENT:-target/release/ferry}
IMG=/dev/shm/ferry-vhost-ab.img
SOCK=$(mktemp -u /tmp/ferry-vhost-ab.XXXXXX.sock)
OUT=$(mktemp /tmp/ferry-vhost-ab.XXXXXX.txt)
trap 'rm -f "$IMG" "$SOCK"' EXIT
fio --name=fill --filename="$IMG" --size=1G --rw=write --bs=1M --ioengine=psync \
    --refill_buffers >/dev/null
for round in $(seq "$ROUNDS"); do
    for nb in "$@"; do
        for mode in wait poll; do
            for rw in randread randwrite; do
                rm -f "$SOCK"
                "${nb#*=}" serve --volume "name=ab,path=$IMG,socket=$SOCK" >/dev/null 2>&1 &
                pid=$!
                for _ in $(seq 200); do [[ -S $SOCK ]] && break; sleep 0.05; done
                iops=$("$CLIENT" bench --socket "$SOCK" --rw "$rw" --bs 4K --qd 32 --secs "$SECS" \
                    --ramp 1 "--$mode" --json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["iops"]))')
                kill "$pid"; wait "$pid" 2>/dev/null || true
                echo "$round ${nb%%=*} $mode $rw $iops" | tee -a "$OUT"
            done
        done
    done
done
python3 - "$OUT" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    _, name, mode, rw, iops = line.split()
    runs[(mode, rw, name)].append(int(iops))
for (mode, rw, name), v in sorted(runs.items()):
    print(f"{rw:<10} {mode:<5} {name:<10} median {statistics.median(v):>9,.0f} IOPS  runs {v}")
PY
