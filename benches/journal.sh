#!/usr/bin/env bash
# journal.sh: what the write journal costs. 4 KiB random writes at QD 32 through `ferry bench`
# (a libblkio vhost-user-blk client) with the journal off, in sync mode and in async mode, in
# the same run, alternating round by round (medians of ROUNDS); then 128 KiB sequential writes
# at QD 8 with the journal on (sync, async) and off, against `dd` of 128 KiB blocks to the same
# filesystem (the ceiling of the journal's appends). Image and journal live on /dev/shm; the
# sync-disk and async-disk runs put the journal on a disk filesystem (DISK_DIR), where media
# are appended with O_DIRECT (`cache=auto`), with `dd oflag=direct` to that disk (dd-disk).
# Caveat: on a memory-limited machine, GiBs of journal on tmpfs slow every tmpfs writer down
# (dd too), so each run's journal is deleted right after it.
# The daemon's CPU time per I/O (utime + stime of `ferry serve` over ramp + run, from
# /proc/PID/stat) is reported too: the ratios swing with the machine, the CPU cost much less.
# Prints a markdown table and writes target/bench/journal.json.
#
# Environment (defaults in brackets):
#   SECS [3] RAMP [1] ROUNDS [7]   measurement / warm-up seconds per run, rounds
#   SIZE [512M]                    image size;  DD_COUNT [8192] 128 KiB blocks per dd run
#   WARM_MIB [6144]                tmpfs touched once before measuring (VM first-touch cost)
#   FERRY [target/release/ferry]   the ferry binary (built with cargo unless FERRY is set)
#   WORKDIR [/dev/shm/ferry-jbench.PID]  OUT [target/bench]
#   DISK_DIR [/var/tmp]            where the -disk journals go ("" to skip them)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECS=${SECS:-3}
RAMP=${RAMP:-1}
ROUNDS=${ROUNDS:-7}
SIZE=${SIZE:-512M}
DD_COUNT=${DD_COUNT:-8192}
OUT=${OUT:-$ROOT/target/bench}
WORKDIR=${WORKDIR:-/dev/shm/ferry-jbench.$$}
SOCKET_WAIT_SECS=10
CONFIGS=(off sync async)
DISK_DIR=${DISK_DIR-/var/tmp}

log() { printf '[journal-bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ -z "${FERRY:-}" ]]; then
    log "building ferry (release)"
    (cd "$ROOT" && cargo build --release -q -p ferry --bin ferry) || die "cargo build failed"
    FERRY=$ROOT/target/release/ferry
fi
[[ -x "$FERRY" ]] || die "no ferry binary at $FERRY"
command -v jq >/dev/null || die "jq is needed"

IMG=$WORKDIR/bench.img
SOCK=$WORKDIR/vhost.sock
JDIR=$WORKDIR/journal
DISK_WORK=
if [[ -n "$DISK_DIR" ]]; then
    DISK_WORK=$DISK_DIR/ferry-jbench.$$
    CONFIGS+=(sync-disk async-disk)
fi
SERVE_PID=
cleanup() {
    if [[ -n "$SERVE_PID" ]]; then kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; fi
    rm -rf "$WORKDIR" ${DISK_WORK:+"$DISK_WORK"}
}
trap cleanup EXIT
mkdir -p "$WORKDIR" "$OUT" ${DISK_WORK:+"$DISK_WORK"}
truncate -s "$SIZE" "$IMG"

# journal_dir CONFIG: where CONFIG's journal lives.
journal_dir() { if [[ $1 == *-disk ]]; then echo "$DISK_WORK/journal"; else echo "$JDIR"; fi; }

# start_serve CONFIG: ferry serve on the image, with the journal per CONFIG (fresh directory).
start_serve() {
    local config=$1 args=(--volume "name=bench,path=$IMG,socket=$SOCK") dir
    dir=$(journal_dir "$config")
    rm -rf "$dir"
    [[ "$config" != off ]] && args+=(--journal "dir=$dir,mode=${config%-disk},capacity=4G")
    "$FERRY" serve "${args[@]}" >"$WORKDIR/serve.log" 2>&1 &
    SERVE_PID=$!
    local i
    for ((i = 0; i < SOCKET_WAIT_SECS * 20; i++)); do
        [[ -S "$SOCK" ]] && return 0
        kill -0 "$SERVE_PID" 2>/dev/null || die "ferry serve exited; $(cat "$WORKDIR/serve.log")"
        sleep 0.05
    done
    die "no socket after ${SOCKET_WAIT_SECS}s"
}

stop_serve() {
    kill -TERM "$SERVE_PID"
    wait "$SERVE_PID" || die "ferry serve exited non-zero; $(cat "$WORKDIR/serve.log")"
    SERVE_PID=
}

TICK_US=$((1000000 / $(getconf CLK_TCK)))
# cpu_ticks PID: utime + stime of the process so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# bench CONFIG RW BS QD -> one JSON object on stdout, with the journal's bytes and the
# daemon's CPU time added.
bench() {
    local config=$1 rw=$2 bs=$3 qd=$4 json jbytes=0 t0 t1
    start_serve "$config"
    t0=$(cpu_ticks "$SERVE_PID")
    json=$("$FERRY" bench --socket "$SOCK" --rw "$rw" --bs "$bs" --qd "$qd" \
        --secs "$SECS" --ramp "$RAMP" --wait --json) || die "ferry bench failed"
    t1=$(cpu_ticks "$SERVE_PID")
    stop_serve
    local dir
    dir=$(journal_dir "$config")
    [[ -d "$dir" ]] && jbytes=$(du -sb "$dir" | cut -f1)
    # Free the journal's memory now: a few GiB left on tmpfs slow down later runs (and dd).
    rm -rf "$dir"
    jq -c --arg config "$config" --argjson jbytes "$jbytes" \
        --argjson cpu_us $(((t1 - t0) * TICK_US)) --argjson secs $((SECS + RAMP)) \
        '{config: $config, iops, mib_per_sec, p50_us: .latency_us.p50, p99_us: .latency_us.p99,
          cpu_percent: .cpu.percent_of_one_core, journal_bytes: $jbytes,
          daemon_us_per_io: ($cpu_us / (.iops * $secs))}' <<<"$json"
}

# dd_run -> MiB/s of DD_COUNT 128 KiB blocks written to WORKDIR (O_DIRECT if the filesystem
# takes it, else buffered with a final fdatasync).
DD_FLAG=oflag=direct
dd if=/dev/zero of="$WORKDIR/dd.probe" bs=128k count=1 oflag=direct 2>/dev/null || DD_FLAG=conv=fdatasync
rm -f "$WORKDIR/dd.probe"
# dd_run [DIR FLAG NAME]: the same into another directory (the disk, oflag=direct).
dd_run() {
    local dir=${1:-$WORKDIR} flag=${2:-$DD_FLAG} name=${3:-dd} start end
    start=$(date +%s.%N)
    dd if=/dev/zero of="$dir/dd.out" bs=128k count="$DD_COUNT" "$flag" 2>/dev/null
    end=$(date +%s.%N)
    rm -f "$dir/dd.out"
    jq -n -c --argjson s "$start" --argjson e "$end" --argjson n "$DD_COUNT" --arg name "$name" \
        '{config: $name, mib_per_sec: ($n * 128 / 1024 / ($e - $s))}'
}

# First touch of memory is slow on a VM: touch WARM_MIB of tmpfs once, so that neither the
# journal nor dd pays for it during a measurement.
log "warming ${WARM_MIB:=6144} MiB of /dev/shm"
dd if=/dev/zero of="$WORKDIR/warm" bs=1M count="$WARM_MIB" 2>/dev/null || true
rm -f "$WORKDIR/warm"

RESULTS=$WORKDIR/results.jsonl
: >"$RESULTS"
log "load before: $(cut -d' ' -f1-3 /proc/loadavg); ${ROUNDS} rounds of ${SECS}s (+${RAMP}s ramp); dd: $DD_FLAG"
for ((round = 1; round <= ROUNDS; round++)); do
    # Rotate the order so no configuration always runs first.
    for ((k = 0; k < ${#CONFIGS[@]}; k++)); do
        config=${CONFIGS[(k + round - 1) % ${#CONFIGS[@]}]}
        log "round $round: randwrite 4K qd32, journal $config"
        bench "$config" randwrite 4K 32 | jq -c --argjson r "$round" '. + {workload: "randwrite-4k-qd32", round: $r}' >>"$RESULTS"
    done
    for ((k = 0; k < ${#CONFIGS[@]}; k++)); do
        config=${CONFIGS[(k + round - 1) % ${#CONFIGS[@]}]}
        log "round $round: write 128K qd8, journal $config"
        bench "$config" write 128K 8 | jq -c --argjson r "$round" '. + {workload: "write-128k-qd8", round: $r}' >>"$RESULTS"
    done
    log "round $round: dd 128K x $DD_COUNT"
    dd_run | jq -c --argjson r "$round" '. + {workload: "write-128k-qd8", round: $r}' >>"$RESULTS"
    if [[ -n "$DISK_WORK" ]]; then
        log "round $round: dd 128K x $DD_COUNT to $DISK_DIR, oflag=direct"
        dd_run "$DISK_WORK" oflag=direct dd-disk | jq -c --argjson r "$round" '. + {workload: "write-128k-qd8", round: $r}' >>"$RESULTS"
    fi
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# Medians per (workload, config); journal MiB/s = journal bytes / (ramp + secs).
jq -s --argjson secs "$SECS" --argjson ramp "$RAMP" --arg load "$LOAD_AFTER" --arg dd "$DD_FLAG" '
  def median: sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
  (map(select(.config == "off")) | map({key: "\(.workload) \(.round)", value: .mib_per_sec})
   | from_entries) as $off
  | {secs: $secs, ramp_secs: $ramp, rounds: (map(.round) | max), load_after: $load, dd_flag: $dd,
   runs: .,
   medians: (group_by([.workload, .config]) | map({
      workload: .[0].workload, config: .[0].config,
      iops: (map(.iops // empty) | median),
      mib_per_sec: (map(.mib_per_sec) | median),
      vs_off: (map(select((.config | startswith("dd") | not) and $off["\(.workload) \(.round)"] != null)
          | .mib_per_sec / $off["\(.workload) \(.round)"]) | median),
      p50_us: (map(.p50_us // empty) | median),
      p99_us: (map(.p99_us // empty) | median),
      cpu_percent: (map(.cpu_percent // empty) | median),
      daemon_us_per_io: (map(.daemon_us_per_io // empty) | median),
      journal_mib_per_sec: (map(select(.journal_bytes != null and .journal_bytes > 0)
          | .journal_bytes / 1048576 / ($secs + $ramp)) | median)}))}' \
    "$RESULTS" >"$OUT/journal.json"

# The table, also for docs/BENCHMARKS.md (benches/report.py puts it in its place).
{
echo
echo "| workload | journal | IOPS | MiB/s | x off (same round) | p50 us | p99 us | bench client CPU % | daemon CPU us/IO | journal MiB/s |"
echo "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"
jq -r '.medians[] | "| \(.workload) | \(.config) | \(.iops // "-" | if type == "number" then floor else . end) | \(.mib_per_sec | floor) | \(.vs_off // "-" | if type == "number" then (. * 100 | round / 100 | tostring) + "x" else . end) | \(.p50_us // "-") | \(.p99_us // "-") | \(.cpu_percent // "-" | if type == "number" then floor else . end) | \(.daemon_us_per_io // "-" | if type == "number" then (. * 100 | round / 100) else . end) | \(.journal_mib_per_sec // "-" | if type == "number" then floor else . end) |"' "$OUT/journal.json"
echo
echo "medians of $ROUNDS rounds, ${SECS}s each after ${RAMP}s ramp; build of commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) ($(date -u +%Y-%m-%d)); load after: $LOAD_AFTER; dd $DD_FLAG; JSON: target/bench/journal.json"
} | tee "$OUT/journal-table.md"
