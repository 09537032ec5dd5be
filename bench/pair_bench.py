#!/usr/bin/env python3
"""HA pair benchmarks (issue 5), fio with the libiscsi engine, loopback only.

Usage: bench/pair-bench.sh [mirror] [reads]      (both when none is named)

mirror: 4 KiB random write, QD32 and QD1, on node a's LUN of a local pair
        (`nvtarget pair up`; every write logged, mirrored to node b and
        acknowledged by b before status) beside the same binary serving alone
        (`nvtarget serve`, same [node] sizes and LUN, no [pair] section).
        Interleaved single/pair per test and round; medians over REPEAT
        rounds; ratio = pair IOPS / single IOPS per round (median, min-max).
        Target CPU per I/O: utime+stime of the target process(es) in the
        steady-state window / I/Os in it; for the pair the sum of a and b.
reads:  4 KiB random reads of node a's LUN through node b's portal
        (127.0.0.2, ALUA non-optimized), per round:
          write R1 via a; wait until a's status says pruned_seq >= the last
          seq written (a CP ran and pruned b's mirrored copy);
          write R2 via a; at once read R2 via b, QD1 then QD16  -> (i) live replay
          read R1 via b, QD1 then QD16                          -> (ii) forwarded
          read R2 and R1 via a, QD1 then QD16                   -> (iii) reference
        b's status.partner_reads counters are read before and after every
        phase; their deltas are printed beside the latencies. Phase (i) must
        end before a's next CP (10 s timer): a's pruned_seq is checked after
        it and the phase is flagged when the CP came first.

Environment (all optional):
  REPEAT=3            rounds (medians over them)
  RUNTIME=10 RAMP=2   seconds per mirror run
  READ_SECS=2         seconds per read run (no ramp)
  REGION_MIB=16       size of R1 and R2 (written sequentially in 4 KiB records)
  PORT=3300           pair portals 127.0.0.1:PORT and 127.0.0.2:PORT
                      (interconnect PORT+10, metrics PORT+20)
  SINGLE_PORT=3330    single node portal (127.0.0.1)
  NVTARGET_BIN=       binary (default $CARGO_TARGET_DIR/release/nvtarget, else
                      target/release/nvtarget; built when missing)
  FIO=/tmp/fio-src/fio-3.33/fio
  INITIATOR=iqn.2026-11.test:pair-bench
  OUT=bench/results/pair-<date>   output: table.txt, table.md, runs.tsv,
                      fio JSON per run, node logs, meta.txt
Exit: 0 ok; 1 setup failed; 3 some runs failed or a phase went the wrong way.
Writes the LUNs it starts; starts and stops only its own processes (by PID).
"""
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TCK = os.sysconf("SC_CLK_TCK")
IQN_A = "iqn.2026-11.io.nvtarget:a"
IQN_SINGLE = "iqn.2026-11.io.nvtarget:single"


def env_int(name, default):
    v = os.environ.get(name, "")
    return int(v) if v else default


REPEAT = env_int("REPEAT", 3)
RUNTIME = env_int("RUNTIME", 10)
RAMP = env_int("RAMP", 2)
READ_SECS = env_int("READ_SECS", 2)
REGION_MIB = env_int("REGION_MIB", 16)
PORT = env_int("PORT", 3300)
SINGLE_PORT = env_int("SINGLE_PORT", 3330)
FIO = os.environ.get("FIO") or "/tmp/fio-src/fio-3.33/fio"
INITIATOR = os.environ.get("INITIATOR") or "iqn.2026-11.test:pair-bench"
OUT = os.environ.get("OUT") or os.path.join(
    HERE, "results", "pair-" + time.strftime("%Y%m%d-%H%M%S"))

# The fio running now (killed on the way out: a fio whose target is gone
# keeps reconnecting and ignores SIGTERM)
FIO_PROCS = []

# R1 and R2: far apart in the 1 GiB LUN
R1_OFF = 64 << 20
R2_OFF = 512 << 20


def log(msg):
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def die(msg):
    log("pair-bench: " + msg)
    sys.exit(1)


def uptime():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def sys_busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6]
    return busy, busy + v[3] + v[4]


def proc_ticks(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    f = s[s.rindex(")") + 2:].split()
    return int(f[11]) + int(f[12])


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return False
    return s[s.rindex(")") + 2:].split()[0] != "Z"


def port_open(addr, port):
    try:
        socket.create_connection((addr, port), timeout=0.3).close()
        return True
    except OSError:
        return False


def fio_url(host, port, iqn, lun=0):
    return ("iscsi://%s:%d/%s/%d" % (host, port, iqn, lun)).replace(":", "\\:")


# ------------------------------------------------------------------ binary
def find_binary():
    b = os.environ.get("NVTARGET_BIN")
    if b:
        if not os.access(b, os.X_OK):
            die("NVTARGET_BIN=%s is not executable" % b)
        return b
    tdir = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    b = os.path.join(tdir, "release", "nvtarget")
    if not os.access(b, os.X_OK):
        log("building nvtarget: cargo build --release --bin nvtarget")
        r = subprocess.run(["cargo", "build", "--release", "--bin", "nvtarget"], cwd=ROOT)
        if r.returncode != 0 or not os.access(b, os.X_OK):
            die("cargo build --release failed; set NVTARGET_BIN=")
    return b


# ------------------------------------------------------------------ targets
class Pair:
    def __init__(self, nvt, out):
        self.nvt = nvt
        self.dir = os.path.join(out, "pair")
        self.pids = []

    def args(self, *a):
        return [self.nvt, "pair"] + list(a) + ["--data-dir", self.dir, "--port", str(PORT)]

    def up(self):
        for host in ("127.0.0.1", "127.0.0.2"):
            for p in (PORT, PORT + 10, PORT + 20):
                if port_open(host, p):
                    die("%s:%d is in use; set PORT=" % (host, p))
        log("pair up: " + " ".join(self.args("up")))
        r = subprocess.run(self.args("up"), capture_output=True, text=True, timeout=120)
        sys.stderr.write(r.stdout + r.stderr)
        for n in ("a", "b"):
            try:
                self.pids.append(int(open(os.path.join(self.dir, n + ".pid")).read()))
            except (OSError, ValueError):
                pass
        if r.returncode != 0 or len(self.pids) != 2:
            die("nvtarget pair up failed (logs in %s)" % self.dir)
        # both nodes serving, mirrored
        end = time.time() + 60
        while time.time() < end:
            st = self.status()
            if all(s.get("status") and s["status"].get("mirrored") for s in st):
                return
            time.sleep(0.2)
        die("pair did not report mirrored within 60 s: %s" % json.dumps(self.status()))

    def status(self):
        r = subprocess.run(self.args("status", "--json"), capture_output=True, text=True,
                           timeout=30)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return []

    def node(self, name, newer_than_ms=0, timeout=5.0):
        """status.json of node `name`, written after `newer_than_ms` (unix ms)."""
        end = time.time() + timeout
        while True:
            for s in self.status():
                st = s.get("status") or {}
                if s.get("node") == name and st.get("unix_ms", 0) >= newer_than_ms:
                    return st
            if time.time() > end:
                return None
            time.sleep(0.05)

    def down(self):
        if self.pids:
            subprocess.run(self.args("down"), capture_output=True, timeout=60)
            for pid in self.pids:
                if alive(pid):
                    log("pair node pid %d still running after pair down; SIGKILL" % pid)
                    os.kill(pid, signal.SIGKILL)
            self.pids = []


class Single:
    def __init__(self, nvt, out):
        self.nvt = nvt
        self.dir = os.path.join(out, "single")
        self.proc = None
        self.logf = os.path.join(out, "single.log")

    def up(self):
        if port_open("127.0.0.1", SINGLE_PORT):
            die("127.0.0.1:%d is in use; set SINGLE_PORT=" % SINGLE_PORT)
        os.makedirs(self.dir, exist_ok=True)
        # The same [node] sizes and LUN as a pair node, no [pair] section.
        cfg = os.path.join(self.dir + ".toml")
        with open(cfg, "w") as f:
            f.write('[node]\naggregate_size = "4GiB"\nnvram_size = "256MiB"\n\n'
                    '[[portal]]\nlisten = "127.0.0.1:%d"\ntpgt = 1\n\n'
                    '[[target]]\nname = "%s"\n\n[[target.lun]]\nid = 0\nname = "s0"\n'
                    'size = "1GiB"\nblock_size = 512\n' % (SINGLE_PORT, IQN_SINGLE))
        cmd = [self.nvt, "serve", "--config", cfg, "--listen", "127.0.0.1:%d" % SINGLE_PORT,
               "--data-dir", self.dir]
        log("single: " + " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(self.logf, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        end = time.time() + 30
        while time.time() < end and self.proc.poll() is None:
            if port_open("127.0.0.1", SINGLE_PORT):
                return
            time.sleep(0.1)
        die("single nvtarget did not listen on 127.0.0.1:%d (log %s)" % (SINGLE_PORT, self.logf))

    def down(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ------------------------------------------------------------------ fio
def run_fio(name, url, args, runtime, ramp, pids, out):
    """One fio job; returns a dict of metrics (err set on failure)."""
    jpath = os.path.join(out, name + ".json")
    cmd = [FIO, "--thread", "--name=" + name, "--ioengine=libiscsi",
           "--initiator=" + INITIATOR, "--filename=" + url] + args + [
           "--time_based", "--runtime=%d" % runtime, "--output-format=json",
           "--output=" + jpath]
    if ramp:
        cmd.append("--ramp_time=%d" % ramp)
    if os.environ.get("SYNC", "1") == "1":
        os.sync()
    b0 = sys_busy()
    time.sleep(0.5)
    b1 = sys_busy()
    bg = 100.0 * (b1[0] - b0[0]) / max(1, b1[1] - b0[1])
    load = uptime()
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(out, name + ".log"), "w"),
                         start_new_session=True)
    FIO_PROCS.append(p)

    def ticks():
        v = [proc_ticks(x) for x in pids]
        return None if any(x is None for x in v) else sum(v)

    def wait_until(t):
        while time.time() < t and p.poll() is None:
            time.sleep(0.05)

    wait_until(t0 + ramp + 0.5)
    w0, c0 = time.time(), ticks()
    wait_until(t0 + ramp + runtime)
    w1, c1 = time.time(), ticks()
    try:
        rc = p.wait(timeout=runtime + ramp + 60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        time.sleep(2)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        rc = p.wait()
    FIO_PROCS.remove(p)
    m = {"name": name, "rc": rc, "load": load, "bg_busy_pct": bg, "err": None,
         "end_ms": int(time.time() * 1000)}
    try:
        text = open(jpath, errors="replace").read()
        job = json.loads(text[text.index("{"):])["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        m["err"] = "fio rc=%s, no JSON (see %s.log)" % (rc, name)
        return m
    d = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    pct = d.get("clat_ns", {}).get("percentile", {})
    m["iops"] = d["iops"]
    m["ios"] = d.get("total_ios", 0)
    m["mean_us"] = d["lat_ns"]["mean"] / 1000
    m["p50_us"] = pct.get("50.000000", 0) / 1000 or None
    m["p99_us"] = pct.get("99.000000", 0) / 1000 or None
    m["cpu_us_io"] = None
    if c0 is not None and c1 is not None and m["iops"] > 0 and w1 > w0:
        m["cpu_us_io"] = (c1 - c0) / TCK * 1e6 / (m["iops"] * (w1 - w0))
    if rc != 0 or job.get("error"):
        m["err"] = "fio rc=%s error=%s (see %s.log)" % (rc, job.get("error"), name)
    return m


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(v, spec=".0f"):
    return "-" if v is None else format(v, spec)


def table(head, rows):
    w = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(r))
             for r in [head] + rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines), "\n".join(md)


# ------------------------------------------------------------------ mirror
MIRROR_TESTS = [("rw4k-qd32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
                ("rw4k-qd1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"])]


def bench_mirror(pair, single, out, runs):
    url = {"single": fio_url("127.0.0.1", SINGLE_PORT, IQN_SINGLE),
           "pair": fio_url("127.0.0.1", PORT, IQN_A)}
    bad = []
    res = {}
    a0 = pair.node("a")
    for rep in range(1, REPEAT + 1):
        for test, args in MIRROR_TESTS:
            for t in ("single", "pair"):
                pids = [single.proc.pid] if t == "single" else pair.pids
                name = "%s.%s.r%d" % (test, t, rep)
                log("%s (load %s)" % (name, uptime()))
                m = run_fio(name, url[t], args, RUNTIME, RAMP, pids, out)
                runs.append(m)
                res.setdefault((test, t), []).append(m)
                if m["err"]:
                    bad.append("%s: %s" % (name, m["err"]))
    a1 = pair.node("a", int(time.time() * 1000))
    rows = []
    for test, _ in MIRROR_TESTS:
        s, p = res[(test, "single")], res[(test, "pair")]
        ratios = [b["iops"] / a["iops"] for a, b in zip(s, p)
                  if not a["err"] and not b["err"] and a.get("iops")]
        r = "-" if not ratios else "%.2fx (%.2f-%.2f)" % (med(ratios), min(ratios), max(ratios))

        def c(ms, k, spec=".0f"):
            return f(med(m.get(k) for m in ms if not m["err"]), spec)
        rows.append([test, c(s, "iops"), c(p, "iops"), r, c(s, "mean_us"), c(p, "mean_us"),
                     c(s, "p99_us"), c(p, "p99_us"), c(s, "cpu_us_io", ".1f"),
                     c(p, "cpu_us_io", ".1f"),
                     "%s / %s" % (min(m["load"].split()[0] for m in s + p),
                                  max(m["load"].split()[0] for m in s + p))])
    head = ["test", "single IOPS", "pair IOPS", "pair/single", "single mean us", "pair mean us",
            "single p99 us", "pair p99 us", "single CPU us/IO", "pair CPU us/IO (a+b)",
            "load1 min/max"]
    txt, md = table(head, rows)
    notes = ["%d rounds, interleaved single/pair; medians; ratio = median of per-round "
             "IOPS ratios (min-max). RUNTIME=%d s + RAMP=%d s per run." % (REPEAT, RUNTIME, RAMP)]
    if a0 and a1:
        l0, l1 = a0.get("log") or {}, a1.get("log") or {}
        notes.append("node a during the runs: mirrored=%s, next_seq %s -> %s, mirror_acked_seq %s -> %s, "
                     "CPs %s -> %s" % (a1.get("mirrored"), l0.get("next_seq"), l1.get("next_seq"),
                                        l0.get("mirror_acked_seq"), l1.get("mirror_acked_seq"),
                                        l0.get("cps"), l1.get("cps")))
        if not a1.get("mirrored"):
            bad.append("node a was not mirrored at the end of the mirror runs")
    return txt, md, notes, bad


# ------------------------------------------------------------------ reads
def write_region(pair, off, name, out, runs):
    """One sequential pass of 4 KiB writes over the region, via node a."""
    url = fio_url("127.0.0.1", PORT, IQN_A)
    jpath = os.path.join(out, name + ".json")
    cmd = [FIO, "--thread", "--name=" + name, "--ioengine=libiscsi", "--initiator=" + INITIATOR,
           "--filename=" + url, "--rw=write", "--bs=4k", "--iodepth=16", "--offset=%d" % off,
           "--size=%dM" % REGION_MIB, "--output-format=json", "--output=" + jpath]
    t0 = time.time()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(out, name + ".log"), "w"),
                       timeout=120)
    m = {"name": name, "rc": r.returncode, "err": None if r.returncode == 0 else
         "fio rc=%d (see %s.log)" % (r.returncode, name), "secs": time.time() - t0,
         "load": uptime(), "end_ms": int(time.time() * 1000)}
    runs.append(m)
    return m


def counters(st):
    p = (st or {}).get("partner_reads") or {}
    return (p.get("live_replayed", 0), p.get("forwarded", 0), p.get("forward_errors", 0))


def bench_reads(pair, out, runs):
    via = {"b": fio_url("127.0.0.2", PORT, IQN_A), "a": fio_url("127.0.0.1", PORT, IQN_A)}
    bad = []
    phases = {}  # key -> list of (metrics, deltas)
    timing = []

    def read(key, node, off, qd, rep):
        name = "%s.qd%d.r%d" % (key, qd, rep)
        m = run_fio(name, via[node], ["--rw=randread", "--bs=4k", "--iodepth=%d" % qd,
                                      "--offset=%d" % off, "--size=%dM" % REGION_MIB],
                    READ_SECS, 0, [], out)
        runs.append(m)
        if m["err"]:
            bad.append("%s: %s" % (name, m["err"]))
        return m

    def phase(key, node, off, rep):
        b0 = counters(pair.node("b", int(time.time() * 1000) - 400))
        ms = [read(key, node, off, qd, rep) for qd in (1, 16)]
        end = max(m["end_ms"] for m in ms)
        b1 = counters(pair.node("b", end + 1, timeout=5))
        d = tuple(y - x for x, y in zip(b0, b1))
        for m in ms:
            phases.setdefault((key, m["name"].split(".")[1]), []).append((m, d))
        return d

    for rep in range(1, REPEAT + 1):
        log("reads round %d: write R1 (%d MiB at %d MiB) via a" % (rep, REGION_MIB, R1_OFF >> 20))
        w = write_region(pair, R1_OFF, "write-R1.r%d" % rep, out, runs)
        if w["err"]:
            bad.append(w["name"] + ": " + w["err"])
            continue
        st = pair.node("a", w["end_ms"] + 1)
        last = (st or {}).get("log", {}).get("next_seq", 1) - 1
        t_wait = time.time()
        while True:
            st = pair.node("a")
            pruned = (st or {}).get("log", {}).get("pruned_seq", 0)
            if pruned >= last:
                break
            if time.time() - t_wait > 40:
                bad.append("round %d: pruned_seq %s never reached %s" % (rep, pruned, last))
                break
            time.sleep(0.1)
        log("R1 pruned (seq <= %d) after %.1f s; write R2 via a, read it via b at once"
            % (last, time.time() - t_wait))
        st0 = pair.node("a", int(time.time() * 1000) - 400)
        first_r2 = (st0 or {}).get("log", {}).get("next_seq", 0)
        t_r2 = time.time()
        w = write_region(pair, R2_OFF, "write-R2.r%d" % rep, out, runs)
        if w["err"]:
            bad.append(w["name"] + ": " + w["err"])
            continue
        d_live = phase("i-live-R2-via-b", "b", R2_OFF, rep)
        st1 = pair.node("a", int(time.time() * 1000))
        pruned_after = (st1 or {}).get("log", {}).get("pruned_seq", 0)
        timing.append("round %d: R2 written in %.1f s (seq %d..), phase (i) done %.1f s after the "
                      "R2 write began; a's pruned_seq after it %d%s"
                      % (rep, w["secs"], first_r2, time.time() - t_r2, pruned_after,
                         " -> a CP pruned R2 during phase (i)!" if pruned_after >= first_r2 else
                         " (< R2's first seq: no CP during the phase)"))
        if pruned_after >= first_r2:
            bad.append("round %d: a CP pruned R2 before phase (i) ended" % rep)
        d_fwd = phase("ii-fwd-R1-via-b", "b", R1_OFF, rep)
        phase("iii-R2-via-a", "a", R2_OFF, rep)
        phase("iii-R1-via-a", "a", R1_OFF, rep)
        if d_live[0] == 0:
            bad.append("round %d: phase (i) live-replayed nothing (deltas %s)" % (rep, d_live))
        if d_fwd[0] != 0 or d_fwd[1] == 0:
            bad.append("round %d: phase (ii) was not all forwarded (deltas %s)" % (rep, d_fwd))

    desc = {"i-live-R2-via-b": "(i) R2 just written, via b",
            "ii-fwd-R1-via-b": "(ii) R1 pruned, via b",
            "iii-R2-via-a": "(iii) R2 via a (owner)",
            "iii-R1-via-a": "(iii) R1 via a (owner)"}
    ref = {}
    for (key, qd), v in phases.items():
        if key == "iii-R2-via-a":
            ref[qd] = med(m.get("mean_us") for m, _ in v if not m["err"])
    rows = []
    for key in desc:
        for qd in ("qd1", "qd16"):
            v = phases.get((key, qd), [])
            ok = [m for m, _ in v if not m["err"]]
            mean = med(m.get("mean_us") for m in ok)
            # the deltas cover both QDs of a phase: shown once, on the QD1 row
            ds = [d for _, d in v]
            dtxt = ("/".join(str(sum(d[i] for d in ds)) for i in range(3))
                    if qd == "qd1" and ds else "")
            ios = sum(m.get("ios", 0) for m in ok)
            rows.append([desc[key] if qd == "qd1" else "", qd[2:], f(med(m.get("iops") for m in ok)),
                         f(mean), f(med(m.get("p50_us") for m in ok)),
                         f(med(m.get("p99_us") for m in ok)),
                         "-" if not mean or not ref.get(qd) else "%.2fx" % (mean / ref[qd]),
                         str(ios), dtxt,
                         "%s / %s" % (min((m["load"].split()[0] for m in ok), default="-"),
                                      max((m["load"].split()[0] for m in ok), default="-"))])
    head = ["phase", "QD", "IOPS", "mean us", "p50 us", "p99 us", "mean vs (iii) R2",
            "fio reads", "b: live/fwd/err delta", "load1 min/max"]
    txt, md = table(head, rows)
    notes = ["%d rounds, %d s per read run, 4 KiB randread over a %d MiB region; medians. "
             "Counter deltas: node b's status.partner_reads (live_replayed/forwarded/"
             "forward_errors) over both QDs of the phase, summed over rounds; forwarded "
             "includes the login-time commands of each fio session (INQUIRY, READ CAPACITY, ...)."
             % (REPEAT, READ_SECS, REGION_MIB)] + timing
    return txt, md, notes, bad


# ------------------------------------------------------------------ main
def main():
    what = sys.argv[1:] or ["mirror", "reads"]
    for w in what:
        if w not in ("mirror", "reads"):
            die("unknown benchmark %r (mirror, reads)" % w)
    if not (os.access(FIO, os.X_OK) and "libiscsi" in subprocess.run(
            [FIO, "--enghelp"], capture_output=True, text=True).stdout):
        die("no fio with ioengine=libiscsi at %s (set FIO=; see bench/README.md)" % FIO)
    os.makedirs(OUT, exist_ok=True)
    nvt = find_binary()
    pair, single = Pair(nvt, OUT), Single(nvt, OUT)
    runs, out_txt, out_md, bad = [], [], [], []

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    meta = "date=%s nproc=%d bin=%s (mtime %s) git=%s load=%s" % (
        time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.cpu_count(), nvt,
        time.strftime("%H:%M:%S", time.localtime(os.path.getmtime(nvt))), git, uptime())
    try:
        pair.up()
        if "mirror" in what:
            single.up()
            txt, md, notes, b = bench_mirror(pair, single, OUT, runs)
            single.down()
            out_txt.append("mirrored (pair node a) vs unmirrored (single node), 4 KiB randwrite\n\n"
                           + txt + "\n" + "\n".join(notes))
            out_md.append(md + "\n\n" + "\n".join("- " + n for n in notes))
            bad += b
        if "reads" in what:
            txt, md, notes, b = bench_reads(pair, OUT, runs)
            out_txt.append("partner reads of node a's LUN: via b (live replay / forwarded) and via a\n\n"
                           + txt + "\n" + "\n".join(notes))
            out_md.append(md + "\n\n" + "\n".join("- " + n for n in notes))
            bad += b
    except KeyboardInterrupt:
        bad.append("interrupted")
    finally:
        for p in FIO_PROCS:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        single.down()
        pair.down()
        for n in ("a", "b"):
            try:
                os.replace(os.path.join(pair.dir, n + ".log"), os.path.join(OUT, "node-%s.log" % n))
            except OSError:
                pass
        subprocess.run(["rm", "-rf", pair.dir, single.dir])
    meta += " -> load at end %s" % uptime()
    txt = "\n\n".join(out_txt) + ("\n\nproblems:\n" + "\n".join("  " + b for b in bad) if bad else "") \
        + "\n\n" + meta + "\n"
    with open(os.path.join(OUT, "table.txt"), "w") as fh:
        fh.write(txt)
    with open(os.path.join(OUT, "table.md"), "w") as fh:
        fh.write("\n\n".join(out_md) + "\n\n`" + meta + "`\n")
    with open(os.path.join(OUT, "runs.tsv"), "w") as fh:
        keys = ["name", "rc", "iops", "ios", "mean_us", "p50_us", "p99_us", "cpu_us_io", "load",
                "bg_busy_pct", "secs", "err"]
        fh.write("\t".join(keys) + "\n")
        for m in runs:
            fh.write("\t".join("NA" if m.get(k) is None else
                               ("%.1f" % m[k] if isinstance(m[k], float) else str(m[k]))
                               for k in keys) + "\n")
    sys.stdout.write("\n" + txt + "\nresults: %s\n" % OUT)
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
