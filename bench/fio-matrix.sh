#!/bin/bash
# fio matrix: nvtarget beside tgt, measured in the same run, over loopback.
#
# Usage:  bench/fio-matrix.sh            (from anywhere; ~7 min at RUNTIME=15)
#         QUICK=1 bench/fio-matrix.sh    (smoke run: RUNTIME=3, no prefill)
#
# For each test, tgt runs first and nvtarget right after it, so both see the
# same background noise (2 shared cores). Every run is one fio job = one iSCSI
# session, ioengine=libiscsi, --output-format=json.
#
#   test       fio --rw      bs    iodepth
#   rr4k-qd1   randread      4k    1
#   rr4k-qd32  randread      4k    32
#   rw4k-qd1   randwrite     4k    1
#   rw4k-qd32  randwrite     4k    32
#   sr1m-qd8   read          1M    8
#   sw1m-qd8   write         1M    8
#
# Env (all optional):
#   RUNTIME=15 RAMP=2   seconds of measurement / ramp per run (QUICK=1 -> RUNTIME=3)
#   PREFILL=1           1 MiB sequential write over the whole LUN first (QUICK=1 -> 0)
#   SYNC=1              run sync(1) before each run (flushes the previous run's dirty pages)
#   REPEAT=1            repeat the whole matrix N times (round robin); the table
#                       then shows medians and the ratio's min..max
#   TESTS="rr4k-qd1 ..." subset / order of the tests above
#   TARGETS="tgt nvt"   which targets to run (e.g. TARGETS=nvt)
#   OUT=bench/results/<date>   output directory
#   FIO=                fio with ioengine=libiscsi (default /tmp/fio-src/fio-3.33/fio,
#                       built by ../shared/peers/build-fio-libiscsi.sh when missing;
#                       BUILD_FIO=0 to fail instead of building)
#   NVTARGET_BIN=       nvtarget binary (default target/release/nvtarget, rebuilt
#                       with cargo build --release when missing or older than sources;
#                       NVT_BUILD=0 to skip the build)
#   NVT_PORT=3270       nvtarget portal (127.0.0.1)
#   NVT_IQN=iqn.2026-11.io.nvtarget:default NVT_LUN=0
#   NVT_ARGS=           extra arguments for "nvtarget serve"
#   TGT_PORT=3261 TGT_CTRL=17   tgtd portal and control port (-C)
#   TGT_PARAMS=         iSCSI keys for tgt (see ../shared/peers/start-tgt.sh)
#   NVT_URL= NVT_PID=   bench an already-running target in the nvtarget column
#   TGT_URL= TGT_PID=   bench an already-running target in the tgt column
#                       (the script then starts/stops nothing for that column;
#                       without *_PID the CPU column is NA)
#   INITIATOR=iqn.2026-11.test:bench-init
# Output (OUT): table.txt (the printed table), table.md, results.tsv (one row
#   per run, more columns), runs.tsv (raw measurements), <test>.<target>.json
#   (fio JSON), <test>.<target>.log (fio stderr), prefill.*, meta.txt, target logs.
# Exit status: 0 all runs fine; 1 setup failed (message says why); 3 some runs
#   failed (ERR rows; the notes under the table quote fio).
# DESTRUCTIVE for the LUNs it is pointed at (writes them).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PEERS=${PEERS:-$(cd "$ROOT/../shared/peers" 2>/dev/null && pwd)}
HELPER="$HERE/fio_matrix.py"

die() { echo "fio-matrix: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  RUNTIME=${RUNTIME:-3}; PREFILL=${PREFILL:-0}
else
  RUNTIME=${RUNTIME:-15}; PREFILL=${PREFILL:-1}
fi
RAMP=${RAMP:-2}
SYNC=${SYNC:-1}
REPEAT=${REPEAT:-1}
TESTS=${TESTS:-"rr4k-qd1 rr4k-qd32 rw4k-qd1 rw4k-qd32 sr1m-qd8 sw1m-qd8"}
TARGETS=${TARGETS:-"tgt nvt"}
INITIATOR=${INITIATOR:-iqn.2026-11.test:bench-init}
ADDR=127.0.0.1
NVT_PORT=${NVT_PORT:-3270}
NVT_IQN=${NVT_IQN:-iqn.2026-11.io.nvtarget:default}
NVT_LUN=${NVT_LUN:-0}
NVT_ARGS=${NVT_ARGS:-}
NVT_BUILD=${NVT_BUILD:-1}
TGT_PORT=${TGT_PORT:-3261}
TGT_CTRL=${TGT_CTRL:-17}
TGT_IQN=iqn.2026-11.test:tgt
NVT_URL=${NVT_URL:-}
NVT_PID=${NVT_PID:-}
TGT_URL=${TGT_URL:-}
TGT_PID=${TGT_PID:-}
SIZE_MB=${SIZE_MB:-1024}
FIO_DEFAULT=/tmp/fio-src/fio-3.33/fio
FIO=${FIO:-}
BUILD_FIO=${BUILD_FIO:-1}
OUT=${OUT:-$HERE/results/$(date +%Y%m%d-%H%M%S)}
TCK=$(getconf CLK_TCK)

case $REPEAT in ''|*[!0-9]*|0) die "REPEAT must be a positive integer" ;; esac
for t in $TESTS; do
  case $t in rr4k-qd1|rr4k-qd32|rw4k-qd1|rw4k-qd32|sr1m-qd8|sw1m-qd8) ;;
    *) die "unknown test '$t' (known: rr4k-qd1 rr4k-qd32 rw4k-qd1 rw4k-qd32 sr1m-qd8 sw1m-qd8)" ;;
  esac
done
for t in $TARGETS; do
  case $t in tgt|nvt) ;; *) die "unknown target '$t' in TARGETS (tgt, nvt)" ;; esac
done
command -v python3 >/dev/null || die "python3 not found"
command -v iscsi-inq >/dev/null || die "iscsi-inq not found (apt-get install libiscsi-bin)"
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /var/tmp/nvt-bench.XXXXXX) || die "mktemp failed"

# ---------------------------------------------------------------- cleanup
STARTED_TGT=0     # 1 when this script started tgtd (stop via stop-peer.sh, PID-checked)
STARTED_NVT=""    # PID of the nvtarget this script started
FIO_PID=""        # PID of the running fio (ours)
TPID="" T0=0 DEADLINE=0 WHY="" KILL_AT="" RC=0   # state of the fio run in progress
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$FIO_PID" ] && alive "$FIO_PID"; then
    kill_fio TERM; sleep 2; alive "$FIO_PID" && kill_fio KILL
  fi
  if [ -n "$STARTED_NVT" ]; then stop_pid "$STARTED_NVT" nvtarget; fi
  if [ "$STARTED_TGT" = 1 ]; then
    STATE="$WORK/tgt" bash "$PEERS/stop-peer.sh" tgtd >/dev/null 2>&1 \
      || echo "fio-matrix: stopping tgtd failed; check $WORK/tgt/tgtd.pid" >&2
  fi
  # the LUN images are big: drop them, keep the logs (copied into OUT)
  rm -f "$WORK/tgt/tgt.img"
  [ -d "$WORK/nvt" ] && rm -rf "$WORK/nvt"
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

alive() { # pid exists and is not a zombie (no fork: polled often)
  local s
  [ -n "${1:-}" ] && read -r s 2>/dev/null < "/proc/$1/stat" || return 1
  s=${s##*) }; [ "${s%% *}" != Z ]
}
stop_pid() { # pid expected-comm-prefix: SIGTERM, then SIGKILL after 5 s; only our own PID
  local pid=$1 name=$2 comm
  alive "$pid" || return 0
  comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
  case $comm in "$name"*) ;; *) echo "fio-matrix: pid $pid is '$comm', not $name; not killing" >&2; return 1 ;; esac
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 50); do alive "$pid" || return 0; sleep 0.1; done
  echo "fio-matrix: $name pid $pid ignored SIGTERM; SIGKILL" >&2
  kill -9 "$pid" 2>/dev/null
}
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
proc_ticks() { # utime+stime (all threads, incl. exited ones) in clock ticks; NA if unknown
  if [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ]; then
    awk '{sub(/^.*\) /,""); print $12+$13}' "/proc/$1/stat"
  else echo NA; fi
}
sys_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }

# ---------------------------------------------------------------- fio
fio_ok() { [ -x "$1" ] && "$1" --enghelp 2>/dev/null | grep -qw libiscsi; }
if [ -n "$FIO" ]; then
  fio_ok "$FIO" || die "FIO=$FIO is not an executable fio with ioengine=libiscsi ('$FIO --enghelp' must list libiscsi)"
elif fio_ok "$FIO_DEFAULT"; then
  FIO=$FIO_DEFAULT
else
  [ "$BUILD_FIO" = 1 ] || die "no fio with libiscsi at $FIO_DEFAULT; build it with $PEERS/build-fio-libiscsi.sh or set FIO="
  [ -f "$PEERS/build-fio-libiscsi.sh" ] || die "no fio at $FIO_DEFAULT and no $PEERS/build-fio-libiscsi.sh to build it; set FIO="
  [ "$(id -u)" = 0 ] || die "building fio needs root (apt-get); run $PEERS/build-fio-libiscsi.sh as root or set FIO="
  log "building fio with libiscsi (log: $OUT/fio-build.log, a few minutes)"
  if ! bash "$PEERS/build-fio-libiscsi.sh" > "$OUT/fio-build.log" 2>&1; then
    tail -20 "$OUT/fio-build.log" >&2
    die "fio build failed (full log: $OUT/fio-build.log); set FIO= to a fio built with --enable-libiscsi"
  fi
  fio_ok "$FIO_DEFAULT" || die "fio build finished but $FIO_DEFAULT has no libiscsi engine (see $OUT/fio-build.log)"
  FIO=$FIO_DEFAULT
fi
log "fio: $FIO ($("$FIO" --version))"

want() { case " $TARGETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ---------------------------------------------------------------- tgt
if want tgt && [ -z "$TGT_URL" ]; then
  command -v tgtd >/dev/null || die "tgtd not found (apt-get install tgt) or set TGT_URL="
  [ -f "$PEERS/start-tgt.sh" ] || die "missing $PEERS/start-tgt.sh"
  port_open "$ADDR" "$TGT_PORT" && die "something already listens on $ADDR:$TGT_PORT; set TGT_PORT= (or TGT_URL= to bench it)"
  [ -e "/var/run/tgtd/socket.$TGT_CTRL" ] && tgtadm -C "$TGT_CTRL" --mode sys --op show >/dev/null 2>&1 \
    && die "a tgtd already uses control port $TGT_CTRL; set TGT_CTRL="
  log "starting tgtd on $ADDR:$TGT_PORT (control $TGT_CTRL, 1 GiB file LUN in $WORK/tgt)"
  STARTED_TGT=1
  TGT_PID=$(STATE="$WORK/tgt" PORT=$TGT_PORT ADDR=$ADDR CTRL=$TGT_CTRL IQN=$TGT_IQN SIZE_MB=$SIZE_MB \
    bash "$PEERS/start-tgt.sh" 2>"$WORK/tgt-start.err") \
    || { cat "$WORK/tgt-start.err" "$WORK/tgt/tgtd.log" >&2 2>/dev/null; die "start-tgt.sh failed"; }
  { [ -n "$TGT_PID" ] && alive "$TGT_PID"; } || die "tgtd did not stay up (log: $WORK/tgt/tgtd.log)"
  TGT_URL="iscsi://$ADDR:$TGT_PORT/$TGT_IQN/1"
fi

# ---------------------------------------------------------------- nvtarget
nvt_needs_build() { # binary missing or older than any source file of the workspace
  [ -x "$1" ] || return 0
  [ -n "$(find "$ROOT" \( -path "$ROOT/target" -o -path "$ROOT/bench" -o -path "$ROOT/.git" \) -prune -o \
      \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock -o -name '*.toml' \) -newer "$1" -print -quit)" ]
}
if want nvt && [ -z "$NVT_URL" ]; then
  if [ -n "${NVTARGET_BIN:-}" ]; then
    [ -x "$NVTARGET_BIN" ] || die "NVTARGET_BIN=$NVTARGET_BIN is not executable"
  else
    NVTARGET_BIN=$ROOT/target/release/nvtarget
    if [ "$NVT_BUILD" = 1 ] && nvt_needs_build "$NVTARGET_BIN"; then
      command -v cargo >/dev/null || die "cargo not found; build nvtarget or set NVTARGET_BIN="
      log "building nvtarget: cargo build --release (log: $OUT/cargo-build.log)"
      if ! (cd "$ROOT" && cargo build --release --bin nvtarget) > "$OUT/cargo-build.log" 2>&1; then
        tail -30 "$OUT/cargo-build.log" >&2
        if [ -x "$NVTARGET_BIN" ]; then
          log "WARNING: cargo build failed; using the existing, older $NVTARGET_BIN"
          echo "WARNING: cargo build failed; benchmarked a stale binary" >> "$OUT/meta.txt"
        else
          die "cargo build --release failed (log: $OUT/cargo-build.log) and there is no $NVTARGET_BIN"
        fi
      fi
    fi
    [ -x "$NVTARGET_BIN" ] || die "no nvtarget binary at $NVTARGET_BIN (NVT_BUILD=0?)"
  fi
  port_open "$ADDR" "$NVT_PORT" && die "something already listens on $ADDR:$NVT_PORT; set NVT_PORT= (or NVT_URL= to bench it)"
  mkdir -p "$WORK/nvt"
  log "starting nvtarget: $NVTARGET_BIN serve --listen $ADDR:$NVT_PORT --data-dir $WORK/nvt $NVT_ARGS"
  # shellcheck disable=SC2086  # NVT_ARGS is a word list on purpose
  NO_COLOR=1 setsid "$NVTARGET_BIN" serve --listen "$ADDR:$NVT_PORT" --data-dir "$WORK/nvt" $NVT_ARGS \
    > "$OUT/nvtarget.log" 2>&1 < /dev/null &
  STARTED_NVT=$!
  NVT_PID=$STARTED_NVT
  for _ in $(seq 1 100); do port_open "$ADDR" "$NVT_PORT" && break; alive "$NVT_PID" || break; sleep 0.1; done
  if ! alive "$NVT_PID" || ! port_open "$ADDR" "$NVT_PORT"; then
    tail -20 "$OUT/nvtarget.log" >&2
    die "nvtarget did not start listening on $ADDR:$NVT_PORT within 10 s (log: $OUT/nvtarget.log)"
  fi
  NVT_URL="iscsi://$ADDR:$NVT_PORT/$NVT_IQN/$NVT_LUN"
fi

# ---------------------------------------------------------------- checks + meta
declare -A URL=([tgt]="${TGT_URL}" [nvt]="${NVT_URL}")
declare -A PID=([tgt]="${TGT_PID}" [nvt]="${NVT_PID}")
declare -A BS
for t in $TARGETS; do
  if ! timeout 20 iscsi-inq -i "$INITIATOR" "${URL[$t]}" > "$OUT/inq.$t.txt" 2>&1; then
    cat "$OUT/inq.$t.txt" >&2
    die "$t: iscsi-inq ${URL[$t]} failed (login or INQUIRY); output above"
  fi
  BS[$t]=$(timeout 20 iscsi-readcapacity16 -i "$INITIATOR" "${URL[$t]}" 2>&1 | tee "$OUT/readcap.$t.txt" \
    | awk -F: '/LOGICAL BLOCK LENGTH/{gsub(/ /,"",$2); print $2}')
  [ -n "${BS[$t]}" ] || { cat "$OUT/readcap.$t.txt" >&2; die "$t: READ CAPACITY(16) on ${URL[$t]} failed"; }
  log "$t: ${URL[$t]} pid=${PID[$t]:-unknown} block=${BS[$t]}"
done
{
  echo "date=$(date -Is) host=$(hostname) nproc=$(nproc) runtime=$RUNTIME ramp=$RAMP prefill=$PREFILL quick=$QUICK repeat=$REPEAT"
  echo "fio=$FIO $("$FIO" --version)"
  dpkg-query -W libiscsi-bin libiscsi7 tgt 2>/dev/null
  for t in $TARGETS; do
    echo "$t url=${URL[$t]} pid=${PID[$t]:-none} block=${BS[$t]}"
    [ -n "${PID[$t]}" ] && echo "$t cmd=$(tr '\0' ' ' < "/proc/${PID[$t]}/cmdline")"
  done
  if want nvt && [ -n "${NVTARGET_BIN:-}" ]; then
    echo "nvtarget_bin=$NVTARGET_BIN mtime=$(date -r "$NVTARGET_BIN" -Is)"
    (cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null && git status --porcelain 2>/dev/null | wc -l | sed 's/^/dirty_files=/')
  fi
  [ "$STARTED_TGT" = 1 ] && echo "tgt params:" && cat "$WORK/tgt/tgt-params.txt"
} >> "$OUT/meta.txt" 2>/dev/null

fio_url() { printf '%s' "$1" | sed 's/:/\\:/g'; }   # libiscsi filename: escape ':'

# ---------------------------------------------------------------- fio runner
# fio runs with --thread (the job is a thread, not a forked process that calls
# setsid and survives a killed parent; seen when a target dies mid-run) and under
# setsid, so its PID is also the ID of a process group holding only fio.
kill_fio() { # SIGNAL: our fio and its job processes
  if kill -0 -- "-$FIO_PID" 2>/dev/null; then kill -"$1" -- "-$FIO_PID" 2>/dev/null
  else kill -"$1" "$FIO_PID" 2>/dev/null; fi
}
us_now() { local t=$EPOCHREALTIME; echo "${t/./}"; }   # microseconds, no fork
# Wait until absolute time $1 (us) or until fio exits. Meanwhile enforce the
# deadline ($DEADLINE us) and notice the target dying: then fio gets SIGTERM
# (after a 10 s grace to report the error itself) and SIGKILL 5 s later.
# Sets WHY to the reason it intervened.
watch_fio_until() {
  local until=$1 n
  while alive "$FIO_PID"; do
    n=$(us_now)
    [ "$n" -ge "$until" ] && return 0
    if [ -z "$WHY" ]; then
      if [ "$n" -ge "$DEADLINE" ]; then
        WHY="fio still running $(( (n - T0) / 1000000 )) s after start (target hung?); killed it"
      elif [ -n "$TPID" ] && ! alive "$TPID"; then
        WHY="target pid $TPID died during the run"; DEADLINE=$((n + 10000000))
      fi
    fi
    if [ -n "$WHY" ] && [ "$n" -ge "$DEADLINE" ]; then
      if [ -z "$KILL_AT" ]; then
        kill_fio TERM; KILL_AT=$((n + 5000000))
      elif [ "$n" -ge "$KILL_AT" ]; then
        kill_fio KILL; KILL_AT=$((n + 3600000000))
      fi
    fi
    sleep 0.2
  done
}
# start_fio LOGNAME MAX_SECONDS fio-args...: fio in the background, own process group
start_fio() {
  local logf=$1 max=$2; shift 2
  WHY=""; KILL_AT=""
  T0=$(us_now); DEADLINE=$((T0 + max * 1000000))
  setsid "$FIO" --thread "$@" > "$logf" 2>&1 &
  FIO_PID=$!
}
# finish_fio: wait for it (watchdog active), reap leftovers of its group; sets RC
finish_fio() {
  watch_fio_until 99999999999999999
  wait "$FIO_PID"; RC=$?
  if kill -0 -- "-$FIO_PID" 2>/dev/null; then   # job processes outlived the parent
    kill -TERM -- "-$FIO_PID" 2>/dev/null; sleep 2
    kill -0 -- "-$FIO_PID" 2>/dev/null && kill -KILL -- "-$FIO_PID" 2>/dev/null
    WHY="${WHY:+$WHY; }fio job processes outlived fio; killed them"
  fi
  FIO_PID=""
}

# ---------------------------------------------------------------- prefill
if [ "$PREFILL" = 1 ]; then
  for t in $TARGETS; do
    log "$t: prefill (1 MiB sequential write over the whole LUN)"
    TPID=${PID[$t]}
    start_fio "$OUT/prefill.$t.log" 900 --name=prefill --ioengine=libiscsi --initiator="$INITIATOR" \
      --filename="$(fio_url "${URL[$t]}")" --rw=write --bs=1M --iodepth=8 \
      --output-format=json --output="$OUT/prefill.$t.json"
    finish_fio
    if [ "$RC" != 0 ] || [ -n "$WHY" ]; then
      log "WARNING: $t prefill failed (fio rc=$RC${WHY:+; $WHY}); fio printed:"
      grep -v 'both iodepth >= 1 and synchronous I/O engine' "$OUT/prefill.$t.log" | tail -20 | sed 's/^/    /' >&2
      echo "$t prefill failed: rc=$RC $WHY" >> "$OUT/meta.txt"
    fi
  done
fi

# ---------------------------------------------------------------- runs
printf 'test\ttarget\trep\trc\tcpu_ticks_window\twindow_s\tcpu_ticks_total\twall_s\ttck\tsys_busy_pct\tbg_busy_pct\tjson\tlog\twhy\n' > "$OUT/runs.tsv"
test_args() {
  case $1 in
    rr4k-qd1)  echo "--rw=randread --bs=4k --iodepth=1" ;;
    rr4k-qd32) echo "--rw=randread --bs=4k --iodepth=32" ;;
    rw4k-qd1)  echo "--rw=randwrite --bs=4k --iodepth=1" ;;
    rw4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    sr1m-qd8)  echo "--rw=read --bs=1M --iodepth=8" ;;
    sw1m-qd8)  echo "--rw=write --bs=1M --iodepth=8" ;;
  esac
}
run_one() { # test target rep
  local test=$1 t=$2 rep=$3 name="$1.$2" a at b bt bg
  [ "$REPEAT" -gt 1 ] && name="$name.r$rep"
  local t1 t2 t3 c0 c1 c2 c3 s0 s0t s1 s1t rc win cw ct
  TPID=${PID[$2]}
  if [ -n "$TPID" ] && ! alive "$TPID"; then
    log "$t: target pid $TPID is gone; skipping $test"
    printf '%s\t%s\t%s\tDEAD\tNA\tNA\tNA\tNA\t%s\tNA\tNA\t\t\t%s\n' "$test" "$t" "$rep" "$TCK" \
      "target process gone before the run" >> "$OUT/runs.tsv"
    return
  fi
  # flush dirty pages left by earlier runs (kernel writeback is charged to no
  # target and would land in the next run), then sample the background load
  [ "$SYNC" = 1 ] && timeout 120 sync
  read -r a at < <(sys_busy); sleep 1; read -r b bt < <(sys_busy)
  bg=$(echo "scale=1; 100*($b-$a)/($bt-$at)" | bc -l)
  log "$t: $test (background busy ${bg}% of all cores)"
  c0=$(proc_ticks "$TPID"); read -r s0 s0t < <(sys_busy)
  # shellcheck disable=SC2046  # test_args is a word list on purpose
  start_fio "$OUT/$name.log" $((RUNTIME + RAMP + 60)) --name="$test" --ioengine=libiscsi \
    --initiator="$INITIATOR" --filename="$(fio_url "${URL[$t]}")" $(test_args "$test") \
    --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
    --output-format=json --output="$OUT/$name.json"
  # target CPU window = fio's measured (post-ramp) period, minus 0.5 s at the start
  watch_fio_until $((T0 + RAMP * 1000000 + 500000))
  t1=$(us_now); c1=$(proc_ticks "$TPID")
  watch_fio_until $((T0 + (RAMP + RUNTIME) * 1000000))
  t2=$(us_now); c2=$(proc_ticks "$TPID"); read -r s1 s1t < <(sys_busy)
  finish_fio; rc=$RC
  t3=$(us_now); c3=$(proc_ticks "$TPID")
  win=$(echo "($t2 - $t1) / 1000000" | bc -l)
  if [ "$c0" = NA ] || [ "$c3" = NA ]; then cw=NA; ct=NA; else cw=$((c2 - c1)); ct=$((c3 - c0)); fi
  printf '%s\t%s\t%s\t%s\t%s\t%.3f\t%s\t%.3f\t%s\t%.1f\t%s\t%s\t%s\t%s\n' "$test" "$t" "$rep" "$rc" "$cw" "$win" "$ct" \
    "$(echo "($t3 - $T0) / 1000000" | bc -l)" "$TCK" "$(echo "100*($s1-$s0)/($s1t-$s0t)" | bc -l)" "$bg" \
    "$name.json" "$name.log" "$WHY" >> "$OUT/runs.tsv"
  if [ "$rc" != 0 ] || [ -n "$WHY" ]; then
    log "WARNING: $t $test: fio exited $rc${WHY:+ ($WHY)}; fio printed:"
    grep -v 'both iodepth >= 1 and synchronous I/O engine' "$OUT/$name.log" | tail -20 | sed 's/^/    /' >&2
  fi
  if [ -n "$TPID" ] && ! alive "$TPID"; then log "ERROR: $t target pid $TPID died during $test"; fi
}

for rep in $(seq 1 "$REPEAT"); do
  [ "$REPEAT" -gt 1 ] && log "=== repetition $rep of $REPEAT"
  for test in $TESTS; do
    for t in $TARGETS; do run_one "$test" "$t" "$rep"; done
  done
done

# ---------------------------------------------------------------- table
for t in $TARGETS; do
  if [ -n "${PID[$t]}" ] && ! alive "${PID[$t]}"; then
    echo "$t target (pid ${PID[$t]}) is no longer running" >> "$OUT/meta.txt"
  fi
done
[ "$STARTED_TGT" = 1 ] && cp "$WORK/tgt/tgtd.log" "$OUT/tgtd.log" 2>/dev/null
python3 "$HELPER" "$OUT"; hrc=$?
echo
echo "results: $OUT"
case $hrc in
  0) ;;
  3) echo "fio-matrix: some runs failed (ERR rows; see notes)" >&2; exit 3 ;;
  *) die "table helper failed (rc=$hrc)" ;;
esac
