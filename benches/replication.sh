#!/usr/bin/env bash
# replication.sh: async replication's cost and speeds (docs/replication.md). Two network
# namespaces joined by a veth pair (A 10.79.0.1, B 10.79.0.2), a test CA made here with
# openssl (QEMU's x509 layout), daemon A serving the volumes on /dev/shm with its credentials
# (certificate `ferry-a`), daemon B (the DR site) with the TCP control listener, allowing
# `ferry-a`, its replicas and DR logs on /dev/shm. Parts, each alone with PARTS=...:
#
#   iops     4K random writes at QD 32 (`ferry bench`, waiting client) on A's volume, without
#            replication and in an async group to B (a fresh group per round, started and
#            copied before the run), alternating which goes first; the link unlimited.
#   copy     the link limited by tbf on A's side (LINK, default 400mbit): the initial copy of
#            a volume of random data (`replicate start` to `replicating` with nothing
#            unacknowledged) and a resync (`pause`, 4K random writes, `resume` to the same)
#            against a plain TLS 1.3 stream of the same bytes between the same namespaces with
#            the same certificates (python3's ssl; timed from the connection to the
#            receiver's reply after the last byte); resync bytes against changed bytes from
#            `replicate status`.
#   promote  8 volumes in one group, a writer on each; the link cut (`ip link set down`)
#            while they write, the primary's group stopped, then `ferry replicate promote
#            --at latest` on B timed (the command, start to end).
#   lag      4K random writes at QD 1 in an async group over a tbf link set to the writer's
#            rate in the group over the unlimited link / LAG_LOAD (0.8), `lag-seconds` of
#            `replicate status` sampled as fast as the command runs (every 0.1 s at most).
#
# Usage: benches/replication.sh ROUNDS [SECS]
#   e.g. PARTS="iops copy promote lag" benches/replication.sh 5 3   (as root; FERRY=target/release/ferry)
# SIZE_MIB (default 256): the volume of iops, copy and lag; LINK (400mbit): the tbf rate of copy;
# LAG_SECS (10): the writer of lag.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
(( $# >= 1 )) || { echo "usage: $0 ROUNDS [SECS]" >&2; exit 2; }
ROUNDS=$1; SECS=${2:-3}
PARTS=${PARTS:-iops copy promote lag}
SIZE_MIB=${SIZE_MIB:-256}; LINK=${LINK:-400mbit}; LAG_LOAD=${LAG_LOAD:-0.8}
FERRY=$(realpath "${FERRY:-target/release/ferry}")
NS_A=ferry-rb$$-a; NS_B=ferry-rb$$-b
ADDR_A=10.79.0.1; ADDR_B=10.79.0.2
CTL_PORT=7000; STREAM_PORT=7001
WORK=$(mktemp -d /tmp/ferry-repl-bench.XXXXXX)
SHM=$(mktemp -d /dev/shm/ferry-repl-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}" ${RECEIVER_PID:-}; do kill "$p" 2>/dev/null || true; done
    [[ -s $WORK/b.pid ]] && kill "$(cat "$WORK/b.pid")" 2>/dev/null
    wait 2>/dev/null || true
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    rm -rf "$WORK" "$SHM"
}
trap cleanup EXIT
in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }
now() { date +%s.%N; }

# Credentials in QEMU's x509 layout for host $1 (common name $2, address $3), as
# benches/cross_host.sh makes them.
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

# limit_link RATE|none: tbf on A's side of the veth (A to B carries the data).
limit_link() {
    in_a tc qdisc del dev ferry0 root 2>/dev/null || true
    [[ $1 == none ]] || in_a tc qdisc add dev ferry0 root tbf rate "$1" burst 256kb latency 100ms
}

wait_for() {  # wait_for WHAT COMMAND...: polls COMMAND for up to 60 s
    local what=$1; shift
    for _ in $(seq 1200); do "$@" && return 0; sleep 0.05; done
    echo "timed out waiting for $what" >&2; return 1
}

# start_daemons VOLUME_SPEC...: A serving the volumes, B the DR site.
start_daemons() {
    local args=() spec
    for spec in "$@"; do args+=(--volume "$spec"); done
    # Not through in_a: $! must be the daemon itself, not a subshell around it.
    ip netns exec "$NS_A" "$FERRY" serve "${args[@]}" --control "$WORK/a.ctl" --tls-creds "$WORK/pki/a" >"$WORK/a.log" 2>&1 &
    pids+=($!)
    wait_for "daemon A" test -S "$WORK/a.ctl"
    start_b
}

# start_b: a fresh DR daemon B. Each round starts both daemons afresh: B keeps a group's
# replicas, named as the primary's volumes, after the primary stops the group.
start_b() {
    local pid
    # B's pid is kept in a file: start_b also runs in command substitutions (subshells).
    if [[ -s $WORK/b.pid ]]; then
        pid=$(cat "$WORK/b.pid")
        kill "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
        rm -rf "$WORK/b.ctl" "${SHM:?}/dr"
    fi
    ip netns exec "$NS_B" "$FERRY" serve --control "$WORK/b.ctl" --control-listen "$ADDR_B:$CTL_PORT" \
        --tls-creds "$WORK/pki/b" --tls-authz ferry-a --allow-path "$SHM" >>"$WORK/b.log" 2>&1 &
    echo $! >"$WORK/b.pid"; pids+=($!)
    wait_for "daemon B" sh -c "ip netns exec $NS_B ss -ltn | grep -q ':$CTL_PORT '"
}

fail() { echo "$*" >&2; kill -TERM $$; exit 1; }
trap 'exit 1' TERM

stop_daemons() {
    local p
    [[ -s $WORK/b.pid ]] && pids+=("$(cat "$WORK/b.pid")")
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; done
    pids=(); rm -f "$WORK/b.pid" "$WORK"/*.sock "$WORK"/*.ctl "$WORK/a.log"
    rm -rf "${SHM:?}/dr"
}

# status GROUP FIELD...: the fields of the primary's group, space-separated.
status() {
    local group=$1; shift
    "$FERRY" replicate status --control "$WORK/a.ctl" --group "$group" --json |
        python3 -c 'import json,sys; g=json.load(sys.stdin)[0]; print(*[g.get(f) for f in sys.argv[1:]])' "$@"
}

# caught_up GROUP: the group streams, with every record acknowledged by B.
caught_up() {
    local state lag
    read -r state lag < <(status "$1" state lag-records)
    [[ $state == replicating && $lag == 0 ]]
}

start_group() {  # start_group GROUP VOLUME...
    local group=$1 args=() v; shift
    for v in "$@"; do args+=(--volume "$v"); done
    mkdir -p "$SHM/dr/$group"
    in_a "$FERRY" replicate start --control "$WORK/a.ctl" "${args[@]}" \
        --to "ferry://$ADDR_B:$CTL_PORT" --group "$group" --path-prefix "$SHM/dr/$group" \
        --socket-prefix "$SHM/dr/$group" >/dev/null || fail "replicate start $group failed"
}

stop_group() { "$FERRY" replicate stop --control "$WORK/a.ctl" --group "$1" >/dev/null; }

bench_json() {  # bench_json SOCKET ARGS...: ferry bench's JSON report
    local socket=$1; shift
    "$FERRY" bench --socket "$socket" --json "$@"
}

json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

fill() {  # fill IMAGE MIB: random data
    fio --name=fill --filename="$1" --size="${2}M" --rw=write --bs=1M --ioengine=psync \
        --refill_buffers >/dev/null
}

# ---- iops ----------------------------------------------------------------------------------

iops_none() { bench_json "$WORK/vm1.sock" --rw randwrite --bs 4K --qd 32 --secs "$SECS" --ramp 1 | json_field iops; }

iops_async() {
    local group=$1 iops
    start_group "$group" vm1
    wait_for "the initial copy of $group" caught_up "$group"
    iops=$(iops_none)
    echo "  $group after the run: $(status "$group" state lag-bytes lag-seconds link-bytes-per-s degraded-reason)" >&2
    stop_group "$group"
    echo "$iops"
}

part_iops() {
    local out=$WORK/iops.txt round order tool
    fill "$SHM/vm1.img" "$SIZE_MIB"
    for round in $(seq "$ROUNDS"); do
        start_daemons "name=vm1,path=$SHM/vm1.img,socket=$WORK/vm1.sock"
        order=(none async); (( round % 2 == 0 )) && order=(async none)
        for tool in "${order[@]}"; do
            echo "$round $tool $("iops_$tool" "iops$round")" | tee -a "$out"
        done
        stop_daemons
    done
    rm -rf "$SHM"/*
    python3 - "$out" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r, tool, iops = line.split()
    runs[r][tool] = float(iops)
none = [v["none"] for v in runs.values()]; repl = [v["async"] for v in runs.values()]
ratios = [v["async"] / v["none"] for v in runs.values()]
print(f"iops: no replication median {statistics.median(none):,.0f}  runs {[int(x) for x in none]}")
print(f"iops: async group     median {statistics.median(repl):,.0f}  runs {[int(x) for x in repl]}")
print(f"iops: async/none      median {statistics.median(ratios):.2f}x  rounds {[round(x, 2) for x in ratios]}")
PY
}

# ---- copy ----------------------------------------------------------------------------------

# A TLS 1.3 stream of N bytes from A to B with the daemons' certificates, mutual.
TLS_RECEIVER='
import socket, ssl, sys
d, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(d + "/server-cert.pem", d + "/server-key.pem")
ctx.load_verify_locations(d + "/ca-cert.pem"); ctx.verify_mode = ssl.CERT_REQUIRED
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    t = ctx.wrap_socket(c, server_side=True)
    want = int(t.recv(32).split(b"\n")[0]); got = 0
    while got < want:
        b = t.recv(1 << 20)
        if not b: break
        got += len(b)
    t.sendall(b"k"); t.close()
'
TLS_SENDER='
import os, socket, ssl, sys, time
d, addr, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(d + "/client-cert.pem", d + "/client-key.pem")
ctx.load_verify_locations(d + "/ca-cert.pem")
block = os.urandom(1 << 20)
t0 = time.monotonic()
t = ctx.wrap_socket(socket.create_connection((addr, port)), server_hostname=addr)
t.sendall(b"%d\n" % n + b" " * (31 - len(b"%d" % n)))
sent = 0
while sent < n:
    k = min(len(block), n - sent); t.sendall(block[:k]); sent += k
assert t.recv(1) == b"k"
print(n / (time.monotonic() - t0) / 2**20)
'

tls_stream() {  # tls_stream BYTES: MiB/s
    in_a python3 -c "$TLS_SENDER" "$WORK/pki/a" "$ADDR_B" "$STREAM_PORT" "$1"
}

copy_initial() {  # copy_initial GROUP: MiB/s
    local t0 t1
    t0=$(now)
    start_group "$1" vm1
    wait_for "the initial copy of $1" caught_up "$1"
    t1=$(now)
    python3 -c "print($SIZE_MIB / ($t1 - $t0))"
}

# resync_done GROUP CHANGED: a resync began after CHANGED bytes were marked and B has it all.
resync_done() {
    local state lag changed
    read -r state lag changed < <(status "$1" state lag-records resync-changed-bytes)
    [[ $state == replicating && $lag == 0 ]] && (( changed > $2 ))
}

# copy_resync GROUP: "MiB/s resync-bytes changed-bytes" of one resync after a pause with
# 4K random writes over the volume.
copy_resync() {
    local group=$1 t0 t1 before after changed changed_after
    "$FERRY" replicate pause --control "$WORK/a.ctl" --group "$group" >/dev/null
    bench_json "$WORK/vm1.sock" --rw randwrite --bs 4K --qd 32 --secs "${RESYNC_WRITE_SECS:-0.3}" --ramp 0 >/dev/null
    read -r before changed < <(status "$group" resync-bytes resync-changed-bytes)
    t0=$(now)
    "$FERRY" replicate resume --control "$WORK/a.ctl" --group "$group" >/dev/null
    wait_for "the resync of $group" resync_done "$group" "$changed"
    t1=$(now)
    read -r after changed_after < <(status "$group" resync-bytes resync-changed-bytes)
    python3 -c "print(($after - $before) / ($t1 - $t0) / 2**20, $after - $before, $changed_after - $changed)"
}

part_copy() {
    local out=$WORK/copy.txt round stream initial resync
    fill "$SHM/vm1.img" "$SIZE_MIB"
    ip netns exec "$NS_B" python3 -c "$TLS_RECEIVER" "$WORK/pki/b" "$ADDR_B" "$STREAM_PORT" >"$WORK/receiver.log" 2>&1 &
    RECEIVER_PID=$!
    wait_for "the TLS receiver" grep -q listening "$WORK/receiver.log"
    for round in $(seq "$ROUNDS"); do
        start_daemons "name=vm1,path=$SHM/vm1.img,socket=$WORK/vm1.sock"
        limit_link "$LINK"
        if (( round % 2 )); then
            stream=$(tls_stream $((SIZE_MIB << 20))); initial=$(copy_initial "copy$round")
        else
            initial=$(copy_initial "copy$round"); stream=$(tls_stream $((SIZE_MIB << 20)))
        fi
        resync=$(copy_resync "copy$round")
        stop_group "copy$round"
        echo "$round $stream $initial $resync" | tee -a "$out"
        limit_link none
        stop_daemons
    done
    rm -rf "$SHM"/*
    python3 - "$out" "$LINK" <<'PY'
import statistics, sys
rows = [[float(x) for x in l.split()] for l in open(sys.argv[1])]
m = lambda xs: statistics.median(xs)
print(f"copy ({sys.argv[2]} link): TLS stream median {m([r[1] for r in rows]):.1f} MiB/s  runs {[round(r[1], 1) for r in rows]}")
print(f"copy: initial copy median {m([r[2] for r in rows]):.1f} MiB/s  runs {[round(r[2], 1) for r in rows]}")
print(f"copy: initial/stream median {m([r[2] / r[1] for r in rows]):.2f}x  rounds {[round(r[2] / r[1], 2) for r in rows]}")
print(f"copy: resync median {m([r[3] for r in rows]):.1f} MiB/s  runs {[round(r[3], 1) for r in rows]}")
print(f"copy: resync/stream median {m([r[3] / r[1] for r in rows]):.2f}x  rounds {[round(r[3] / r[1], 2) for r in rows]}")
print(f"copy: resync bytes/changed median {m([r[4] / r[5] for r in rows]):.3f}x  rounds {[round(r[4] / r[5], 3) for r in rows]}  changed MiB {[round(r[5] / 2**20) for r in rows]}")
PY
}

# ---- promote -------------------------------------------------------------------------------

part_promote() {
    local out=$WORK/promote.txt round i specs=() vols=() writers t0 t1 group
    for i in $(seq 8); do
        truncate -s 64M "$SHM/p$i.img"
        specs+=("name=p$i,path=$SHM/p$i.img,socket=$WORK/p$i.sock"); vols+=("p$i")
    done
    for round in $(seq "$ROUNDS"); do
        group=promote$round
        start_daemons "${specs[@]}"
        start_group "$group" "${vols[@]}"
        wait_for "the initial copy of $group" caught_up "$group"
        writers=()
        for i in $(seq 8); do
            bench_json "$WORK/p$i.sock" --rw randwrite --bs 4K --qd 8 --secs "$SECS" --ramp 0 >/dev/null &
            writers+=($!)
        done
        sleep "$(python3 -c "print($SECS / 2)")"
        in_a ip link set ferry0 down
        wait "${writers[@]}"
        stop_group "$group"
        t0=$(now)
        "$FERRY" replicate promote --control "$WORK/b.ctl" --group "$group" --at latest >"$WORK/promote.log"
        t1=$(now)
        in_a ip link set ferry0 up
        echo "$round $(python3 -c "print(round(($t1 - $t0) * 1000))") $(cat "$WORK/promote.log")" | tee -a "$out"
        stop_daemons
    done
    rm -rf "$SHM"/*
    python3 - "$out" <<'PY'
import statistics, sys
ms = [int(l.split()[1]) for l in open(sys.argv[1])]
print(f"promote (8 volumes, latest): median {statistics.median(ms)} ms  runs {ms}")
PY
}

# ---- lag -----------------------------------------------------------------------------------

part_lag() {
    local out=$WORK/lag.txt round rate link writer group
    truncate -s "${SIZE_MIB}M" "$SHM/vm1.img"
    for round in $(seq "$ROUNDS"); do
        group=lag$round
        start_daemons "name=vm1,path=$SHM/vm1.img,socket=$WORK/vm1.sock"
        start_group "$group" vm1
        wait_for "the initial copy of $group" caught_up "$group"
        # The writer's rate in the group over the unlimited link sets the link: the writer then
        # uses LAG_LOAD of it (its rate with the link limited is printed beside).
        rate=$(bench_json "$WORK/vm1.sock" --rw randwrite --bs 4K --qd 1 --secs 2 --ramp 0.5 | json_field mib_per_sec)
        link=$(python3 -c "print(int($rate * 2**20 * 8 / $LAG_LOAD / 1000))")kbit
        wait_for "$group to catch up" caught_up "$group"
        limit_link "$link"
        bench_json "$WORK/vm1.sock" --rw randwrite --bs 4K --qd 1 --secs "${LAG_SECS:-10}" --ramp 0 >"$WORK/lag-bench.json" &
        writer=$!
        : >"$WORK/lag-samples.txt"
        while kill -0 "$writer" 2>/dev/null; do
            status "$group" lag-seconds state >>"$WORK/lag-samples.txt"; sleep 0.1
        done
        wait "$writer"
        limit_link none
        python3 - "$WORK/lag-samples.txt" "$WORK/lag-bench.json" "$rate" "$link" "$round" <<'PY' | tee -a "$out"
import json, sys
s = [l.split() for l in open(sys.argv[1]) if l.strip()]
lag = sorted(float(x[0]) for x in s); states = sorted(set(x[1] for x in s))
bw = json.load(open(sys.argv[2]))["mib_per_sec"] * 2**20
p99 = lag[min(len(lag) - 1, int(len(lag) * 0.99))]
print(f"{sys.argv[5]} link {sys.argv[4]} writer {float(sys.argv[3]):.2f} MiB/s on the unlimited link, {bw / 2**20:.2f} MiB/s on the limited one p50 {lag[len(lag) // 2]:.3f} p99 {p99:.3f} max {lag[-1]:.3f} samples {len(lag)} states {','.join(states)}")
PY
        stop_group "$group"
        stop_daemons
    done
    rm -rf "$SHM"/*
    python3 - "$out" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
p99 = [float(r[r.index("p99") + 1]) for r in rows]
print(f"lag: p99 lag-seconds median {statistics.median(p99):.3f} s  rounds {p99}")
PY
}

make_pki
make_network
for part in $PARTS; do "part_$part"; done
