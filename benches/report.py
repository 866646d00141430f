#!/usr/bin/env python3
"""report.py: turns compare.sh's raw runs (ferry bench and fio JSON) into results.json and an
IOPS-by-queue-depth plot (gnuplot), and writes docs/BENCHMARKS.md: benches/report-template.md
with its {{markers}} replaced by the comparison's commands and tables (medians, min..max
spread, ratios), the tables benches/migration.sh, benches/mirror_cost.sh and benches/journal.sh left beside
results.json, and the machine. Python 3 standard library only."""

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile

RAW_NAME = re.compile(r"^(?P<backend>[a-z]+)-(?P<mode>[a-z]+)-(?P<workload>.+)-r(?P<round>\d+)\.json$")
WORKLOAD = re.compile(r"^(?P<rw>[a-z]+)-(?P<bs>\d+k)-qd(?P<qd>\d+)$")
METRICS = ["iops", "mib_per_sec", "lat_mean_us", "lat_p50_us", "lat_p99_us", "lat_p99_9_us",
           "client_cpu_percent", "backend_cpu_percent"]


def from_ferry_bench(r):
    lat = r["latency_us"]
    wall = r["secs"] + r.get("ramp_secs", 0.0)
    return {
        "iops": r["iops"], "mib_per_sec": r["mib_per_sec"], "lat_mean_us": lat["mean"],
        "lat_p50_us": lat["p50"], "lat_p99_us": lat["p99"], "lat_p99_9_us": lat["p99_9"],
        "client_cpu_percent": r["cpu"]["percent_of_one_core"],
        # Backend CPU is sampled around the whole bench process (ramp included).
        "backend_cpu_percent": 100.0 * r.get("backend_cpu_secs", 0.0) / wall if wall > 0 else None,
    }


def from_fio(r):
    job = r["jobs"][0]
    parts = [job[d] for d in ("read", "write") if job[d]["total_ios"] > 0]
    main = max(parts, key=lambda p: p["total_ios"])
    pct = main["clat_ns"].get("percentile", {})

    def p(key):
        v = pct.get(key)
        return v / 1000.0 if v is not None else None

    return {
        "iops": sum(x["iops"] for x in parts),
        "mib_per_sec": sum(x["bw_bytes"] for x in parts) / 1048576.0,
        "lat_mean_us": main["lat_ns"]["mean"] / 1000.0,
        "lat_p50_us": p("50.000000"), "lat_p99_us": p("99.000000"), "lat_p99_9_us": p("99.900000"),
        # fio is client and "backend" at once: its own CPU use.
        "client_cpu_percent": job["usr_cpu"] + job["sys_cpu"],
        "backend_cpu_percent": None,
    }


def load_runs(raw_dir):
    runs = []
    for path in sorted(glob.glob(os.path.join(raw_dir, "*.json"))):
        m = RAW_NAME.match(os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            r = json.load(f)
        metrics = from_fio(r) if m["backend"] == "fio" else from_ferry_bench(r)
        runs.append({"backend": m["backend"], "mode": m["mode"], "workload": m["workload"],
                     "round": int(m["round"]), **metrics})
    return runs


def summarize(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(runs):
    groups = {}
    for r in runs:
        groups.setdefault((r["workload"], r["backend"], r["mode"]), []).append(r)
    out = []
    for (workload, backend, mode), rs in groups.items():
        entry = {"workload": workload, "backend": backend, "mode": mode, "rounds": len(rs)}
        m = WORKLOAD.match(workload)
        if m:
            entry.update(rw=m["rw"], bs=m["bs"].upper(), qd=int(m["qd"]))
        for k in METRICS:
            entry[k] = summarize([r[k] for r in rs])
        out.append(entry)
    return out


def median_of(summary, workload, backend, mode, metric="iops"):
    for e in summary:
        if e["workload"] == workload and e["backend"] == backend and e["mode"] == mode and e[metric]:
            return e[metric]["median"]
    return None


def ratios(summary):
    out = []
    workloads = sorted({e["workload"] for e in summary}, key=workload_order)
    modes = sorted({e["mode"] for e in summary if e["backend"] != "fio"})
    for w in workloads:
        fio = median_of(summary, w, "fio", "none")
        for mode in modes:
            ferry, qsd = median_of(summary, w, "ferry", mode), median_of(summary, w, "qsd", mode)
            div = lambda a, b: a / b if a is not None and b else None
            out.append({"workload": w, "mode": mode, "ferry_over_qsd": div(ferry, qsd),
                        "ferry_over_fio": div(ferry, fio), "qsd_over_fio": div(qsd, fio)})
    return out


def workload_order(name):
    m = WORKLOAD.match(name)
    if not m:
        return (9, name, 0)
    kind = ["randread", "randwrite", "randrw", "read", "write"].index(m["rw"]) if m["rw"] in (
        "randread", "randwrite", "randrw", "read", "write") else 9
    return (kind, m["bs"], int(m["qd"]))


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def cell(s, digits=0, spread=True):
    if not s:
        return "–"
    if not spread or s["n"] < 2:
        return fmt(s["median"], digits)
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}..{fmt(s['max'], digits)})"


def ratio_cell(v):
    return "–" if v is None else f"{v:.2f}"


BACKEND_LABEL = {"ferry": "ferry", "qsd": "qemu-storage-daemon", "fio": "fio (raw file)"}


def compare_reproduce(machine):
    """The commands of the comparison run, as a shell block."""
    c = machine.get("commands", {})
    return "\n".join([
        "```sh",
        f"SECS={machine.get('secs')} RAMP={machine.get('ramp')} ROUNDS={machine.get('rounds')} SIZE={machine.get('size')} benches/compare.sh",
        "# image:   " + c.get("image", ""),
        "# qsd:     " + c.get("qsd", ""),
        "# ferry:   " + c.get("ferry", ""),
        "# client:  " + c.get("bench", ""),
        "# ceiling: " + c.get("fio", ""),
        "```",
    ])


def compare_tables(machine, summary, ratio_rows, plot_name):
    """The comparison's tables: ratios, every figure, the plot."""
    lines = [
        f"Run of {machine.get('date', '')} on commit {machine.get('ferry_commit', '')}: "
        f"{machine.get('rounds')} rounds × {machine.get('secs')} s (+{machine.get('ramp')} s ramp), "
        f"image {machine.get('size')} on /dev/shm, backends {' '.join(machine.get('backends', []))}, "
        f"client modes {' '.join(machine.get('modes', []))}; load average "
        f"{' '.join(machine.get('loadavg_start', []))} at the start, "
        f"{' '.join(machine.get('loadavg_end', []))} at the end.",
        "",
        "IOPS ratios (medians):",
        "",
        "| workload | client | ferry / qsd | ferry / fio | qsd / fio |",
        "|---|---|---:|---:|---:|",
    ]
    for r in ratio_rows:
        lines.append(f"| {r['workload']} | {r['mode']} | {ratio_cell(r['ferry_over_qsd'])} | "
                     f"{ratio_cell(r['ferry_over_fio'])} | {ratio_cell(r['qsd_over_fio'])} |")
    lines += [
        "",
        "Every figure: median over rounds, (min..max) across rounds. Latency in µs, completion latency",
        "as seen by the client. Client CPU: % of one core used by `ferry bench` (for fio: fio itself).",
        "Backend CPU: % of one core used by the daemon during the client run (ramp included).",
        "",
        "| workload | backend | client | IOPS | MiB/s | mean | p50 | p99 | p99.9 | client CPU % | backend CPU % |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {"ferry": 0, "qsd": 1, "fio": 2}
    for e in sorted(summary, key=lambda e: (workload_order(e["workload"]), order.get(e["backend"], 9), e["mode"])):
        lines.append(
            f"| {e['workload']} | {BACKEND_LABEL.get(e['backend'], e['backend'])} | "
            f"{'–' if e['mode'] == 'none' else e['mode']} | {cell(e['iops'])} | "
            f"{cell(e['mib_per_sec'], 1, False)} | {cell(e['lat_mean_us'], 1, False)} | "
            f"{cell(e['lat_p50_us'], 1, False)} | {cell(e['lat_p99_us'], 1)} | {cell(e['lat_p99_9_us'], 1, False)} | "
            f"{cell(e['client_cpu_percent'], 0, False)} | {cell(e['backend_cpu_percent'], 0, False)} |")
    if plot_name:
        lines += ["", "IOPS by queue depth (4K random):", "", f"![IOPS by queue depth]({plot_name})"]
    return "\n".join(lines)


def machine_table(machine):
    """The machine the comparison ran on."""
    return "\n".join([
        "| | |", "|---|---|",
        f"| CPU | {machine.get('cpu_model', '')} |",
        f"| nproc | {machine.get('nproc', '')} |",
        f"| kernel | {machine.get('kernel', '')} |",
        f"| memory | {machine.get('mem_total', '')} |",
        f"| QEMU | {machine.get('qemu', '')} |",
        f"| fio | {machine.get('fio', '')} |",
    ])


def section(out_dir, name, script):
    """A table written by another benchmark script, or a line saying how to get it."""
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return f"(not run: `bash benches/{script}` writes it before `benches/compare.sh` runs)"
    with open(path) as f:
        return f.read().strip("\n")


def markdown(template, parts):
    """The template with every `{{name}}` replaced by its part."""
    for name, text in parts.items():
        marker = "{{" + name + "}}"
        if marker not in template:
            raise SystemExit(f"report.py: the template has no {marker}")
        template = template.replace(marker, text)
    return template


def plot(summary, path):
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        print("report.py: gnuplot not found, no plot (apt-get install gnuplot-nox)")
        return False
    series = []  # (label, backend, mode)
    for backend in ("ferry", "qsd"):
        for mode in ("poll", "wait"):
            if any(e["backend"] == backend and e["mode"] == mode for e in summary):
                series.append((f"{backend} {mode}", backend, mode))
    if any(e["backend"] == "fio" for e in summary):
        series.append(("fio (raw file)", "fio", "none"))
    with tempfile.TemporaryDirectory() as tmp:
        panels = []
        for rw in ("randread", "randwrite"):
            plots = []
            for i, (label, backend, mode) in enumerate(series):
                pts = sorted((e["qd"], e["iops"]["median"], e["iops"]["min"], e["iops"]["max"]) for e in summary
                             if e.get("rw") == rw and e.get("bs") == "4K" and e["backend"] == backend
                             and e["mode"] == mode and e["iops"])
                if not pts:
                    continue
                data = os.path.join(tmp, f"{rw}-{i}.dat")
                with open(data, "w") as f:
                    f.writelines(f"{qd} {med / 1000:.3f} {lo / 1000:.3f} {hi / 1000:.3f}\n" for qd, med, lo, hi in pts)
                plots.append(f"'{data}' using 1:2:3:4 with yerrorlines lw 2 pt 7 title '{label}'")
            if plots:
                panels.append(f"set title '4K {rw}'\nplot " + ", \\\n  ".join(plots))
        if not panels:
            return False
        script = "\n".join([
            f"set terminal pngcairo size {600 * len(panels)},450 font 'sans,10'",
            f"set output '{path}'",
            "set logscale x 2", "set xrange [0.7:200]", "set xtics (1, 8, 32, 128)",
            "set xlabel 'queue depth'", "set ylabel 'kIOPS (median, min..max)'",
            "set yrange [0:*]", "set grid", "set key top left",
            f"set multiplot layout 1,{len(panels)}",
            *panels, "unset multiplot",
        ])
        res = subprocess.run([gnuplot], input=script, text=True, capture_output=True)
        if res.returncode != 0:
            print("report.py: gnuplot failed:", res.stderr.strip())
            return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--raw", required=True)
    ap.add_argument("--machine", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--markdown", required=True)
    ap.add_argument("--plot")
    ap.add_argument("--template", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "report-template.md"))
    a = ap.parse_args()
    with open(a.machine) as f:
        machine = json.load(f)
    runs = load_runs(a.raw)
    if not runs:
        raise SystemExit(f"report.py: no runs in {a.raw}")
    summary = aggregate(runs)
    ratio_rows = ratios(summary)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"machine": machine, "summary": summary, "ratios": ratio_rows, "runs": runs}, f, indent=1)
    plotted = False
    if a.plot:
        os.makedirs(os.path.dirname(os.path.abspath(a.plot)), exist_ok=True)
        plotted = plot(summary, a.plot)
    os.makedirs(os.path.dirname(os.path.abspath(a.markdown)), exist_ok=True)
    rel = os.path.relpath(a.plot, os.path.dirname(os.path.abspath(a.markdown))) if plotted else None
    # The tables benches/migration.sh, mirror_cost.sh and journal.sh wrote beside results.json, and
    # the hand-written rest of the report from the template.
    out_dir = os.path.dirname(os.path.abspath(a.json))
    with open(a.template) as f:
        template = f.read()
    parts = {
        "compare_reproduce": compare_reproduce(machine),
        "compare_tables": compare_tables(machine, summary, ratio_rows, rel),
        "migration_table": section(out_dir, "migration-table.md", "migration.sh"),
        "mirror_cost_table": section(out_dir, "mirror-cost.md", "mirror_cost.sh"),
        "journal_table": section(out_dir, "journal-table.md", "journal.sh"),
        "machine": machine_table(machine),
    }
    with open(a.markdown, "w") as f:
        f.write(markdown(template, parts))
    print(f"report.py: {len(runs)} runs -> {a.json}, {a.markdown}" + (f", {a.plot}" if plotted else ""))
    for r in ratio_rows:
        print(f"  {r['workload']:<20} {r['mode']:<5} ferry/qsd {ratio_cell(r['ferry_over_qsd']):>5}  "
              f"ferry/fio {ratio_cell(r['ferry_over_fio']):>5}  qsd/fio {ratio_cell(r['qsd_over_fio']):>5}")


if __name__ == "__main__":
    main()
