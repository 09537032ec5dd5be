#!/usr/bin/env bash
# nvtarget lab: a Debian guest (Linux iscsi_tcp + open-iscsi + fio) booted in
# qemu against nvtarget on the host. See lab/README.md.
#
#   lab/run-lab.sh smoke     build/boot the guest, discovery, login, checks,
#                            fio crc32c verify, rescan, logout/login, logout
#   lab/run-lab.sh bench     fio matrix through the kernel initiator against
#                            nvtarget serve and tgt in the same boot; table
#                            with nvt/tgt ratios
#   lab/run-lab.sh failover  HA pair (nvtarget pair up), dm-multipath + ALUA
#                            over both portals, fio crc32c verify while the
#                            owner is SIGKILLed, restarted and given back;
#                            both directions
#   lab/run-lab.sh image     only build (or reuse) the cached guest image
#
# Environment knobs (all optional):
#   LAB_DIR            cache + run dir        (default <repo>/nvtarget-data/lab)
#   LAB_MIRROR         Debian mirror          (default: from /etc/apt sources)
#   LAB_SUITE          Debian suite           (default: bookworm)
#   LAB_FIO_RUNTIME    smoke: seconds of timed fio   (default: 30)
#   LAB_FIO_SIZE       smoke: random-write region    (default: 256M)
#   LAB_BENCH_TESTS    bench: subset of "rr4k-qd1 rr4k-qd32 rw4k-qd1 rw4k-qd32 sr1m-qd8 sw1m-qd8"
#   LAB_BENCH_RUNTIME  bench: seconds per run (default 15), LAB_BENCH_RAMP (3)
#   LAB_BENCH_REPEAT   bench: matrix repetitions (default 1; >1: medians + ratio range)
#   LAB_BENCH_PREFILL  bench: 1 = write both LUNs fully first (default 1)
#   LAB_PEERS          bench: dir with start-tgt.sh/stop-peer.sh (default <repo>/../shared/peers)
#   LAB_FO_RUNTIME     failover: fio seconds per direction (default 75)
#   LAB_FO_WARMUP      failover: seconds of I/O before the kill (default 15)
#   LAB_FLIP_TIMEOUT   failover: seconds to wait for each ALUA flip (default 45)
#   LAB_REPLACEMENT_TIMEOUT  failover: iSCSI replacement_timeout (default 20)
#   LAB_TIMEOUT        guest timeout, seconds (default: 600 with KVM, 2400 without)
#   LAB_ACCEL          kvm|tcg                (default: kvm when /dev/kvm is usable)
#   LAB_NO_INSTALL=1   never apt-get install missing host tools, just say what's missing
#   LAB_NET            guestfwd (default: restrict=on + guestfwd to the target only)
#                      or hostlo (smoke only: guest dials 10.0.2.2:<port> = host loopback)
#   LAB_VERBOSE=1      stream the whole guest console, not only progress lines
#   NVTARGET_BIN       target binary          (default: <repo>/target/release/nvtarget,
#                                              or under $CARGO_TARGET_DIR; built with
#                                              cargo build --release --bin nvtarget first)
set -euo pipefail

LAB_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$LAB_SRC/.." && pwd)
LAB_DIR=${LAB_DIR:-$REPO/nvtarget-data/lab}
LAB_SUITE=${LAB_SUITE:-bookworm}
LAB_FIO_RUNTIME=${LAB_FIO_RUNTIME:-30}
LAB_FIO_SIZE=${LAB_FIO_SIZE:-256M}
LAB_IQN=iqn.2026-11.io.nvtarget:default
LAB_LUN_BYTES=$((1024 * 1024 * 1024))
# Inside the guest, the target is reached at this address; qemu's user-mode
# network (restrict=on) forwards it, and only it, to the host's target.
GUEST_PORTAL_IP=10.0.2.100
GUEST_PORTAL_PORT=3260

# The guest's packages (part of the image recipe hash).
GUEST_PACKAGES=(
    linux-image-amd64 # kernel with iscsi_tcp, dm-multipath as modules
    open-iscsi multipath-tools fio sg3-utils
    iproute2 kmod udev util-linux procps e2fsprogs
)

T_START=$(date +%s)
log() { printf '[lab %5ss] %s\n' "$(($(date +%s) - T_START))" "$*" >&2; }
die() {
    printf '[lab] ERROR: %s\n' "$*" >&2
    exit 1
}

# ------------------------------------------------------------------ cleanup
PIDS=()     # processes we started, killed by PID on exit
TMPDIRS=()  # scratch dirs removed on exit
MOUNTS=()   # chroot mounts to undo on exit
CLEANUP_FNS=() # functions run first on exit (e.g. stop an HA pair)
cleanup() {
    local rc=$? p m d f
    for f in "${CLEANUP_FNS[@]}"; do
        "$f" || true
    done
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.5
        done
        kill -9 "$p" 2>/dev/null || true
    done
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        m=${MOUNTS[i]}
        umount -l "$m" 2>/dev/null || true
    done
    for d in "${TMPDIRS[@]}"; do
        rm -rf --one-file-system "$d" 2>/dev/null || true
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ host tools
# command -> Debian package
declare -A TOOL_PKG=(
    [qemu-system-x86_64]=qemu-system-x86
    [debootstrap]=debootstrap
    [mkfs.ext4]=e2fsprogs
    [socat]=socat
)
need_tools() {
    local missing=() pkgs=() t
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$t" >/dev/null 2>&1 ||
            { missing+=("$t"); pkgs+=("${TOOL_PKG[$t]}"); }
    done
    ((${#missing[@]} == 0)) && return 0
    if [[ $(id -u) == 0 && ${LAB_NO_INSTALL:-0} != 1 ]] && command -v apt-get >/dev/null; then
        log "installing host packages: ${pkgs[*]} (missing: ${missing[*]})"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null ||
            die "apt-get update failed; install by hand: apt-get install ${pkgs[*]}"
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null ||
            die "apt-get install ${pkgs[*]} failed"
        for t in "${missing[@]}"; do
            PATH=$PATH:/usr/sbin:/sbin command -v "$t" >/dev/null ||
                die "$t still missing after installing ${TOOL_PKG[$t]}"
        done
        return 0
    fi
    local t2 msg=""
    for ((i = 0; i < ${#missing[@]}; i++)); do
        t2=${missing[i]}
        msg+="  $t2: install Debian package '${TOOL_PKG[$t2]}'"$'\n'
    done
    die "missing host tools:"$'\n'"$msg  (as root: apt-get install ${pkgs[*]}; run-lab.sh does that itself when run as root)"
}
export PATH=$PATH:/usr/sbin:/sbin

KVM_WHY=""
kvm_usable() {
    if [[ ! -c /dev/kvm ]]; then
        KVM_WHY="/dev/kvm does not exist (no hardware virtualization, or kvm_intel/kvm_amd not loaded)"
        return 1
    fi
    # Opening it read-write is what qemu needs.
    if ! { exec 9<>/dev/kvm; } 2>/dev/null; then
        KVM_WHY="/dev/kvm is not usable by $(id -un) (add the user to group kvm)"
        return 1
    fi
    exec 9>&-
    # PVM (kvm_pvm, e.g. inside some cloud sandboxes) provides /dev/kvm but runs
    # only PVM-enabled guest kernels: Debian's stock kernel hangs before its
    # first console line there.
    if [[ -d /sys/module/kvm_pvm && ! -d /sys/module/kvm_intel && ! -d /sys/module/kvm_amd ]]; then
        KVM_WHY="/dev/kvm is PVM (kvm_pvm), which boots only PVM-enabled kernels, not Debian's"
        return 1
    fi
    return 0
}

pick_accel() {
    case ${LAB_ACCEL:-auto} in
    kvm)
        kvm_usable || die "LAB_ACCEL=kvm but $KVM_WHY"
        ACCEL=kvm
        ;;
    tcg) ACCEL=tcg ;;
    auto)
        if kvm_usable; then ACCEL=kvm; else
            ACCEL=tcg
            log "WARNING: no KVM: $KVM_WHY; using software emulation (qemu TCG), slower"
        fi
        ;;
    *) die "LAB_ACCEL must be kvm, tcg or auto" ;;
    esac
}

# ------------------------------------------------------------------ mirror
debian_mirror() {
    if [[ -n ${LAB_MIRROR:-} ]]; then
        echo "$LAB_MIRROR"
        return
    fi
    # Reuse the mirror apt is configured with (deb822 .sources or one-line .list).
    local f u
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        u=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' "$f")
        [[ -n $u ]] && { echo "${u%/}"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        u=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:.*\/debian\/?$/) {print $i; exit}}' "$f")
        [[ -n $u ]] && { echo "${u%/}"; return; }
    done
    echo http://deb.debian.org/debian
}

# Progress lines while debootstrap runs (not part of the recipe hash).
watch_debootstrap() { # pid log root
    local pid=$1 dlog=$2 root=$3 last="" phase lastlog=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        phase=$(grep -Eo '^I: [A-Z][a-z]+' "$dlog" 2>/dev/null | tail -1 || true)
        phase=${phase#I: }
        if [[ -n $phase && ($phase != "$last" || $((SECONDS - lastlog)) -ge 30) ]]; then
            lastlog=$SECONDS
            log "image: debootstrap: $phase ... ($(du -sm "$root" 2>/dev/null | cut -f1) MiB so far)"
            last=$phase
        fi
    done
}

# ------------------------------------------------------------------ image
# The recipe. Everything that shapes the image is in this function, the
# package list, the suite and lab/guest/lab-init; their hash names the cache.
build_image() { # $1 = output dir (empty, on the same filesystem as the cache)
    local out=$1 root=$1/root mirror
    mirror=$(debian_mirror)
    local include
    include=$(IFS=,; echo "${GUEST_PACKAGES[*]}")
    log "image: debootstrap --variant=minbase $LAB_SUITE from $mirror (a few minutes; log: $out/debootstrap.log)"
    mkdir -p "$root"
    debootstrap --variant=minbase --include="$include" "$LAB_SUITE" "$root" "$mirror" \
        >"$out/debootstrap.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    watch_debootstrap "$pid" "$out/debootstrap.log" "$root"
    wait "$pid" || {
        tail -20 "$out/debootstrap.log" >&2
        die "debootstrap failed (full log: $out/debootstrap.log)"
    }

    log "image: configuring guest root"
    # Smaller, faster initramfs: only what is needed to find an ext4 root on virtio.
    printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic >"$root/etc/initramfs-tools/modules"
    sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
    sed -i 's/^COMPRESS=.*/COMPRESS=gzip/' "$root/etc/initramfs-tools/initramfs.conf"
    local kver
    kver=$(ls "$root/lib/modules" | sort -V | tail -1)
    [[ -n $kver ]] || die "no kernel modules in the guest root"
    for fs in proc sys dev; do
        mount --bind "/$fs" "$root/$fs"
        MOUNTS+=("$root/$fs")
    done
    chroot "$root" update-initramfs -c -k "$kver" >"$out/initramfs.log" 2>&1 ||
        die "update-initramfs failed (see $out/initramfs.log)"
    chroot "$root" depmod -a "$kver"
    # Are the modules the lab is about really there?
    for m in iscsi_tcp libiscsi_tcp scsi_transport_iscsi dm_multipath dm_round_robin virtio_net sd_mod; do
        chroot "$root" modinfo -k "$kver" -F filename "$m" >/dev/null 2>&1 ||
            die "guest kernel $kver lacks module $m"
    done
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[i]}"; done
    MOUNTS=()

    echo "iqn.2026-11.io.nvtarget:lab-guest" | sed 's/^/InitiatorName=/' >"$root/etc/iscsi/initiatorname.iscsi"
    echo nvtarget-lab >"$root/etc/hostname"
    printf '/dev/vda / ext4 rw,noatime 0 1\n' >"$root/etc/fstab"
    install -m 0755 "$LAB_SRC/guest/lab-init" "$root/sbin/lab-init"
    # Trim: docs, man pages, apt lists and caches; the kernel/initrd are passed to
    # qemu directly, so /boot copies go too.
    cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
    cp "$root/boot/initrd.img-$kver" "$out/initrd.img"
    rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/locale/* "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
        "$root"/boot/* "$root"/var/log/*.log
    echo "$kver" >"$out/kernel-version"

    log "image: making ext4 root image"
    local mb
    mb=$(du -sm "$root" | cut -f1)
    mb=$((mb + mb / 4 + 128)) # headroom: the guest writes to a snapshot anyway
    mkfs.ext4 -q -F -L labroot -d "$root" "$out/root.img" "${mb}M" >"$out/mkfs.log" 2>&1 ||
        die "mkfs.ext4 -d failed (see $out/mkfs.log)"
    rm -rf --one-file-system "$root"
}

recipe_hash() {
    {
        declare -f build_image debian_mirror
        printf '%s\n' "${GUEST_PACKAGES[@]}" "$LAB_SUITE"
        cat "$LAB_SRC/guest/lab-init"
    } | sha256sum | cut -c1-16
}

ensure_image() {
    local h
    h=$(recipe_hash)
    IMAGE=$LAB_DIR/image-$h
    if [[ -f $IMAGE/ok ]]; then
        log "image: cached $IMAGE (kernel $(cat "$IMAGE/kernel-version"), recipe $h)"
        IMAGE_BUILD_S=0
        return
    fi
    [[ $(id -u) == 0 ]] || die "building the guest image needs root (debootstrap, chroot); run as root once, or point LAB_DIR at a cache that has image-$h"
    need_tools debootstrap mkfs.ext4
    mkdir -p "$LAB_DIR"
    # One build at a time per cache dir; whoever waited may find it built.
    exec 8>"$LAB_DIR/.build.lock"
    if ! flock -n 8; then
        log "image: another run is building the image; waiting for it"
        flock 8
    fi
    if [[ -f $IMAGE/ok ]]; then
        log "image: built meanwhile by another run: $IMAGE"
        IMAGE_BUILD_S=0
        exec 8>&-
        return
    fi
    log "image: recipe $h not cached: building $IMAGE (first run only)"
    local t0=$SECONDS tmp
    tmp=$(mktemp -d "$LAB_DIR/.build-$h.XXXXXX")
    TMPDIRS+=("$tmp")
    build_image "$tmp"
    IMAGE_BUILD_S=$((SECONDS - t0))
    echo "$IMAGE_BUILD_S" >"$tmp/build-seconds"
    date -u +%FT%TZ >"$tmp/ok"
    rm -rf "$IMAGE"
    mv "$tmp" "$IMAGE"
    # Older recipes' images are dead weight.
    find "$LAB_DIR" -maxdepth 1 -name 'image-*' ! -name "image-$h" -exec rm -rf {} + 2>/dev/null || true
    exec 8>&-
    log "image: built in ${IMAGE_BUILD_S}s ($(du -sh "$IMAGE" | cut -f1), root $(du -sh --apparent-size "$IMAGE/root.img" | cut -f1))"
}

# ------------------------------------------------------------------ target
free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$((32000 + RANDOM % 20000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    die "no free TCP port found"
}

# Sets NVT_BIN: $NVTARGET_BIN, or this checkout's release binary (under
# $CARGO_TARGET_DIR when set, like cargo itself), built first so the lab never
# tests a stale binary (a no-op when up to date).
resolve_bin() { # $1 run dir (for cargo.log)
    local run=$1
    NVT_BIN=${NVTARGET_BIN:-}
    if [[ -z $NVT_BIN ]]; then
        local tdir=${CARGO_TARGET_DIR:-target}
        [[ $tdir == /* ]] || tdir=$REPO/$tdir
        NVT_BIN=$tdir/release/nvtarget
        if command -v cargo >/dev/null; then
            log "target: cargo build --release --bin nvtarget (a no-op when up to date)"
            (cd "$REPO" && cargo build --release --bin nvtarget) >"$run/cargo.log" 2>&1 || {
                tail -30 "$run/cargo.log" >&2
                die "cargo build --release failed (log: $run/cargo.log)"
            }
        elif [[ ! -x $NVT_BIN ]]; then
            die "$NVT_BIN missing and no cargo to build it (set NVTARGET_BIN)"
        fi
    fi
    [[ -x $NVT_BIN ]] || die "nvtarget binary $NVT_BIN not found"
}

wait_listening() { # addr port pid what
    local i
    for i in $(seq 1 100); do
        kill -0 "$3" 2>/dev/null || return 1
        # A bare connect-and-close: the target logs it as a short-lived connection.
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        sleep 0.2
    done
    return 1
}

start_target() { # $1 run dir
    local run=$1
    resolve_bin "$run"
    TARGET_PORT=$(free_port)
    mkdir -p "$run/target-data"
    log "target: $NVT_BIN serve --listen 127.0.0.1:$TARGET_PORT (log: $run/target.log)"
    "$NVT_BIN" serve --listen "127.0.0.1:$TARGET_PORT" --data-dir "$run/target-data" >"$run/target.log" 2>&1 &
    TARGET_PID=$!
    PIDS+=("$TARGET_PID")
    wait_listening 127.0.0.1 "$TARGET_PORT" "$TARGET_PID" || {
        tail -20 "$run/target.log" >&2
        die "nvtarget not listening on 127.0.0.1:$TARGET_PORT (log: $run/target.log)"
    }
}

# ------------------------------------------------------------------ guest
# The scenario sets, before boot_guest:
#   GUEST_ENV   lines KEY=value for the guest's /lab/env
#   GUEST_FWDS  "guest-ip:port=host-ip:port" forwards (guestfwd mode)
# and may define on_guest_line (called with every console line as it appears,
# within ~0.2 s; host-side actions the guest asks for, e.g. killing a node).
GUEST_ENV=()
GUEST_FWDS=()
on_guest_line() { :; }

boot_guest() { # $1 run dir, $2 scenario script
    local run=$1 script=$2 cfg=$1/config
    mkdir -p "$cfg"
    install -m 0755 "$script" "$cfg/run.sh"
    printf '%s\n' "${GUEST_ENV[@]}" >"$cfg/env"
    mkfs.ext4 -q -F -L labcfg -d "$cfg" "$run/config.img" 8M >/dev/null 2>&1 || die "mkfs.ext4 config disk failed"

    local accel_args timeout
    if [[ $ACCEL == kvm ]]; then
        accel_args=(-accel kvm -cpu host)
        timeout=${LAB_TIMEOUT:-600}
    else
        accel_args=(-accel tcg -cpu max)
        timeout=${LAB_TIMEOUT:-2400}
    fi
    CONSOLE=$run/console.log
    : >"$CONSOLE"
    # Network: user-mode (slirp) with restrict=on, so the guest can reach
    # nothing at all except the guestfwd below: a TCP connection to
    # 10.0.2.100:3260 in the guest makes qemu run socat, which connects to the
    # target on the host's loopback (one socat per connection, so logout/login
    # cycles and multiple sessions work).
    local netdev
    case ${LAB_NET:-guestfwd} in
    guestfwd)
        netdev="user,id=n0,restrict=on,net=10.0.2.0/24,host=10.0.2.2"
        local f
        for f in "${GUEST_FWDS[@]}"; do
            netdev+=",guestfwd=tcp:${f%%=*}-cmd:socat -lf /dev/null - TCP:${f#*=}"
        done
        ;;
    hostlo)
        # Alternative, kept for comparison (see README): no restrict, the
        # guest dials 10.0.2.2:<port>, which slirp maps to the host's
        # 127.0.0.1:<port>. The guest has no default route, but nothing in
        # qemu stops it from reaching other hosts; guestfwd is the default.
        netdev="user,id=n0,net=10.0.2.0/24,host=10.0.2.2"
        sed -i "s/^LAB_PORTAL=.*/LAB_PORTAL=10.0.2.2:$TARGET_PORT/" "$cfg/env"
        mkfs.ext4 -q -F -L labcfg -d "$cfg" "$run/config.img" 8M >/dev/null 2>&1 || die "mkfs.ext4 config disk failed"
        ;;
    *) die "LAB_NET must be guestfwd or hostlo" ;;
    esac
    local append="console=ttyS0,115200 root=/dev/vda rw rootfstype=ext4 init=/sbin/lab-init"
    append+=" panic=-1 net.ifnames=0 loglevel=4 tsc=reliable"
    log "guest: booting ($ACCEL, timeout ${timeout}s, console: $CONSOLE)"
    qemu-system-x86_64 -name nvtarget-lab "${accel_args[@]}" -machine q35 -m 1024 -smp 2 \
        -nodefaults -no-user-config -nographic -no-reboot \
        -serial "file:$CONSOLE" -monitor none \
        -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img" -append "$append" \
        -drive "file=$IMAGE/root.img,if=virtio,format=raw,snapshot=on,cache=unsafe" \
        -drive "file=$run/config.img,if=virtio,format=raw,readonly=on" \
        -netdev "$netdev" -device virtio-net-pci,netdev=n0,romfile= \
        -device virtio-rng-pci \
        </dev/null >"$run/qemu.log" 2>&1 &
    QEMU_PID=$!
    PIDS+=("$QEMU_PID")
    local t0=$SECONDS seen=0 line n booted="" reached_init=""
    GUEST_BOOT_S="" GUEST_RC=""
    while :; do
        n=$(wc -l <"$CONSOLE")
        if ((n > seen)); then
            while IFS= read -r line; do
                line=${line%$'\r'}
                if [[ ${LAB_VERBOSE:-0} == 1 ]]; then
                    printf '  | %s\n' "$line" >&2
                elif [[ $line == LAB-* ]]; then
                    case $line in
                    LAB-PARAM*) ;;
                    *) log "guest: ${line#LAB-}" ;;
                    esac
                fi
                if [[ $line == "LAB-BOOT ready"* && -z $booted ]]; then
                    booted=1
                    GUEST_BOOT_S=$((SECONDS - t0))
                    log "guest: booted in ${GUEST_BOOT_S}s (guest uptime ${line##* })"
                fi
                [[ $line == LAB-BOOT* ]] && reached_init=1
                [[ $line == LAB-EXIT* ]] && GUEST_RC=${line#LAB-EXIT }
                on_guest_line "$line"
            done < <(sed -n "$((seen + 1)),${n}p" "$CONSOLE")
            seen=$n
        fi
        kill -0 "$QEMU_PID" 2>/dev/null || break
        if [[ $ACCEL == kvm && -z $reached_init ]] && ((SECONDS - t0 > 120)); then
            log "guest: no sign of life under KVM after 120s, killing qemu (pid $QEMU_PID)"
            kill "$QEMU_PID" 2>/dev/null || true
            break
        fi
        if ((SECONDS - t0 > timeout)); then
            log "guest: TIMEOUT after ${timeout}s, killing qemu (pid $QEMU_PID)"
            kill "$QEMU_PID" 2>/dev/null || true
            GUEST_RC=timeout
            break
        fi
        sleep 0.2
    done
    wait "$QEMU_PID" 2>/dev/null || true
    GUEST_S=$((SECONDS - t0))
    if [[ -s $run/qemu.log ]]; then
        log "qemu said:"
        sed 's/^/    /' "$run/qemu.log" >&2
    fi
    # KVM that opens but cannot run this kernel (nested/paravirtual KVM, MSR
    # or CPUID quirks): retry once in software emulation.
    if [[ $ACCEL == kvm && -z $reached_init && ${LAB_ACCEL:-auto} == auto ]]; then
        log "WARNING: the guest never reached its init under KVM; retrying with software emulation (TCG)"
        ACCEL=tcg
        mv "$CONSOLE" "$CONSOLE.kvm-attempt"
        boot_guest "$run" "$script"
    fi
}

# ------------------------------------------------------------------ scenarios
cmd_smoke() {
    local tools=(qemu-system-x86_64 mkfs.ext4 socat)
    [[ -f $LAB_DIR/image-$(recipe_hash)/ok ]] || tools+=(debootstrap)
    need_tools "${tools[@]}"
    pick_accel
    ensure_image
    local run
    mkdir -p "$LAB_DIR"
    run=$(mktemp -d "$LAB_DIR/run-smoke-$(date +%Y%m%d-%H%M%S)-XXXX")
    start_target "$run"
    GUEST_ENV=(
        "LAB_IQN=$LAB_IQN"
        "LAB_PORTAL=$GUEST_PORTAL_IP:$GUEST_PORTAL_PORT"
        "LAB_HOST_PORTAL=127.0.0.1:$TARGET_PORT"
        "LAB_LUN_BYTES=$LAB_LUN_BYTES"
        "LAB_FIO_RUNTIME=$LAB_FIO_RUNTIME"
        "LAB_FIO_SIZE=$LAB_FIO_SIZE"
    )
    GUEST_FWDS=("$GUEST_PORTAL_IP:$GUEST_PORTAL_PORT=127.0.0.1:$TARGET_PORT")
    boot_guest "$run" "$LAB_SRC/guest/smoke.sh"
    kill "$TARGET_PID" 2>/dev/null || true

    local result
    result=$(grep -a '^LAB-RESULT' "$CONSOLE" | tail -1 | tr -d '\r' || true)
    echo
    echo "==================== nvtarget lab: smoke summary ===================="
    echo "accel:          $ACCEL"
    echo "image:          $IMAGE (kernel $(cat "$IMAGE/kernel-version"))"
    echo "image build:    ${IMAGE_BUILD_S}s$( ((IMAGE_BUILD_S == 0)) && echo ' (cached)')"
    echo "guest boot:     ${GUEST_BOOT_S:-?}s (qemu start to test start)"
    echo "guest total:    ${GUEST_S}s (boot + smoke + poweroff)"
    echo "whole run:      $(($(date +%s) - T_START))s"
    echo "target:         127.0.0.1:$TARGET_PORT, seen by the guest as $(grep '^LAB_PORTAL=' "$run/config/env" | cut -d= -f2) (LAB_NET=${LAB_NET:-guestfwd})"
    echo "checks passed:"
    { grep -a '^LAB-OK' "$CONSOLE" || true; } | tr -d '\r' | sed 's/^LAB-OK /  - /'
    echo "negotiated (iscsiadm -m session -P 3, first login):"
    { grep -a '^LAB-PARAM' "$CONSOLE" || true; } | tr -d '\r' | sed 's/^LAB-PARAM /  /'
    echo "console log:    $CONSOLE"
    echo "target log:     $run/target.log"
    echo "result:         ${result:-LAB-RESULT missing (guest rc ${GUEST_RC:-none})}"
    echo "====================================================================="
    # Keep the last 5 run dirs; a passed run's LUN data is not worth keeping.
    ls -dt "$LAB_DIR"/run-* 2>/dev/null | tail -n +6 | while read -r d; do rm -rf --one-file-system "$d"; done
    if [[ $result == "LAB-RESULT ok" && $GUEST_RC == 0 ]]; then
        rm -rf --one-file-system "$run/target-data"
        return 0
    fi
    if [[ ${LAB_VERBOSE:-0} != 1 ]]; then
        echo "---- last 60 console lines ----" >&2
        tail -60 "$CONSOLE" | tr -d '\r' >&2
    fi
    return 1
}

# ------------------------------------------------------------------ failover
# The HA pair (`nvtarget pair up`): node a on 127.0.0.1:PAIR_PORT (target
# iqn.2026-11.io.nvtarget:a, tpgt 1), node b on 127.0.0.2:PAIR_PORT (target
# ...:b, tpgt 2), interconnects on PAIR_PORT+10. The guest reaches a's portal
# as 10.0.2.100:3260 and b's as 10.0.2.101:3260 (one socat per connection,
# so after a takeover the forward of a's address reaches b, which took it).
PAIR_DIR=""
pair() { "$NVT_BIN" pair "$@" --data-dir "$PAIR_DIR" --port "$PAIR_PORT"; }
pair_pid() { # node -> pid of that node if it is a running nvtarget we started
    local pid comm
    pid=$(cat "$PAIR_DIR/$1.pid" 2>/dev/null) || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == nvtarget* ]] || return 1
    echo "$pid"
}
stop_pair() {
    [[ -n $PAIR_DIR ]] || return 0
    pair down >>"$PAIR_DIR/actions.log" 2>&1 && return 0
    local n pid
    for n in a b; do
        pid=$(pair_pid "$n") && kill -9 "$pid" 2>/dev/null
    done
    return 0
}
pair_port() {
    local p a
    for _ in $(seq 1 50); do
        p=$((32000 + RANDOM % 20000))
        for a in 127.0.0.1:$p 127.0.0.2:$p 127.0.0.1:$((p + 10)) 127.0.0.2:$((p + 10)); do
            (exec 3<>"/dev/tcp/${a%:*}/${a#*:}") 2>/dev/null && continue 2
        done
        echo "$p"
        return
    done
    die "no free port pair found"
}
us_now() { local t=$EPOCHREALTIME; echo "${t/./}"; }
pair_mirrored() { [[ $(pair status --json 2>/dev/null | grep -c '"mirrored": true') == 2 ]]; }
ms_since() { echo $((($(us_now) - $1) / 1000)); }

# Host actions requested by the guest (lab/guest/failover.sh).
declare -A FO=() # host-side measurements, printed in the summary
failover_on_line() {
    local line=$1 what node pid t0 i addr st
    [[ $line == "LAB-FAILOVER "* ]] || return 0
    read -r _ what node _ <<<"$line"
    addr=127.0.0.1
    [[ $node == b ]] && addr=127.0.0.2
    case $what in
    kill)
        # Only a mirrored pair can take over without losing acknowledged
        # writes: after a giveback the pair needs a moment to mirror again.
        t0=$(us_now)
        for i in $(seq 1 150); do
            pair_mirrored && break
            sleep 0.2
        done
        pair_mirrored || log "failover: WARNING: the pair is not mirrored 30 s after the request; killing anyway"
        FO[$node.wait_mirrored_ms]=$(ms_since "$t0")
        pid=$(pair_pid "$node") || {
            log "failover: node $node is not running; cannot kill it"
            FO[$node.kill]="node not running"
            return 0
        }
        t0=$(us_now)
        kill -9 "$pid"
        FO[$node.kill_unix]=$EPOCHREALTIME
        log "failover: SIGKILL node $node (pid $pid)"
        # Host view of the takeover: when does the node's portal address
        # accept connections again (the survivor binds it)? First wait for
        # the dead node's own listener to be gone.
        for i in $(seq 1 500); do
            st=$(awk '{sub(/^.*\) /, ""); print $1}' "/proc/$pid/stat" 2>/dev/null || true)
            [[ -z $st || $st == Z || $st == X ]] && break
            sleep 0.01
        done
        for i in $(seq 1 500); do
            (exec 3<>"/dev/tcp/$addr/$PAIR_PORT") 2>/dev/null && break
            sleep 0.02
        done
        if (exec 3<>"/dev/tcp/$addr/$PAIR_PORT") 2>/dev/null; then
            FO[$node.portal_back_ms]=$(ms_since "$t0")
            log "failover: $addr:$PAIR_PORT answers again $((FO[$node.portal_back_ms]))ms after the kill (survivor took the address)"
        else
            FO[$node.portal_back_ms]="not within 10 s"
            log "failover: $addr:$PAIR_PORT does not answer 10 s after the kill"
        fi
        pair status >>"$PAIR_DIR/actions.log" 2>&1 || true
        ;;
    restart)
        t0=$(us_now)
        log "failover: restarting node $node (nvtarget pair up)"
        if ! pair up >>"$PAIR_DIR/actions.log" 2>&1; then
            FO[$node.restart]="pair up failed"
            log "failover: pair up failed (see $PAIR_DIR/actions.log)"
            return 0
        fi
        FO[$node.restart_ms]=$(ms_since "$t0")
        t0=$(us_now)
        if pair giveback --node "$node" >>"$PAIR_DIR/actions.log" 2>&1; then
            FO[$node.giveback_ms]=$(ms_since "$t0")
            log "failover: node $node up in $((FO[$node.restart_ms]))ms, giveback done in $((FO[$node.giveback_ms]))ms"
        else
            FO[$node.giveback]="failed"
            log "failover: pair giveback --node $node failed (see $PAIR_DIR/actions.log)"
        fi
        pair status >>"$PAIR_DIR/actions.log" 2>&1 || true
        ;;
    esac
}

cmd_failover() {
    [[ ${LAB_NET:-guestfwd} == guestfwd ]] || die "failover works with LAB_NET=guestfwd only"
    local tools=(qemu-system-x86_64 mkfs.ext4 socat)
    [[ -f $LAB_DIR/image-$(recipe_hash)/ok ]] || tools+=(debootstrap)
    need_tools "${tools[@]}"
    pick_accel
    ensure_image
    local run i
    mkdir -p "$LAB_DIR"
    run=$(mktemp -d "$LAB_DIR/run-failover-$(date +%Y%m%d-%H%M%S)-XXXX")
    resolve_bin "$run"
    PAIR_DIR=$run/pair
    PAIR_PORT=$(pair_port)
    CLEANUP_FNS+=(stop_pair)
    log "pair: $NVT_BIN pair up --data-dir $PAIR_DIR --port $PAIR_PORT"
    pair up >"$run/pair-up.log" 2>&1 || {
        cat "$run/pair-up.log" >&2
        die "pair up failed (logs: $PAIR_DIR/a.log, b.log)"
    }
    sed 's/^/    /' "$run/pair-up.log" >&2
    # Both nodes mirrored before the guest starts: a takeover needs the log copy.
    for i in $(seq 1 150); do
        pair_mirrored && break
        sleep 0.2
    done
    pair_mirrored ||
        { pair status >&2; die "the pair did not reach mirrored state in 30 s"; }
    log "pair: both nodes serving, mirrored"
    GUEST_ENV=(
        "LAB_PORTAL_1=10.0.2.100:3260"
        "LAB_PORTAL_2=10.0.2.101:3260"
        "LAB_IQN_A=iqn.2026-11.io.nvtarget:a"
        "LAB_IQN_B=iqn.2026-11.io.nvtarget:b"
        "LAB_FO_RUNTIME=${LAB_FO_RUNTIME:-75}"
        "LAB_FO_WARMUP=${LAB_FO_WARMUP:-15}"
        "LAB_FLIP_TIMEOUT=${LAB_FLIP_TIMEOUT:-45}"
        "LAB_REPLACEMENT_TIMEOUT=${LAB_REPLACEMENT_TIMEOUT:-20}"
    )
    GUEST_FWDS=("10.0.2.100:3260=127.0.0.1:$PAIR_PORT" "10.0.2.101:3260=127.0.0.2:$PAIR_PORT")
    on_guest_line() { failover_on_line "$1"; }
    boot_guest "$run" "$LAB_SRC/guest/failover.sh"
    pair status >"$run/pair-status-end.txt" 2>&1 || true
    stop_pair

    local result k
    result=$(grep -a '^LAB-RESULT' "$CONSOLE" | tail -1 | tr -d '\r' || true)
    echo
    echo "=================== nvtarget lab: failover summary ==================="
    echo "accel:          $ACCEL"
    echo "image:          $IMAGE (kernel $(cat "$IMAGE/kernel-version"))"
    echo "guest boot:     ${GUEST_BOOT_S:-?}s; guest total ${GUEST_S}s; whole run $(($(date +%s) - T_START))s"
    echo "pair:           a 127.0.0.1:$PAIR_PORT (guest 10.0.2.100:3260), b 127.0.0.2:$PAIR_PORT (guest 10.0.2.101:3260), dir $PAIR_DIR"
    echo "host side:"
    for k in $(printf '%s\n' "${!FO[@]}" | grep -v kill_unix | sort); do
        printf '  %-24s %s\n' "$k" "${FO[$k]}"
    done
    echo "guest side (LAB-FO):"
    { grep -a '^LAB-FO ' "$CONSOLE" || true; } | tr -d '\r' | sed 's/^LAB-FO /  /'
    echo "REPORT TARGET PORT GROUPS per path (sg_rtpg -d):"
    { grep -a '^LAB-RTPG ' "$CONSOLE" || true; } | tr -d '\r' | sed 's/^LAB-RTPG /  /'
    echo "multipath -ll snapshots:"
    tr -d '\r' <"$CONSOLE" | sed 's/\x1b\[[0-9;]*m//g' | awk '/^LAB-MPATH-END/ {on = 0} on {print "    " $0} /^LAB-MPATH / {on = 1; print "  -- " $2}'
    echo "checks passed:"
    { grep -a '^LAB-OK' "$CONSOLE" || true; } | tr -d '\r' | sed 's/^LAB-OK /  - /'
    echo "takeover timeline from the survivor's log (ms after the SIGKILL):"
    local n sv k0 t
    for n in a b; do
        [[ -n ${FO[$n.kill_unix]:-} ]] || continue
        sv=b
        [[ $n == b ]] && sv=a
        k0=${FO[$n.kill_unix]}
        sed 's/\x1b\[[0-9;]*m//g' "$PAIR_DIR/$sv.log" | grep -E 'taking over|takeover complete|giveback complete' |
            while read -r t rest; do
                t=$(date -d "$t" +%s.%N 2>/dev/null) || continue
                awk -v t="$t" -v k="$k0" 'BEGIN {exit !(t >= k - 1)}' || continue
                printf '  %s: %+8.0f ms  %s\n' "$n" "$(awk -v t="$t" -v k="$k0" 'BEGIN {print (t - k) * 1000}')" "$(echo "$rest" | cut -c1-150)"
            done | head -3
    done
    echo "takeover/giveback in the node logs:"
    grep -hiE 'takeover (done|complete|finished)|took over|giveback (done|complete)|fenc' "$PAIR_DIR"/a.log "$PAIR_DIR"/b.log 2>/dev/null |
        sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | head -20 | sed 's/^/  /'
    echo "console log:    $CONSOLE"
    echo "node logs:      $PAIR_DIR/a.log $PAIR_DIR/b.log (actions: $PAIR_DIR/actions.log)"
    echo "result:         ${result:-LAB-RESULT missing (guest rc ${GUEST_RC:-none})}"
    echo "====================================================================="
    ls -dt "$LAB_DIR"/run-* 2>/dev/null | tail -n +6 | while read -r d; do rm -rf --one-file-system "$d"; done
    if [[ $result == "LAB-RESULT ok" && $GUEST_RC == 0 ]]; then
        # Keep logs, status and takeover reports; the images are big.
        rm -f "$PAIR_DIR"/[ab]/*.img "$PAIR_DIR"/[ab]/*.nvram
        return 0
    fi
    if [[ ${LAB_VERBOSE:-0} != 1 ]]; then
        echo "---- last 80 console lines ----" >&2
        tail -80 "$CONSOLE" | tr -d '\r' >&2
    fi
    return 1
}

# ------------------------------------------------------------------ bench
# nvtarget and tgt side by side, through the guest's kernel initiator. tgt is
# started the way bench/fio-matrix.sh starts it: ../shared/peers/start-tgt.sh
# (LAB_PEERS overrides), one 1 GiB file-backed LUN, default parameters.
TGT_STATE=""
stop_tgt() {
    [[ -n $TGT_STATE ]] || return 0
    STATE=$TGT_STATE bash "$LAB_PEERS/stop-peer.sh" tgtd >/dev/null 2>&1 ||
        log "bench: stopping tgtd failed; check $TGT_STATE/tgtd.pid"
    rm -f "$TGT_STATE/tgt.img"
}
proc_ticks() { # utime+stime of pid (all threads) in clock ticks
    awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat" 2>/dev/null || echo NA
}
declare -A BENCH_PID=()
bench_on_line() {
    local line=$1 ev test t rep rest
    [[ $line == "LAB-BENCH "* ]] || return 0
    read -r _ ev test t rep rest <<<"$line"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$ev" "$test" "$t" "$rep" "$EPOCHREALTIME" \
        "$(proc_ticks "${BENCH_PID[$t]}")" >>"$BENCH_RUN/cpu.tsv"
    [[ $ev == start ]] && log "bench: $test $t (run $rep)"
    return 0
}

cmd_bench() {
    [[ ${LAB_NET:-guestfwd} == guestfwd ]] || die "bench works with LAB_NET=guestfwd only"
    TOOL_PKG[tgtd]=tgt
    TOOL_PKG[tgtadm]=tgt
    TOOL_PKG[python3]=python3
    local tools=(qemu-system-x86_64 mkfs.ext4 socat tgtd tgtadm python3)
    [[ -f $LAB_DIR/image-$(recipe_hash)/ok ]] || tools+=(debootstrap)
    need_tools "${tools[@]}"
    LAB_PEERS=${LAB_PEERS:-$(cd "$REPO/../shared/peers" 2>/dev/null && pwd || true)}
    [[ -n $LAB_PEERS && -f $LAB_PEERS/start-tgt.sh ]] ||
        die "no start-tgt.sh: set LAB_PEERS to the directory with start-tgt.sh and stop-peer.sh (default <repo>/../shared/peers)"
    pick_accel
    ensure_image
    local run
    mkdir -p "$LAB_DIR"
    run=$(mktemp -d "$LAB_DIR/run-bench-$(date +%Y%m%d-%H%M%S)-XXXX")
    BENCH_RUN=$run
    start_target "$run"
    local tgt_port ctrl tgt_iqn=iqn.2026-11.test:tgt
    tgt_port=$(free_port)
    ctrl=$((100 + RANDOM % 800))
    while [[ -e /var/run/tgtd/socket.$ctrl ]]; do ctrl=$((100 + RANDOM % 800)); done
    TGT_STATE=$run/tgt
    CLEANUP_FNS+=(stop_tgt)
    log "tgt: $LAB_PEERS/start-tgt.sh on 127.0.0.1:$tgt_port (control $ctrl, state $TGT_STATE)"
    TGT_PID=$(STATE=$TGT_STATE PORT=$tgt_port ADDR=127.0.0.1 CTRL=$ctrl IQN=$tgt_iqn SIZE_MB=$((LAB_LUN_BYTES >> 20)) \
        bash "$LAB_PEERS/start-tgt.sh" 2>"$run/tgt-start.err") || {
        cat "$run/tgt-start.err" >&2
        die "start-tgt.sh failed"
    }
    [[ -n $TGT_PID ]] && kill -0 "$TGT_PID" 2>/dev/null || die "tgtd did not stay up (log: $TGT_STATE/tgtd.log)"
    BENCH_PID=([nvt]=$TARGET_PID [tgt]=$TGT_PID)
    local tests=${LAB_BENCH_TESTS:-"rr4k-qd1 rr4k-qd32 rw4k-qd1 rw4k-qd32 sr1m-qd8 sw1m-qd8"}
    GUEST_ENV=(
        "LAB_IQN_nvt=$LAB_IQN"
        "LAB_PORTAL_nvt=10.0.2.100:3260"
        "LAB_IQN_tgt=$tgt_iqn"
        "LAB_PORTAL_tgt=10.0.2.101:3260"
        "LAB_BENCH_TESTS=\"$tests\""
        "LAB_BENCH_RUNTIME=${LAB_BENCH_RUNTIME:-15}"
        "LAB_BENCH_RAMP=${LAB_BENCH_RAMP:-3}"
        "LAB_BENCH_REPEAT=${LAB_BENCH_REPEAT:-1}"
        "LAB_BENCH_PREFILL=${LAB_BENCH_PREFILL:-1}"
        "LAB_BENCH_SIZE=${LAB_BENCH_SIZE:-1G}"
    )
    GUEST_FWDS=("10.0.2.100:3260=127.0.0.1:$TARGET_PORT" "10.0.2.101:3260=127.0.0.1:$tgt_port")
    : >"$run/cpu.tsv"
    on_guest_line() { bench_on_line "$1"; }
    boot_guest "$run" "$LAB_SRC/guest/bench.sh"
    kill "$TARGET_PID" 2>/dev/null || true
    stop_tgt
    TGT_STATE=""

    local result
    result=$(grep -a '^LAB-RESULT' "$CONSOLE" | tail -1 | tr -d '\r' || true)
    {
        echo "date=$(date -Is) host=$(hostname) nproc=$(nproc) accel=$ACCEL runtime=${LAB_BENCH_RUNTIME:-15} ramp=${LAB_BENCH_RAMP:-3} repeat=${LAB_BENCH_REPEAT:-1}"
        echo "nvtarget=$NVT_BIN $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null)"
        echo "tgt=$(dpkg-query -W -f '${Version}' tgt 2>/dev/null) guest kernel $(cat "$IMAGE/kernel-version")"
    } >"$run/meta.txt"
    python3 - "$CONSOLE" "$run" <<'PY' | tee "$run/table.md"
import base64, gzip, json, os, statistics, sys
console, run = sys.argv[1], sys.argv[2]
tck = os.sysconf("SC_CLK_TCK")
res, cpu, params = {}, {}, {}
for raw in open(console, "rb"):
    line = raw.decode("utf-8", "replace").strip()
    if line.startswith("LAB-JSON "):
        _, test, t, rep, b64 = (line.split(" ", 4) + [""])[:5]
        try:
            res[(test, t, rep)] = json.loads(gzip.decompress(base64.b64decode(b64)))
        except Exception as e:
            print(f"note: {test} {t} run {rep}: no usable fio JSON ({e})")
    elif line.startswith("LAB-BPARAM "):
        _, t, kv = line.split(" ", 2)
        params.setdefault(t, []).append(kv)
for l in open(os.path.join(run, "cpu.tsv")):
    ev, test, t, rep, when, ticks = l.rstrip("\n").split("\t")
    cpu.setdefault((test, t, rep), {})[ev] = (float(when), ticks)
def measure(test, t, rep):
    j = res.get((test, t, rep))
    if not j or not j.get("jobs"):
        return None
    job = j["jobs"][0]
    d = job["write"] if job["write"]["io_bytes"] > job["read"]["io_bytes"] else job["read"]
    pct = d.get("clat_ns", {}).get("percentile", {})
    m = {"iops": d["iops"], "mibs": d["bw_bytes"] / 2**20, "p99": pct.get("99.000000", 0) / 1000,
         "err": job.get("error", 0), "cpu": None, "us_io": None}
    c = cpu.get((test, t, rep), {})
    if "start" in c and "end" in c and "NA" not in (c["start"][1], c["end"][1]):
        secs = (float(c["end"][1]) - float(c["start"][1])) / tck
        wall = c["end"][0] - c["start"][0]
        m["cpu"] = 100 * secs / wall
        # fio's IOPS are post-ramp; the CPU window is the whole fio run.
        m["us_io"] = 1e6 * secs / (m["iops"] * wall) if m["iops"] else None
    return m
names = {"rr4k-qd1": "4k randread QD1", "rr4k-qd32": "4k randread QD32", "rw4k-qd1": "4k randwrite QD1",
         "rw4k-qd32": "4k randwrite QD32", "sr1m-qd8": "1M read QD8", "sw1m-qd8": "1M write QD8"}
tests = [t for t in names if any(k[0] == t for k in res)]
reps = sorted({k[2] for k in res}, key=int)
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def f(x, fmt):
    return "n/a" if x is None else format(x, fmt)
print("| test | tgt IOPS | nvt IOPS | **nvt/tgt** | tgt MiB/s | nvt MiB/s | tgt p99 us | nvt p99 us | tgt CPU % | nvt CPU % | tgt CPU us/IO | nvt CPU us/IO |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for test in tests:
    ms = {t: [measure(test, t, r) for r in reps] for t in ("tgt", "nvt")}
    ok = {t: [m for m in ms[t] if m] for t in ms}
    row = {t: {k: med([m[k] for m in ok[t]]) for k in ("iops", "mibs", "p99", "cpu", "us_io")} for t in ms}
    ratios = [n["iops"] / g["iops"] for g, n in zip(ms["tgt"], ms["nvt"]) if g and n and g["iops"]]
    ratio = f(med(ratios), ".2f") + "x"
    if len(ratios) > 1:
        ratio += f" ({min(ratios):.2f}..{max(ratios):.2f})"
    errs = [f"{t} err={m['err']}" for t in ms for m in ok[t] if m["err"]]
    print(f"| {names[test]} | {f(row['tgt']['iops'], '.0f')} | {f(row['nvt']['iops'], '.0f')} | **{ratio}** | "
          f"{f(row['tgt']['mibs'], '.1f')} | {f(row['nvt']['mibs'], '.1f')} | {f(row['tgt']['p99'], '.0f')} | "
          f"{f(row['nvt']['p99'], '.0f')} | {f(row['tgt']['cpu'], '.0f')} | {f(row['nvt']['cpu'], '.0f')} | "
          f"{f(row['tgt']['us_io'], '.1f')} | {f(row['nvt']['us_io'], '.1f')} |" + (" " + ", ".join(errs) if errs else ""))
print()
for t in ("nvt", "tgt"):
    keep = ("MaxRecvDataSegmentLength", "MaxXmitDataSegmentLength", "FirstBurstLength", "MaxBurstLength",
            "ImmediateData", "InitialR2T", "MaxOutstandingR2T", "disk")
    print(f"{t}: " + ", ".join(kv for kv in params.get(t, []) if kv.split("=")[0] in keep))
PY
    echo
    echo "==================== nvtarget lab: bench summary ===================="
    echo "accel:          $ACCEL (guest: 2 vCPUs; under TCG the guest's CPU is the main limit)"
    echo "guest boot:     ${GUEST_BOOT_S:-?}s; guest total ${GUEST_S}s; whole run $(($(date +%s) - T_START))s"
    echo "targets:        nvtarget 127.0.0.1:$TARGET_PORT (guest 10.0.2.100:3260), tgt 127.0.0.1:$tgt_port (guest 10.0.2.101:3260)"
    echo "checks passed:"
    { grep -a '^LAB-OK' "$CONSOLE" || true; } | tr -d '\r' | sed 's/^LAB-OK /  - /'
    echo "table:          $run/table.md (meta: $run/meta.txt)"
    echo "console log:    $CONSOLE"
    echo "result:         ${result:-LAB-RESULT missing (guest rc ${GUEST_RC:-none})}"
    echo "====================================================================="
    ls -dt "$LAB_DIR"/run-* 2>/dev/null | tail -n +6 | while read -r d; do rm -rf --one-file-system "$d"; done
    rm -rf --one-file-system "$run/target-data"
    if [[ $result == "LAB-RESULT ok" && $GUEST_RC == 0 ]] && ! grep -aq '^LAB-BENCH-ERROR' "$CONSOLE"; then
        return 0
    fi
    grep -a '^LAB-BENCH-ERROR' "$CONSOLE" >&2 || true
    if [[ ${LAB_VERBOSE:-0} != 1 ]]; then
        echo "---- last 60 console lines ----" >&2
        tail -60 "$CONSOLE" | tr -d '\r' | cut -c1-300 >&2
    fi
    return 1
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

case ${1:-} in
smoke) cmd_smoke ;;
image)
    pick_accel
    ensure_image
    echo "$IMAGE"
    ;;
failover) cmd_failover ;;
bench) cmd_bench ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
