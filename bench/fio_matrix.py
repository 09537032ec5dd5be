#!/usr/bin/env python3
"""Table for bench/fio-matrix.sh: reads OUT/runs.tsv and the fio JSON files it
names, writes OUT/results.tsv (one row per run), OUT/table.txt and
OUT/table.md, and prints table.txt.

Usage: fio_matrix.py OUTDIR
"""
import csv
import json
import os
import sys

TEST_DESC = {
    "rr4k-qd1": "4k randread QD1",
    "rr4k-qd32": "4k randread QD32",
    "rw4k-qd1": "4k randwrite QD1",
    "rw4k-qd32": "4k randwrite QD32",
    "sr1m-qd8": "1M read QD8",
    "sw1m-qd8": "1M write QD8",
}


def fnum(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def load_json(path):
    """fio JSON; tolerates text before the first '{' (fio warnings)."""
    try:
        text = open(path, errors="replace").read()
    except OSError:
        return None
    i = text.find("{")
    if i < 0:
        return None
    try:
        return json.loads(text[i:])
    except ValueError:
        return None


def fio_error_text(path, limit=6):
    """The lines fio printed on stderr, minus the cosmetic iodepth note."""
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return ""
    keep = [l.strip() for l in lines
            if l.strip() and "both iodepth >= 1 and synchronous I/O engine" not in l]
    return " | ".join(keep[-limit:])


def measure(out, row):
    """One run -> dict of metrics (None where unknown) + 'err'."""
    m = {"test": row["test"], "target": row["target"], "err": None}
    rc = row["rc"]
    why = row.get("why") or ""
    if rc == "DEAD":
        m["err"] = why or "target process gone before the run"
        return m
    j = load_json(os.path.join(out, row["json"])) if row["json"] else None
    job = None
    if j and j.get("jobs"):
        job = j["jobs"][0]
    if job is None:
        text = fio_error_text(os.path.join(out, row["log"]))
        m["err"] = "fio rc=%s%s, no JSON; fio printed: %s" % (
            rc, " (%s)" % why if why else "", text or "(nothing)")
        return m
    d = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    if job["read"]["io_bytes"] == 0 and job["write"]["io_bytes"] == 0:
        d = job["write"] if row["test"].startswith(("rw", "sw")) else job["read"]
    pct = d.get("clat_ns", {}).get("percentile", {})
    m["iops"] = d["iops"]
    m["mib_s"] = d["bw_bytes"] / 2**20
    m["ios"] = d.get("total_ios")
    m["lat_mean_us"] = d["lat_ns"]["mean"] / 1000
    m["p50_us"] = pct["50.000000"] / 1000 if "50.000000" in pct else None
    m["p99_us"] = pct["99.000000"] / 1000 if "99.000000" in pct else None
    m["p999_us"] = pct["99.900000"] / 1000 if "99.900000" in pct else None
    runtime_s = job.get("job_runtime", 0) / 1000 or None
    m["fio_cpu_pct"] = (job.get("usr_cpu", 0) + job.get("sys_cpu", 0))
    tck = fnum(row["tck"]) or 100.0
    cw, win = fnum(row["cpu_ticks_window"]), fnum(row["window_s"])
    ct = fnum(row["cpu_ticks_total"])
    m["tgt_cpu_pct"] = None
    m["cpu_us_per_io"] = None
    m["cpu_us_per_io_total"] = None
    if cw is not None and win and win > 0:
        m["tgt_cpu_pct"] = 100 * cw / tck / win
        if m["iops"] > 0:
            # CPU seconds in the steady-state window / I/Os done in that window
            m["cpu_us_per_io"] = (cw / tck) * 1e6 / (m["iops"] * win)
    if ct is not None and m["ios"]:
        # whole fio lifetime (login + ramp + run + logout) / measured I/Os: an upper bound
        m["cpu_us_per_io_total"] = (ct / tck) * 1e6 / m["ios"]
    sysb = fnum(row["sys_busy_pct"])
    m["sys_busy_pct"] = sysb
    m["bg_busy_pct"] = fnum(row["bg_busy_pct"])
    m["other_cpu_pct"] = None
    if sysb is not None and m["tgt_cpu_pct"] is not None:
        m["other_cpu_pct"] = sysb * (os.cpu_count() or 1) - m["tgt_cpu_pct"] - m["fio_cpu_pct"]
    m["runtime_s"] = runtime_s
    errs = []
    if rc != "0":
        errs.append("fio rc=%s" % rc)
    if job.get("error"):
        errs.append("fio error %s" % job["error"])
    if why:
        errs.append(why)
    if errs:
        m["err"] = "; ".join(errs) + ": " + fio_error_text(os.path.join(out, row["log"]))
    return m


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


COLS = ["test", "target", "rep", "iops", "mib_s", "lat_mean_us", "p50_us", "p99_us", "p999_us",
        "cpu_us_per_io", "cpu_us_per_io_total", "tgt_cpu_pct", "fio_cpu_pct",
        "sys_busy_pct", "other_cpu_pct", "bg_busy_pct", "ios", "err"]
HEAD = ["test", "tgt IOPS", "nvt IOPS", "ratio", "tgt MiB/s", "nvt MiB/s",
        "tgt p99 us", "nvt p99 us", "tgt CPU us/IO", "nvt CPU us/IO"]


def main():
    out = sys.argv[1]
    with open(os.path.join(out, "runs.tsv")) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    runs = []
    for r in rows:
        m = measure(out, r)
        m["rep"] = r.get("rep") or "1"
        runs.append(m)

    with open(os.path.join(out, "results.tsv"), "w") as f:
        f.write("\t".join(COLS) + "\n")
        for m in runs:
            vals = []
            for c in COLS:
                v = m.get(c)
                if isinstance(v, float):
                    v = "%.1f" % v
                vals.append("NA" if v is None else str(v))
            f.write("\t".join(vals) + "\n")

    tests = list(dict.fromkeys(m["test"] for m in runs))
    reps = sorted(set(m["rep"] for m in runs), key=int)
    group = {}
    for m in runs:
        group.setdefault((m["test"], m["target"]), []).append(m)

    def cell(test, target, k, spec):
        ms = group.get((test, target), [])
        if not ms:
            return "-"
        ok = [m for m in ms if not m.get("err")]
        if not ok:
            return "ERR"
        v = fmt(median(m.get(k) for m in ok), spec)
        return v + "!" if len(ok) < len(ms) else v

    table, notes = [], []
    for t in tests:
        by_rep = {(m["target"], m["rep"]): m for m in group.get((t, "tgt"), []) + group.get((t, "nvt"), [])}
        ratios = []
        for rep in reps:
            a, b = by_rep.get(("tgt", rep)), by_rep.get(("nvt", rep))
            if a and b and not a.get("err") and not b.get("err") and a.get("iops"):
                ratios.append(b["iops"] / a["iops"])
        if not ratios:
            ratio = "-"
        elif len(ratios) == 1:
            ratio = "%.2fx" % ratios[0]
        else:
            ratio = "%.2fx (%.2f-%.2f)" % (median(ratios), min(ratios), max(ratios))
        table.append([t, cell(t, "tgt", "iops", ".0f"), cell(t, "nvt", "iops", ".0f"), ratio,
                      cell(t, "tgt", "mib_s", ".1f"), cell(t, "nvt", "mib_s", ".1f"),
                      cell(t, "tgt", "p99_us", ".0f"), cell(t, "nvt", "p99_us", ".0f"),
                      cell(t, "tgt", "cpu_us_per_io", ".1f"), cell(t, "nvt", "cpu_us_per_io", ".1f")])
        for m in group.get((t, "tgt"), []) + group.get((t, "nvt"), []):
            where = "%s %s%s" % (m["target"], t, " rep %s" % m["rep"] if len(reps) > 1 else "")
            if m.get("err"):
                notes.append("%s: %s" % (where, m["err"]))
            elif (m.get("bg_busy_pct") or 0) > 20 or (m.get("other_cpu_pct") or 0) > 30:
                notes.append("%s: noisy (background %.0f%% of all cores before the run, "
                             "%.0f%% of one core used by neither target nor fio during it)"
                             % (where, m.get("bg_busy_pct") or 0, m.get("other_cpu_pct") or 0))

    widths = [max(len(r[i]) for r in [HEAD] + table) for i in range(len(HEAD))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [HEAD] + table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    meta = ""
    try:
        meta = open(os.path.join(out, "meta.txt")).readline().strip()
    except OSError:
        pass
    legend = ["ratio = nvt IOPS / tgt IOPS (>1: nvtarget faster). p99 = fio completion latency.",
              "CPU us/IO = target process utime+stime in the steady-state window / I/Os in it."]
    if len(reps) > 1:
        legend.append("%d repetitions: medians; ratio = median of per-repetition ratios (min-max)."
                      % len(reps))
    if any(c.endswith("!") for r in table for c in r):
        legend.append("'!' = some repetitions failed; the value is the median of the others.")
    txt = "\n".join(lines) + "\n\n" + "\n".join(legend)
    if notes:
        txt += "\n\nnotes:\n" + "\n".join("  " + n for n in notes)
    txt += "\n\n" + meta + "\n"
    md = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    md += ["| " + " | ".join(r) + " |" for r in table]
    mdtxt = "\n".join(md) + "\n\n" + "\n".join(legend) + "\n"
    if notes:
        mdtxt += "\nNotes:\n\n" + "\n".join("- " + n for n in notes) + "\n"
    mdtxt += "\n`" + meta + "`\n"
    open(os.path.join(out, "table.txt"), "w").write(txt)
    open(os.path.join(out, "table.md"), "w").write(mdtxt)
    sys.stdout.write(txt)
    return 3 if any(m.get("err") for m in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
