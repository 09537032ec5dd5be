#!/bin/sh
# nvtarget lab: the `failover` scenario, run inside the guest by lab-init.
#
# dm-multipath over both portals of an nvtarget HA pair, for each node's LUN:
#   path via 10.0.2.100:3260 -> host 127.0.0.1:P (node a, tpgt 1)
#   path via 10.0.2.101:3260 -> host 127.0.0.2:P (node b, tpgt 2)
# ALUA (prio alua, group_by_prio, hardware handler alua, no_path_retry queue).
# For each direction (a: kill node a under I/O to target a's LUN; then b):
#   fio randwrite + crc32c verify on the multipath device; after a warm-up
#   the guest prints "LAB-FAILOVER kill X" and the host SIGKILLs node X; the
#   guest waits for the ALUA states to flip (the partner's path becomes
#   active/optimized), prints "LAB-FAILOVER restart X" (the host restarts X and
#   gives its storage back), waits for the flip back; fio must end with zero
#   errors and zero verify failures, and the longest I/O stall must stay below
#   the initiator's timeouts.
#
# Console protocol (besides smoke's LAB-STEP/OK/RESULT):
#   LAB-FAILOVER kill|restart <node> <guest Unix ms>  host action requests
#   LAB-MPATH <label>, then lines, then LAB-MPATH-END   multipath -ll snapshot
#   LAB-RTPG <label> <path> ...                        REPORT TARGET PORT GROUPS
#   LAB-FO <key>=<value>                               measured results
set -u
. /lab/env

step() { echo "LAB-STEP $*"; }
ok() { echo "LAB-OK $*"; }
fail() {
    echo "LAB-RESULT fail $*"
    echo "---- multipath -ll ----"
    multipath -ll 2>&1
    echo "---- multipathd log tail ----"
    tail -40 /run/lab/multipathd.log 2>/dev/null
    echo "---- dmesg tail ----"
    dmesg | tail -60
    exit 1
}
run() {
    echo "+ $*"
    "$@"
}
now() { cut -d' ' -f1 /proc/uptime; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }

P1=$LAB_PORTAL_1 # -> node a's portal (after a takeover of a: node b)
P2=$LAB_PORTAL_2 # -> node b's portal
IQN_a=$LAB_IQN_A
IQN_b=$LAB_IQN_B
T0=$(now)
mkdir -p /run/lab

# ---------------------------------------------------------------- setup
step network
ip link set eth0 up || fail "no eth0"
ip addr add 10.0.2.15/24 dev eth0 || fail "ip addr"
ok network "$(ip -4 -o addr show dev eth0 | awk '{print $4}')"

step modules
for m in iscsi_tcp scsi_dh_alua dm_multipath dm_round_robin dm_service_time; do
    run modprobe $m || fail "modprobe $m"
done
ok modules "iscsi_tcp scsi_dh_alua dm_multipath, kernel $(uname -r)"
run iscsid || fail "iscsid did not start"
sleep 1
pidof iscsid >/dev/null || fail "iscsid not running"

step login
# Node records by hand: SendTargets advertises the host's loopback portals,
# which the guest cannot reach (see README). Two portals per target.
for t in a b; do
    eval iqn=\$IQN_$t
    for p in "$P1" "$P2"; do
        run iscsiadm -m node -o new -T "$iqn" -p "$p" >/dev/null || fail "node -o new $iqn $p"
        for kv in node.session.timeo.replacement_timeout=$LAB_REPLACEMENT_TIMEOUT \
            node.conn[0].timeo.noop_out_interval=5 node.conn[0].timeo.noop_out_timeout=10 \
            node.conn[0].timeo.login_timeout=15; do
            iscsiadm -m node -T "$iqn" -p "$p" -o update -n "${kv%%=*}" -v "${kv#*=}" || fail "update $kv"
        done
        run iscsiadm -m node -T "$iqn" -p "$p" --login || fail "login $iqn $p"
    done
done
udevadm settle --timeout=30

# "<iqn> <portal> <sdX>" for every attached disk, from session -P 3.
paths() {
    iscsiadm -m session -P 3 2>/dev/null | awk '
        /^Target: / {t = $2}
        /Current Portal: / {p = $3; sub(/,.*/, "", p)}
        /Attached scsi disk/ {print t, p, $4}'
}
i=0
while [ "$(paths | wc -l)" -lt 4 ] && [ $i -lt 60 ]; do
    sleep 0.5
    i=$((i + 1))
done
paths | tee /run/lab/paths
[ "$(wc -l </run/lab/paths)" -eq 4 ] || fail "expected 4 paths (2 targets x 2 portals), got $(wc -l </run/lab/paths)"
dev_of() { awk -v t="$1" -v p="$2" '$1 == t && $2 == p {print $3}' /run/lab/paths; }
ok login "4 sessions: targets a and b through both portals"
iscsiadm -m session -P 3 | grep -E 'Target:|Current Portal|Persistent Portal|Session State|Attached scsi disk|Recovery Timeout'

step alua-inquiry
for t in a b; do
    eval iqn=\$IQN_$t
    for p in "$P1" "$P2"; do
        d=$(dev_of "$iqn" "$p")
        # TPGS field of the standard INQUIRY, relative port and port group of
        # this path (device identification VPD page).
        tpgs=$(sg_inq "/dev/$d" 2>/dev/null | sed -n 's/.*TPGS=\([0-9]\).*/\1/p' | head -1)
        rel=$(sg_vpd -p di "/dev/$d" 2>/dev/null | awk '/Relative target port:/ {print $NF; exit}')
        tpg=$(sg_vpd -p di "/dev/$d" 2>/dev/null | awk '/Target port group:/ {print $NF; exit}')
        echo "LAB-FO path $t $p /dev/$d TPGS=$tpgs relative_port=$rel port_group=$tpg"
        [ "${tpgs:-0}" -ne 0 ] || fail "/dev/$d: INQUIRY TPGS=0, no ALUA"
    done
done
# Keep the SCSI layer from giving up before multipath can: the SCSI command
# timeout is one of the initiator timeouts the stall is compared with.
SCSI_TIMEOUT=$(cat /sys/block/"$(dev_of "$IQN_a" "$P1")"/device/timeout)
ok alua-inquiry "TPGS set on all paths; SCSI command timeout ${SCSI_TIMEOUT}s, iSCSI replacement_timeout ${LAB_REPLACEMENT_TIMEOUT}s"

# REPORT TARGET PORT GROUPS on every path of target $1, as the target answers it.
rtpg() { # label target
    eval iqn=\$IQN_$2
    for p in "$P1" "$P2"; do
        d=$(dev_of "$iqn" "$p")
        out=$(sg_rtpg -d "/dev/$d" 2>&1)
        echo "$out" | sed "s|^|  [$2 via $p /dev/$d] |"
        echo "LAB-RTPG $1 $2 via $p: $(echo "$out" | awk '
            /target port group id/ {g = $0; sub(/.*id : */, "", g); sub(/ *,.*/, "", g)}
            /asymmetric access state/ {s = $0; sub(/.*: */, "", s); printf "tpg %s %s; ", g, s}')"
    done
}

step multipath
wwid() { /lib/udev/scsi_id --whitelisted --device="/dev/$1"; }
WA=$(wwid "$(dev_of "$IQN_a" "$P1")")
WB=$(wwid "$(dev_of "$IQN_b" "$P2")")
[ -n "$WA" ] && [ -n "$WB" ] || fail "no WWID (scsi_id)"
[ "$WA" = "$(wwid "$(dev_of "$IQN_a" "$P2")")" ] || fail "target a's LUN has different WWIDs on the two portals"
[ "$WB" = "$(wwid "$(dev_of "$IQN_b" "$P1")")" ] || fail "target b's LUN has different WWIDs on the two portals"
mkdir -p /etc/multipath
cat >/etc/multipath.conf <<EOF
defaults {
    user_friendly_names no
    find_multipaths off
    polling_interval 2
    max_polling_interval 4
}
blacklist {
    devnode "^vd[a-z]"
}
devices {
    device {
        vendor "NVTARGET"
        product "nvtarget LUN"
        path_grouping_policy group_by_prio
        prio alua
        hardware_handler "1 alua"
        path_checker tur
        path_selector "round-robin 0"
        failback immediate
        no_path_retry queue
        detect_prio no
    }
}
multipaths {
    multipath {
        wwid $WA
        alias nvt_a
    }
    multipath {
        wwid $WB
        alias nvt_b
    }
}
EOF
cat /etc/multipath.conf
multipathd -d -s -v3 >/run/lab/multipathd.log 2>&1 &
MPD=$!
i=0
while ! { [ -b /dev/mapper/nvt_a ] && [ -b /dev/mapper/nvt_b ]; } && [ $i -lt 60 ]; do
    sleep 0.5
    i=$((i + 1))
    [ $((i % 10)) -eq 0 ] && multipath -v0 >/dev/null 2>&1
done
kill -0 $MPD 2>/dev/null || fail "multipathd exited"
[ -b /dev/mapper/nvt_a ] && [ -b /dev/mapper/nvt_b ] || fail "no /dev/mapper/nvt_a and nvt_b"

# "<dev> <group prio> <group status> <dm state> <checker state>" per path of map $1.
mpaths() {
    multipath -ll "$1" 2>/dev/null | awk '
        /prio=/ {pr = $0; sub(/.*prio=/, "", pr); sub(/ .*/, "", pr); st = $0; sub(/.*status=/, "", st)}
        / [0-9]+:[0-9]+:[0-9]+:[0-9]+ sd/ {
            for (i = 1; i <= NF; i++) if ($i ~ /^sd[a-z]+$/) {print $i, pr, st, $(i + 2), $(i + 3); break}}'
}
prio_of() { mpaths "$1" | awk -v d="$2" '$1 == d && $4 == "active" && $5 == "ready" {print $2}'; }
# Waits until map $1's path $2 has prio $3 and path $4 prio $5 (both active
# and ready); prints the seconds it took. Timeout: $6 s.
wait_prios() {
    w0=$(now)
    while :; do
        [ "$(prio_of "$1" "$2")" = "$3" ] && [ "$(prio_of "$1" "$4")" = "$5" ] && {
            elapsed "$w0"
            return 0
        }
        [ "$(awk -v a="$w0" -v b="$(now)" 'BEGIN {print (b - a > '"$6"')}')" = 1 ] && return 1
        sleep 0.25
    done
}
mpath_snapshot() { # label
    echo "LAB-MPATH $1"
    multipath -ll 2>&1
    echo "LAB-MPATH-END"
}
for t in a b; do
    eval iqn=\$IQN_$t
    own=$P1 other=$P2
    [ $t = b ] && own=$P2 other=$P1
    s=$(wait_prios nvt_$t "$(dev_of "$iqn" "$own")" 50 "$(dev_of "$iqn" "$other")" 10 60) ||
        { multipath -ll; fail "nvt_$t: paths never reached the expected ALUA priorities (own 50 = active/optimized, partner 10 = active/non-optimized)"; }
done
mpath_snapshot initial
rtpg initial a
rtpg initial b
ok multipath "nvt_a and nvt_b: 2 paths each; own node's path prio 50 (AO), partner's prio 10 (ANO)"

# ---------------------------------------------------------------- one direction
# $1 = node to kill (its own target's LUN carries the I/O), $2 = survivor.
direction() {
    X=$1 Y=$2
    eval iqn=\$IQN_$X
    own=$P1 other=$P2
    [ $X = b ] && own=$P2 other=$P1
    down=$(dev_of "$iqn" "$own")   # path through X's portal
    surv=$(dev_of "$iqn" "$other") # path through the survivor's own portal
    dev=/dev/mapper/nvt_$X
    step "failover-$X"
    echo "paths of nvt_$X: /dev/$down via $own (node $X), /dev/$surv via $other (node $Y)"

    # Region V: written and verified before the failover, verified again
    # read-only after takeover and giveback (data survives both moves).
    fio --name=pre-$X --filename=$dev --ioengine=libaio --direct=1 --verify=crc32c \
        --rw=write --bs=64k --iodepth=8 --offset=512M --size=32M --do_verify=1 \
        >/run/lab/fio-pre-$X.out 2>&1 || { cat /run/lab/fio-pre-$X.out; fail "fio pre-$X"; }
    # The partner's path (active/non-optimized) on its own, bypassing
    # multipath: it must serve reads (from its copy or forwarded to the owner)
    # and writes (forwarded) of X's LUN correctly.
    fio --name=partner-read-$X --filename=/dev/$surv --ioengine=libaio --direct=1 --verify=crc32c \
        --rw=write --bs=64k --iodepth=8 --offset=512M --size=32M --verify_only \
        >/run/lab/fio-partner-read-$X.out 2>&1 || { cat /run/lab/fio-partner-read-$X.out; fail "fio partner-read-$X"; }
    grep -qi 'verify: bad\|verify failed\|bad magic\|bad header' /run/lab/fio-partner-read-$X.out &&
        fail "fio partner-read-$X: verify errors"
    fio --name=partner-write-$X --filename=/dev/$surv --ioengine=libaio --direct=1 --verify=crc32c \
        --rw=randwrite --bs=4k --iodepth=8 --offset=600M --size=4M --do_verify=1 \
        >/run/lab/fio-partner-write-$X.out 2>&1 || { cat /run/lab/fio-partner-write-$X.out; fail "fio partner-write-$X"; }
    grep -qi 'verify: bad\|verify failed\|bad magic\|bad header' /run/lab/fio-partner-write-$X.out &&
        fail "fio partner-write-$X: verify errors"
    fio --name=partner-write-$X --filename=/dev/$down --ioengine=libaio --direct=1 --verify=crc32c \
        --rw=randwrite --bs=4k --iodepth=8 --offset=600M --size=4M --verify_only \
        >/run/lab/fio-owner-check-$X.out 2>&1 || { cat /run/lab/fio-owner-check-$X.out; fail "fio owner-check-$X"; }
    grep -qi 'verify: bad\|verify failed\|bad magic\|bad header' /run/lab/fio-owner-check-$X.out &&
        fail "fio owner-check-$X: what was written through node $Y's path does not read back through node $X's"
    ok "partner-path-$X" "through /dev/$surv (node $Y, ANO): 32 MiB read + verified, 4 MiB random-written + verified, and read back through node $X's path"

    # The load: 4k random writes, crc32c in every block, verified continuously
    # (verify_backlog) and at the end; every I/O's completion time logged.
    f0=$(now)
    fio --name=fo-$X --filename=$dev --ioengine=libaio --direct=1 --verify=crc32c \
        --rw=randwrite --bs=4k --iodepth=16 --offset=0 --size=128M \
        --time_based --runtime="$LAB_FO_RUNTIME" --verify_backlog=512 --do_verify=1 \
        --write_lat_log=/run/lab/lat-$X --log_avg_msec=0 --log_unix_epoch=1 \
        >/run/lab/fio-fo-$X.out 2>&1 &
    FIO=$!
    sleep "$LAB_FO_WARMUP"
    kill -0 $FIO 2>/dev/null || { cat /run/lab/fio-fo-$X.out; fail "fio fo-$X ended before the kill"; }
    tk=$(date +%s%3N)
    echo "LAB-FAILOVER kill $X $tk"
    # Takeover: Y serves X's LUN on both its own portal and X's (taken-over)
    # address, so both paths should end up active/optimized (prio 50).
    if s=$(wait_prios nvt_$X "$surv" 50 "$down" 50 "$LAB_FLIP_TIMEOUT"); then
        echo "LAB-FO $X.flip_after_kill_s=$s"
        ok "alua-flip-$X" "${s}s after the kill both paths of nvt_$X are prio 50 (active/optimized)"
    else
        echo "LAB-FO $X.flip_after_kill_s=none"
        echo "LAB-FO $X.flip_after_kill_state=$(mpaths nvt_$X | tr '\n' ';')"
        FLIP_FAIL="$FLIP_FAIL $X-takeover"
    fi
    mpath_snapshot "after-takeover-of-$X"
    rtpg "after-takeover-of-$X" $X
    tr=$(date +%s%3N)
    echo "LAB-FAILOVER restart $X $tr"
    if s=$(wait_prios nvt_$X "$down" 50 "$surv" 10 "$LAB_FLIP_TIMEOUT"); then
        echo "LAB-FO $X.flip_back_after_restart_s=$s"
        ok "alua-flipback-$X" "${s}s after the restart request: /dev/$down prio 50 (AO), /dev/$surv prio 10 (ANO) again"
    else
        echo "LAB-FO $X.flip_back_after_restart_s=none"
        echo "LAB-FO $X.flip_back_state=$(mpaths nvt_$X | tr '\n' ';')"
        FLIP_FAIL="$FLIP_FAIL $X-giveback"
    fi
    mpath_snapshot "after-giveback-of-$X"
    rtpg "after-giveback-of-$X" $X
    kill -0 $FIO 2>/dev/null || echo "LAB-FO $X.warning=fio ended before the giveback was seen; raise LAB_FO_RUNTIME"
    wait $FIO
    frc=$?
    cat /run/lab/fio-fo-$X.out
    # Stall analysis from the per-I/O log: each line "t_ms, lat_ns, dir, bs,
    # ...", t = completion time (Unix ms, --log_unix_epoch). Two windows:
    # takeover = [kill, restart request), giveback = [restart request, end).
    # Per window: the longest gap without any completion that overlaps it
    # (what the application sees as a stall) and the longest single I/O in
    # flight during it (what is compared with the initiator's timeouts).
    lat=/run/lab/lat-${X}_lat.1.log
    [ -s "$lat" ] || fail "no fio latency log $lat"
    awk -F', *' -v K="$tk" -v R="$tr" -v X=$X '
        function upd(w, p, t, l) {
            if (n > 1 && t > ws[w] && p < we[w] && t - p > gap[w]) {gap[w] = t - p; g0[w] = p; g1[w] = t}
            if (t > ws[w] && t - l < we[w] && l > lat[w]) {lat[w] = l; lat_end[w] = t}
        }
        BEGIN {ws[1] = K; we[1] = R; ws[2] = R; we[2] = 1e15; name[1] = "takeover"; name[2] = "giveback"}
        {t = $1 + 0; l = $2 / 1e6; n++
         if (n > 1 && t - prev > 1000) printf "LAB-FO %s.gap_over_1s=%+.0f..%+.0f ms from the kill\n", X, prev - K, t - K
         upd(1, prev, t, l); upd(2, prev, t, l)
         if (l > maxl) maxl = l
         prev = t}
        END {
         printf "LAB-FO %s.ios_logged=%d\n", X, n
         for (w = 1; w <= 2; w++)
             printf "LAB-FO %s.%s_stall_s=%.2f (no completion from %+.0f to %+.0f ms after the %s); longest I/O %.2f s\n", \
                 X, name[w], gap[w] / 1000, g0[w] - ws[w], g1[w] - ws[w], (w == 1 ? "kill" : "restart request"), lat[w] / 1000
         printf "LAB-FO %s.max_io_latency_s=%.2f\n", X, maxl / 1000
        }' "$lat" | tee /run/lab/stall-$X
    [ $frc -eq 0 ] || fail "fio fo-$X exited $frc"
    grep -qi 'verify: bad\|verify failed\|crc32c: verify\|bad magic\|bad header' /run/lab/fio-fo-$X.out &&
        fail "fio fo-$X reported verify errors"
    grep -q 'err= *[1-9]' /run/lab/fio-fo-$X.out && fail "fio fo-$X reported err"
    vr=$(awk -F'[=,]' '/issued rwts: total=/ {print $2; exit}' /run/lab/fio-fo-$X.out)
    wr=$(awk -F'[=,]' '/issued rwts: total=/ {print $3; exit}' /run/lab/fio-fo-$X.out)
    [ "${vr:-0}" -gt 0 ] || fail "fio fo-$X verified no blocks"
    echo "LAB-FO $X.fio=rc 0, err=0, 0 verify failures, $wr writes, $vr blocks read back and crc32c-verified"
    ok "fio-$X" "rc 0, err=0, no verify failures; $wr writes, $vr verified reads"
    maxl=$(sed -n 's/.*max_io_latency_s=\([0-9.]*\).*/\1/p' /run/lab/stall-$X)
    limit=$LAB_REPLACEMENT_TIMEOUT
    [ "$SCSI_TIMEOUT" -lt "$limit" ] && limit=$SCSI_TIMEOUT
    awk -v m="$maxl" -v l="$limit" 'BEGIN {exit !(m < l)}' ||
        fail "nvt_$X: an I/O took ${maxl}s, not less than the initiator's shortest timeout (${limit}s)"
    ok "stall-$X" "longest I/O ${maxl}s < ${limit}s (min of replacement_timeout ${LAB_REPLACEMENT_TIMEOUT}s, SCSI timeout ${SCSI_TIMEOUT}s)"
    fio --name=post-$X --filename=$dev --ioengine=libaio --direct=1 --verify=crc32c \
        --rw=write --bs=64k --iodepth=8 --offset=512M --size=32M --verify_only \
        >/run/lab/fio-post-$X.out 2>&1 || { cat /run/lab/fio-post-$X.out; fail "fio post-$X (region written before the failover)"; }
    grep -qi 'verify: bad\|verify failed\|bad magic\|bad header' /run/lab/fio-post-$X.out && fail "fio post-$X: verify errors"
    ok "survived-$X" "32 MiB written before the kill verified after takeover and giveback"
    echo "LAB-TIME failover-$X $(elapsed "$f0")s"
}

FLIP_FAIL=""
direction a b
direction b a
mpath_snapshot final

step logout
run multipath -F || fail "multipath -F"
run iscsiadm -m node --logoutall=all || fail "logout"
kill $MPD 2>/dev/null
echo "LAB-TIME failover-guest $(elapsed "$T0")s"
[ -z "$FLIP_FAIL" ] || fail "ALUA states did not flip as expected:$FLIP_FAIL (see LAB-FO lines and multipath -ll snapshots)"
echo "LAB-RESULT ok"
exit 0
