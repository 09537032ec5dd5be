#!/bin/sh
# nvtarget lab: the `smoke` scenario, run inside the guest by lab-init from
# the per-run config disk (/lab). Not part of the image recipe: edit freely,
# no image rebuild needed.
#
# Console protocol parsed by run-lab.sh on the host:
#   LAB-STEP <name>             a step starts
#   LAB-OK <name> [detail]      a check passed
#   LAB-PARAM <key>=<value>     negotiated parameter (from iscsiadm -P 3)
#   LAB-RESULT ok | LAB-RESULT fail <why>   final verdict (exactly one)
set -u
. /lab/env

ERRS=0
step() { echo "LAB-STEP $*"; }
ok() { echo "LAB-OK $*"; }
fail() {
    echo "LAB-RESULT fail $*"
    echo "---- dmesg tail ----"
    dmesg | tail -40
    exit 1
}
run() { # echo and run a command, output to the console
    echo "+ $*"
    "$@"
}
now() { cut -d' ' -f1 /proc/uptime; }

T0=$(now)
IQN=$LAB_IQN
P=$LAB_PORTAL            # the portal as the guest reaches it (guestfwd)

# ---------------------------------------------------------------- network
step network
ip link set eth0 up || fail "no eth0"
ip addr add 10.0.2.15/24 dev eth0 || fail "ip addr"
# No default route on purpose: the guest can reach only 10.0.2.0/24, and with
# restrict=on qemu forwards only $P to the host's target.
ok network "$(ip -4 -o addr show dev eth0 | awk '{print $4}')"

# ---------------------------------------------------------------- iscsid
step iscsid
run modprobe iscsi_tcp || fail "modprobe iscsi_tcp"
grep -q '^iscsi_tcp ' /proc/modules || fail "iscsi_tcp not loaded"
ok iscsi_tcp "$(modinfo -F filename iscsi_tcp), kernel $(uname -r)"
cat /etc/iscsi/initiatorname.iscsi | grep -v '^#'
# Make the node defaults explicit (Debian's default is the same).
mkdir -p /run/lab
run iscsid || fail "iscsid did not start"
sleep 1
pidof iscsid >/dev/null || fail "iscsid not running"
ok iscsid "pid $(pidof iscsid)"

# ---------------------------------------------------------------- discovery
step discovery
out=$(iscsiadm -m discovery -t sendtargets -p "$P" 2>&1)
rc=$?
echo "$out"
[ $rc -eq 0 ] || fail "discovery rc=$rc"
echo "$out" | grep -q " $IQN\$" || fail "discovery did not list $IQN"
ok discovery "$(echo "$out" | grep " $IQN\$" | head -1)"
# The target advertises TargetAddress from its own listen address (the host's
# 127.0.0.1:port), which the guest cannot reach. Discovery created a node
# record for that portal: drop it and make one for the portal we can reach.
for portal in $(echo "$out" | awk -v t="$IQN" '$2==t {sub(/,.*/,"",$1); print $1}'); do
    [ "$portal" = "$P" ] && continue
    echo "dropping unreachable advertised portal $portal"
    iscsiadm -m node -T "$IQN" -p "$portal" -o delete || true
done
iscsiadm -m node -T "$IQN" -p "$P" >/dev/null 2>&1 ||
    run iscsiadm -m node -o new -T "$IQN" -p "$P" || fail "node -o new"
run iscsiadm -m node -T "$IQN" -p "$P" -o update -n node.session.timeo.replacement_timeout -v 30
run iscsiadm -m node

# ---------------------------------------------------------------- login
find_disk() { # the sdX of our session, waiting up to 30 s
    i=0
    while [ $i -lt 60 ]; do
        d=$(iscsiadm -m session -P 3 2>/dev/null | awk '/Attached scsi disk/ {print $4; exit}')
        if [ -n "$d" ] && [ -b "/dev/$d" ]; then echo "$d"; return 0; fi
        sleep 0.5
        i=$((i + 1))
    done
    return 1
}
login() {
    run iscsiadm -m node -T "$IQN" -p "$P" --login || fail "login ($1) failed"
    udevadm settle --timeout=30
    DISK=$(find_disk) || fail "no disk after login ($1)"
    ok "login-$1" "/dev/$DISK"
}
step login
login 1
echo "---- iscsiadm -m session ----"
iscsiadm -m session
echo "---- iscsiadm -m session -P 3 ----"
iscsiadm -m session -P 3 | tee /run/lab/session-P3
# Negotiated parameters, as open-iscsi sees them.
awk -F': ' '
    /Negotiated iSCSI params:/ {inp = 1; next}
    inp && /^[[:space:]]*\*+[[:space:]]*$/ {stars++; if (stars == 2) exit; next}
    inp && /: / {gsub(/^[ \t]+/, "", $1); print "LAB-PARAM " $1 "=" $2}
' /run/lab/session-P3
for k in "Current Portal" "Persistent Portal" "Iface Transport" "Iface Initiatorname" "iSCSI Connection State" \
    "iSCSI Session State" "Internal iscsid Session State" "Recovery Timeout" "Target Reset Timeout" \
    "LUN Reset Timeout" "Abort Timeout"; do
    awk -F': ' -v k="$k" '{x = $1; gsub(/^[ \t]+/, "", x)} x == k {print "LAB-PARAM " k "=" $2; exit}' /run/lab/session-P3
done
grep -q 'iSCSI Connection State: LOGGED IN' /run/lab/session-P3 || fail "connection not LOGGED IN"
grep -q 'iSCSI Session State: LOGGED_IN' /run/lab/session-P3 || fail "session not LOGGED_IN"
for k in HeaderDigest DataDigest MaxRecvDataSegmentLength MaxXmitDataSegmentLength \
    FirstBurstLength MaxBurstLength ImmediateData InitialR2T MaxOutstandingR2T; do
    grep -q "^[[:space:]]*$k: " /run/lab/session-P3 || fail "session -P 3 lacks $k"
done
pv() { awk -F': ' -v k="$1" '{x = $1; gsub(/^[ \t]+/, "", x)} x == k {print $2; exit}' "${2:-/run/lab/session-P3}"; }
fb=$(pv FirstBurstLength) mb=$(pv MaxBurstLength)
for k in MaxRecvDataSegmentLength MaxXmitDataSegmentLength FirstBurstLength MaxBurstLength; do
    v=$(pv $k)
    [ "$v" -ge 512 ] && [ "$v" -le 16777215 ] || fail "$k=$v out of the RFC 7143 range"
done
[ "$fb" -le "$mb" ] || fail "FirstBurstLength $fb > MaxBurstLength $mb"
[ "$(pv HeaderDigest)" = None ] && [ "$(pv DataDigest)" = None ] || fail "digests negotiated though not requested"
[ "$(pv 'Current Portal')" = "$P,1" ] || fail "Current Portal $(pv 'Current Portal') != $P,1"
ok session-P3 "LOGGED_IN; FirstBurst $fb <= MaxBurst $mb, MRDSL $(pv MaxRecvDataSegmentLength)/$(pv MaxXmitDataSegmentLength), digests None"

# ---------------------------------------------------------------- disk checks
step disk
run sg_inq "/dev/$DISK" | tee /run/lab/inq || fail "sg_inq"
grep -q 'Peripheral device type: disk' /run/lab/inq || fail "sg_inq: not a disk"
ok sg_inq "$(awk -F': *' '/Vendor identification/ {v=$2} /Product identification/ {p=$2} END {print v " / " p}' /run/lab/inq)"
run sg_readcap --long "/dev/$DISK" | tee /run/lab/cap || fail "sg_readcap"
bytes=$(awk '/Device size:/ {print $3}' /run/lab/cap)
blksz=$(awk '/Logical block length=/ {sub(/.*=/,"",$0); print $1}' /run/lab/cap)
[ -n "$bytes" ] && [ "$bytes" -gt 0 ] || fail "sg_readcap: no size"
[ "$bytes" -eq "$LAB_LUN_BYTES" ] || fail "sg_readcap: size $bytes != expected $LAB_LUN_BYTES"
ok sg_readcap "$bytes bytes, block $blksz"
run lsblk -o NAME,SIZE,TYPE,TRAN,VENDOR,MODEL,LOG-SEC,PHY-SEC,RO "/dev/$DISK" || fail "lsblk"
lsz=$(lsblk -bdno SIZE "/dev/$DISK")
[ "$lsz" -eq "$LAB_LUN_BYTES" ] || fail "lsblk size $lsz != $LAB_LUN_BYTES"
[ "$(lsblk -dno TRAN "/dev/$DISK" | tr -d ' ')" = iscsi ] || fail "lsblk: transport is not iscsi"
ok lsblk "$lsz bytes, tran iscsi"

# ---------------------------------------------------------------- fio
fio_run() { # name, args...
    name=$1
    shift
    run fio --name="$name" --filename="/dev/$DISK" --ioengine=libaio --direct=1 \
        --verify=crc32c --output-format=normal "$@" >/run/lab/fio-$name.out 2>&1
    frc=$?
    cat /run/lab/fio-$name.out
    [ $frc -eq 0 ] || fail "fio $name exited $frc"
    grep -qi 'verify: bad\|verify failed\|crc32c: verify\|bad magic' /run/lab/fio-$name.out &&
        fail "fio $name reported verify errors"
    grep -q 'err= *[1-9]' /run/lab/fio-$name.out && fail "fio $name reported err"
    bw=$(awk -F'[ ,]+' '/^ *(write|read): IOPS=/ {print $2 " " $3 " " $4}' /run/lab/fio-$name.out | tr '\n' ' ')
    # reads issued = blocks read back and crc32c-verified (fio verify reads)
    vr=$(awk -F'[=,]' '/issued rwts: total=/ {print $2; exit}' /run/lab/fio-$name.out)
    [ "${vr:-0}" -gt 0 ] || fail "fio $name verified no blocks"
    ok "fio-$name" "${bw}verified ${vr} blocks, 0 errors"
}
step fio-write
# A: sequential write of region A (first 64 MiB) + read-back verify. Region A
# is verified again after a logout/login cycle below.
fio_run seqA --rw=write --bs=64k --iodepth=16 --offset=0 --size=64M --do_verify=1
step fio-randwrite
# B: the timed kernel-fio run: 4k random writes, QD32, crc32c in every block,
# verified continuously (verify_backlog) and at the end, on region B.
fio_run randB --rw=randwrite --bs=4k --iodepth=32 --offset=128M --size="$LAB_FIO_SIZE" \
    --runtime="$LAB_FIO_RUNTIME" --time_based --verify_backlog=1024 --do_verify=1

# ---------------------------------------------------------------- rescan
step rescan
sid=$(iscsiadm -m session | awk -F'[][]' '{print $2; exit}')
run iscsiadm -m session -r "$sid" --rescan || fail "session -r $sid --rescan"
run iscsiadm -m session --rescan || fail "session --rescan (all)"
udevadm settle --timeout=30
[ -b "/dev/$DISK" ] || fail "disk gone after rescan"
sg_readcap "/dev/$DISK" >/dev/null || fail "sg_readcap after rescan"
ok rescan "session $sid, /dev/$DISK still there"

# ---------------------------------------------------------------- logout/login
step logout-login
old=$DISK
run iscsiadm -m node -T "$IQN" -p "$P" --logout || fail "logout 1"
udevadm settle --timeout=30
iscsiadm -m session >/dev/null 2>&1 && fail "session still present after logout"
[ -b "/dev/$old" ] && fail "/dev/$old still present after logout"
ok logout-1 "no sessions"
login 2
iscsiadm -m session -P 3 >/run/lab/session-P3-2
grep -q 'iSCSI Session State: LOGGED_IN' /run/lab/session-P3-2 || fail "session 2 not LOGGED_IN"
for k in HeaderDigest DataDigest MaxRecvDataSegmentLength MaxXmitDataSegmentLength \
    FirstBurstLength MaxBurstLength ImmediateData InitialR2T MaxOutstandingR2T; do
    [ "$(pv $k)" = "$(pv $k /run/lab/session-P3-2)" ] ||
        fail "$k differs between logins: $(pv $k) vs $(pv $k /run/lab/session-P3-2)"
done
ok session-P3-2 "re-login negotiated the same parameters, SID $(pv SID /run/lab/session-P3-2)"
# Region A must still hold what pass A wrote, read in a fresh session.
fio_run verifyA --rw=write --bs=64k --iodepth=16 --offset=0 --size=64M --verify_only
step rescan-2
run iscsiadm -m session --rescan || fail "rescan after re-login"
ok rescan-2 "ok"

# ---------------------------------------------------------------- logout
step logout
run iscsiadm -m node -T "$IQN" -p "$P" --logout || fail "final logout"
iscsiadm -m session >/dev/null 2>&1 && fail "session left after final logout"
ok logout "no sessions"

echo "---- kernel messages (iscsi/scsi) ----"
dmesg | grep -Ei 'iscsi|scsi|sd[a-z]' | tail -30
echo "LAB-TIME smoke-guest $(awk -v a="$T0" -v b="$(now)" 'BEGIN {printf "%.1f", b-a}')s"
echo "LAB-RESULT ok"
exit 0
