#!/bin/sh
# nvtarget lab: the `bench` scenario, run inside the guest by lab-init.
#
# The fio matrix through the kernel initiator (iscsi_tcp, libaio, O_DIRECT)
# against nvtarget (10.0.2.100:3260) and tgt (10.0.2.101:3260) in the same
# boot, interleaved test by test (tgt then nvtarget), so both see the same
# background noise. Each run's fio JSON goes to the host on the console:
#   LAB-BENCH start|end <test> <target> [rc]   (the host samples target CPU)
#   LAB-JSON <test> <target> <base64 of gzipped fio JSON>
#   LAB-BPARAM <target> <key>=<value>          negotiated parameters
set -u
. /lab/env

step() { echo "LAB-STEP $*"; }
ok() { echo "LAB-OK $*"; }
fail() {
    echo "LAB-RESULT fail $*"
    dmesg | tail -40
    exit 1
}
run() {
    echo "+ $*"
    "$@"
}
now() { cut -d' ' -f1 /proc/uptime; }
T0=$(now)
mkdir -p /run/lab

step network
ip link set eth0 up || fail "no eth0"
ip addr add 10.0.2.15/24 dev eth0 || fail "ip addr"
run modprobe iscsi_tcp || fail "modprobe iscsi_tcp"
run iscsid || fail "iscsid"
sleep 1

step login
for t in nvt tgt; do
    eval iqn=\$LAB_IQN_$t portal=\$LAB_PORTAL_$t
    run iscsiadm -m node -o new -T "$iqn" -p "$portal" >/dev/null || fail "node -o new $iqn"
    run iscsiadm -m node -T "$iqn" -p "$portal" --login || fail "login $t ($iqn at $portal)"
done
udevadm settle --timeout=30
disk_of() { # iqn -> sdX (the session's disk; tgt's LUN 0 is its controller, no disk)
    iscsiadm -m session -P 3 2>/dev/null | awk -v t="$1" '
        /^Target: / {cur = $2}
        /Attached scsi disk/ && cur == t {print $4; exit}'
}
i=0
while { [ -z "$(disk_of "$LAB_IQN_nvt")" ] || [ -z "$(disk_of "$LAB_IQN_tgt")" ]; } && [ $i -lt 60 ]; do
    sleep 0.5
    i=$((i + 1))
done
DISK_nvt=$(disk_of "$LAB_IQN_nvt")
DISK_tgt=$(disk_of "$LAB_IQN_tgt")
[ -n "$DISK_nvt" ] && [ -n "$DISK_tgt" ] || fail "disks: nvt=$DISK_nvt tgt=$DISK_tgt"
iscsiadm -m session -P 3 >/run/lab/session-P3
awk -F': ' '
    /^Target: / {split($0, a, " "); t = (a[2] ~ /nvtarget/) ? "nvt" : "tgt"}
    /Negotiated iSCSI params:/ {inp = 1; stars = 0; next}
    inp && /^[[:space:]]*\*+[[:space:]]*$/ {if (++stars == 2) inp = 0; next}
    inp && /: / {k = $1; gsub(/^[ \t]+/, "", k); print "LAB-BPARAM " t " " k "=" $2}
' /run/lab/session-P3
for t in nvt tgt; do
    eval d=\$DISK_$t
    # Same block-layer settings for both: no I/O scheduler, no read-ahead
    # (O_DIRECT anyway), and the size the target reports.
    echo none >/sys/block/$d/queue/scheduler 2>/dev/null
    echo "LAB-BPARAM $t disk=/dev/$d $(lsblk -bdno SIZE,MODEL /dev/$d | tr -s ' ') max_sectors_kb=$(cat /sys/block/$d/queue/max_sectors_kb)"
done
ok login "nvt /dev/$DISK_nvt, tgt /dev/$DISK_tgt"

if [ "$LAB_BENCH_PREFILL" = 1 ]; then
    step prefill
    # Both LUNs fully written once, so reads hit allocated blocks on both.
    for t in tgt nvt; do
        eval d=\$DISK_$t
        fio --name=prefill-$t --filename=/dev/$d --ioengine=libaio --direct=1 --rw=write --bs=1M \
            --iodepth=8 --size="$LAB_BENCH_SIZE" >/run/lab/prefill-$t.out 2>&1 ||
            { cat /run/lab/prefill-$t.out; fail "prefill $t"; }
        ok "prefill-$t" "$(awk '/WRITE: bw=/ {print $2, $3; exit}' /run/lab/prefill-$t.out)"
    done
fi

args_of() {
    case $1 in
    rr4k-qd1) echo "--rw=randread --bs=4k --iodepth=1" ;;
    rr4k-qd32) echo "--rw=randread --bs=4k --iodepth=32" ;;
    rw4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
    rw4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    sr1m-qd8) echo "--rw=read --bs=1M --iodepth=8" ;;
    sw1m-qd8) echo "--rw=write --bs=1M --iodepth=8" ;;
    *) return 1 ;;
    esac
}
step matrix
for rep in $(seq 1 "$LAB_BENCH_REPEAT"); do
    for test in $LAB_BENCH_TESTS; do
        a=$(args_of "$test") || fail "unknown test $test"
        for t in tgt nvt; do
            eval d=\$DISK_$t
            sync
            sleep 1
            echo "LAB-BENCH start $test $t $rep"
            # shellcheck disable=SC2086 # $a is a word list
            fio --name="$test" --filename=/dev/$d --ioengine=libaio --direct=1 $a \
                --size="$LAB_BENCH_SIZE" --time_based --runtime="$LAB_BENCH_RUNTIME" \
                --ramp_time="$LAB_BENCH_RAMP" --output-format=json \
                --output=/run/lab/$test.$t.$rep.json >/run/lab/$test.$t.$rep.err 2>&1
            rc=$?
            echo "LAB-BENCH end $test $t $rep $rc"
            [ $rc -eq 0 ] || { cat /run/lab/$test.$t.$rep.err; echo "LAB-BENCH-ERROR $test $t rc=$rc"; }
            echo "LAB-JSON $test $t $rep $(gzip -9c /run/lab/$test.$t.$rep.json | base64 -w0)"
        done
    done
done
ok matrix "$LAB_BENCH_TESTS x $LAB_BENCH_REPEAT"

step logout
run iscsiadm -m node --logoutall=all || fail "logout"
echo "LAB-TIME bench-guest $(awk -v a="$T0" -v b="$(now)" 'BEGIN {printf "%.1f", b-a}')s"
echo "LAB-RESULT ok"
exit 0
