#!/usr/bin/env bash
# cross_host.sh: the bulk copy of a move between hosts (docs/migration.md, "Across hosts")
# against nbdcopy between the same two hosts. Two network namespaces joined by a veth pair
# (A 10.78.0.1, B 10.78.0.2), a test CA made here with openssl (QEMU's x509 layout, as
# test-support's pki makes it), daemon A serving a 1 GiB volume of random data on /dev/shm
# with its own credentials (certificate `ferry-a`), daemon B with the TCP control listener
# and an NBD listener with TLS, allowing `ferry-a`, as in docs/migration.md.
#
# Each round, alternating which goes first:
#   ferry:    `ferry migrate start --target ferry://B/…` from A; timed from the start to the
#             job's `ready` (every byte on B), then `migrate cancel` (B drops the volume).
#   nbdcopy:  `incoming-prepare` on B (the very volume and export the move writes into),
#             then `nbdcopy` of A's image file into B's `nbds://` export from host A, with
#             A's certificate; timed around nbdcopy; then `incoming-abandon`.
# Both destinations are images on /dev/shm made fresh by B; neither flushes at the end (the
# move flushes at its hand-off, not at `ready`). Prints the median MiB/s of each and the
# median of the rounds' ratios ferry/nbdcopy.
#
# Usage: benches/cross_host.sh ROUNDS [SIZE_MIB]
#   e.g. benches/cross_host.sh 7 1024    (as root; FERRY=target/release/ferry by default)
# NBDCOPY_ARGS adds options to nbdcopy (e.g. --connections=1: one TLS stream, like the move).
# The switchover pause is measured by tests/cross_host_guest.rs, run with --nocapture:
#   GUEST_ROUNDS=5 benches/cross_host.sh 0
# runs it GUEST_ROUNDS times and prints QEMU's downtime beside the hand-off's hand-off-ms.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
(( $# >= 1 )) || { echo "usage: $0 ROUNDS [SIZE_MIB]" >&2; exit 2; }
ROUNDS=$1; SIZE_MIB=${2:-1024}
FERRY=$(realpath "${FERRY:-target/release/ferry}")
GUEST_ROUNDS=${GUEST_ROUNDS:-0}
NS_A=ferry-xb$$-a; NS_B=ferry-xb$$-b
ADDR_A=10.78.0.1; ADDR_B=10.78.0.2
CTL_PORT=7000; NBD_PORT=10809
IMG=/dev/shm/ferry-xh-src.img
WORK=$(mktemp -d /tmp/ferry-xh-bench.XXXXXX)
SHM=$(mktemp -d /dev/shm/ferry-xh-b.XXXXXX)
OUT=$WORK/runs.txt
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    rm -rf "$IMG" "$WORK" "$SHM"
}
trap cleanup EXIT
in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }

# Credentials in QEMU's x509 layout for host $1 (common name $2, address $3): the CA
# certificate and a server and a client pair, EC P-256, keyEncipherment as pki.rs makes them.
make_creds() {
    local dir=$WORK/pki/$1 cn=$2 address=$3 role usage
    mkdir -p "$dir"
    cp "$WORK/pki/ca-cert.pem" "$dir/"
    for role in server client; do
        usage=serverAuth; [[ $role == client ]] && usage=clientAuth
        printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:%s\n' \
            "$usage" "$address" >"$dir/$role.ext"
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$dir/$role-key.pem" \
            -out "$dir/$role.csr" -subj "/O=ferry bench/CN=$cn" 2>/dev/null
        openssl x509 -req -in "$dir/$role.csr" -CA "$WORK/pki/ca-cert.pem" -CAkey "$WORK/pki/ca-key.pem" \
            -CAcreateserial -days 3 -extfile "$dir/$role.ext" -out "$dir/$role-cert.pem" 2>/dev/null
        rm -f "$dir/$role.csr" "$dir/$role.ext"
    done
}

make_pki() {
    mkdir -p "$WORK/pki"
    (cd "$WORK/pki" && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout ca-key.pem -out ca-cert.pem -days 3 -subj "/CN=ferry bench CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null)
    make_creds a ferry-a "$ADDR_A"
    make_creds b ferry-b "$ADDR_B"
}

make_network() {
    ip netns add "$NS_A"; ip netns add "$NS_B"
    ip link add ferry0 netns "$NS_A" type veth peer name ferry0 netns "$NS_B"
    in_a ip addr add "$ADDR_A/24" dev ferry0; in_b ip addr add "$ADDR_B/24" dev ferry0
    for ns in "$NS_A" "$NS_B"; do
        ip -n "$ns" link set lo up; ip -n "$ns" link set ferry0 up
    done
}

wait_for() {  # wait_for WHAT COMMAND...: polls COMMAND for up to 20 s
    local what=$1; shift
    for _ in $(seq 400); do "$@" && return 0; sleep 0.05; done
    echo "timed out waiting for $what" >&2; return 1
}

start_daemons() {
    in_a "$FERRY" serve --volume "name=vm1,path=$IMG,socket=$WORK/a.sock" --control "$WORK/a.ctl" \
        --tls-creds "$WORK/pki/a" >"$WORK/a.log" 2>&1 &
    pids+=($!)
    in_b "$FERRY" serve --control "$WORK/b.ctl" --control-listen "$ADDR_B:$CTL_PORT" \
        --nbd-listen "$ADDR_B:$NBD_PORT" --tls-creds "$WORK/pki/b" --tls-authz ferry-a \
        --incoming-lease 600 --incoming-start-wait 600 >"$WORK/b.log" 2>&1 &
    pids+=($!)
    wait_for "daemon A" test -S "$WORK/a.ctl"
    wait_for "daemon B" sh -c "ip netns exec $NS_B ss -ltn | grep -q ':$NBD_PORT '"
}

# `ferry query` of B's control listener from host A, as A.
query_b() {
    in_a "$FERRY" query --control "ferry://$ADDR_B:$CTL_PORT" --tls-creds "$WORK/pki/a" "$1" --arguments "$2" >/dev/null
}

job_state() {  # job_state ID: the job's state on A
    "$FERRY" query --control "$WORK/a.ctl" query-migrations |
        python3 -c 'import json,sys; j=[x for x in json.load(sys.stdin) if x["id"]==int(sys.argv[1])]; print(j[0]["state"] if j else "gone")' "$1"
}

now() { date +%s.%N; }

run_ferry() {  # prints MiB/s
    local name=$1 t0 t1 job state
    t0=$(now)
    job=$("$FERRY" migrate start --control "$WORK/a.ctl" --volume vm1 \
        --target "ferry://$ADDR_B:$CTL_PORT/$name" --path "$SHM/$name.img" --socket "$WORK/$name.sock" --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["job"])')
    while :; do
        state=$(job_state "$job")
        [[ $state == ready ]] && break
        [[ $state == copying ]] || { echo "job $job is $state" >&2; "$FERRY" migrate status --control "$WORK/a.ctl" >&2; return 1; }
        sleep 0.02
    done
    t1=$(now)
    "$FERRY" migrate cancel --control "$WORK/a.ctl" --job "$job" >/dev/null
    wait_for "B to drop $name" sh -c "! test -e $SHM/$name.img"
    python3 -c "print(round($SIZE_MIB / ($t1 - $t0), 1))"
}

run_nbdcopy() {  # prints MiB/s
    local name=$1 t0 t1
    query_b incoming-prepare "{\"name\":\"$name\",\"size\":$((SIZE_MIB << 20)),\"path\":\"$SHM/$name.img\",\"socket\":\"$WORK/$name.sock\"}"
    t0=$(now)
    # shellcheck disable=SC2086 # NBDCOPY_ARGS is a list of options
    in_a nbdcopy ${NBDCOPY_ARGS:-} "$IMG" "nbds://$ADDR_B:$NBD_PORT/$name?tls-certificates=$WORK/pki/a"
    t1=$(now)
    query_b incoming-abandon "{\"name\":\"$name\"}"
    python3 -c "print(round($SIZE_MIB / ($t1 - $t0), 1))"
}

if (( ROUNDS > 0 )); then
    make_pki
    make_network
    fio --name=fill --filename="$IMG" --size="${SIZE_MIB}M" --rw=write --bs=1M --ioengine=psync \
        --refill_buffers >/dev/null
    start_daemons
    for round in $(seq "$ROUNDS"); do
        order=(ferry nbdcopy); (( round % 2 == 0 )) && order=(nbdcopy ferry)
        for tool in "${order[@]}"; do
            mib=$("run_$tool" "r$round$tool")
            echo "$round $tool $mib" | tee -a "$OUT"
        done
    done
    python3 - "$OUT" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r, tool, mib = line.split()
    runs[r][tool] = float(mib)
ferry = [v["ferry"] for v in runs.values()]
nbdcopy = [v["nbdcopy"] for v in runs.values()]
ratios = [v["ferry"] / v["nbdcopy"] for v in runs.values()]
print(f"ferry migrate   median {statistics.median(ferry):8.1f} MiB/s  runs {ferry}")
print(f"nbdcopy         median {statistics.median(nbdcopy):8.1f} MiB/s  runs {nbdcopy}")
print(f"ferry/nbdcopy   median {statistics.median(ratios):.2f}x  rounds {[round(x, 2) for x in ratios]}")
PY
fi

if (( GUEST_ROUNDS > 0 )); then
    for i in $(seq "$GUEST_ROUNDS"); do
        FERRY_REQUIRE_ALL=1 cargo test -q --test cross_host_guest a_running_vm_moves_to_another_host_with_its_disk \
            -- --nocapture 2>&1 | grep -o "QEMU's downtime .*" | tee -a "$WORK/guest.txt"
    done
    python3 - "$WORK/guest.txt" <<'PY'
import re, statistics, sys
rows = [re.match(r"QEMU's downtime (\d+) ms, the disk's hand-off (\d+) ms", l) for l in open(sys.argv[1])]
down = [int(m[1]) for m in rows if m]; hand = [int(m[2]) for m in rows if m]
print(f"QEMU downtime   median {statistics.median(down)} ms  runs {down}")
print(f"hand-off-ms     median {statistics.median(hand)} ms  runs {hand}")
PY
fi
