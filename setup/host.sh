#!/bin/bash
# Prepare a Debian 12 host for hvext: packages, directories, virtlogd and libvirtd.
# Idempotent: every step checks first and skips what is already done.
#   setup/host.sh packages   install missing Debian packages
#   setup/host.sh libvirtd   make sure virtlogd and libvirtd run (starts them without systemd)
#   setup/host.sh completion shell completion for hvext (/etc/bash_completion.d/hvext; needs the venv)
#   setup/host.sh ha         at boot: this host's etcd member (if `hvext cluster init/join` made one), then
#                            hvextd (if it has a config), each unless it runs (needs the venv)
#   setup/host.sh all        packages, libvirtd, swap, sysctls, ha
set -euo pipefail

PACKAGES=(
  qemu-system-x86 qemu-utils
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients libvirt-dev
  pkg-config gcc python3 python3-dev python3-venv
  mmdebstrap linux-image-amd64 e2fsprogs kmod
  iproute2 dnsmasq-base
  openssl iptables groff-base
  bash-completion
  etcd-server
)

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo make ...): libvirt's system instance and the guest image need it"
[ -r /etc/debian_version ] || die "this setup supports Debian 12 (bookworm)"

packages() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "Debian packages: all present"
  else
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  debian_etcd_off
}

# hvext runs its own etcd member (`hvext cluster init/join/start`, hvext/ha/etcd.py: TLS, data under
# /var/lib/hvext/etcd). Debian's etcd-server package enables its own unit, a plain-HTTP etcd on
# localhost:2379 (systemd starts it at once; sysvinit at the next boot): stop it and keep it off.
debian_etcd_off() {
  if have_systemd; then
    if [ "$(systemctl is-enabled etcd.service 2>/dev/null)" != masked ]; then
      log "etcd: stopping and masking Debian's etcd.service (hvext runs its own member)"
      systemctl disable --now etcd.service >/dev/null 2>&1 || true
      systemctl mask etcd.service >/dev/null
    fi
  elif compgen -G '/etc/rc[2-5].d/S*etcd' >/dev/null; then
    log "etcd: disabling Debian's /etc/init.d/etcd at boot (hvext runs its own member)"
    /etc/init.d/etcd stop >/dev/null 2>&1 || true
    update-rc.d etcd disable >/dev/null
  fi
}

have_systemd() { [ -d /run/systemd/system ]; }

running() { # running NAME: the machine's own daemon, from its pid file (lab hosts have their own)
  local pid
  pid="$(cat "/run/$1.pid" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

libvirtd() {
  getent passwd libvirt-qemu >/dev/null || die "user libvirt-qemu missing: package libvirt-daemon-system creates it"
  install -d -m 0755 /var/log/libvirt /var/log/libvirt/qemu /var/lib/hvext /var/log/hvext /var/log/hvext/console
  if virsh -q -c qemu:///system version >/dev/null 2>&1 && running virtlogd; then
    log "libvirtd and virtlogd: running"
    return
  fi
  if have_systemd; then
    systemctl start virtlogd.socket libvirtd.socket libvirtd.service
  else
    running virtlogd || { log "starting virtlogd"; /usr/sbin/virtlogd -d; }
    if ! running libvirtd; then
      log "starting libvirtd"
      /usr/sbin/libvirtd -d
    fi
  fi
  for _ in $(seq 1 50); do
    virsh -q -c qemu:///system version >/dev/null 2>&1 && { log "libvirtd: running"; return; }
    sleep 0.2
  done
  die "libvirtd did not come up; see /var/log/libvirt/ and run 'libvirtd' in the foreground to see why"
}

# Host swapping of VM memory (hvext reclaim --method swap) needs host swap space.
swap() {
  if [ "$(wc -l < /proc/swaps)" -gt 1 ]; then
    log "host swap: present"
    return
  fi
  local file=/var/lib/hvext/swapfile size_mib="${HVEXT_SWAP_MIB:-4096}"
  install -d -m 0755 /var/lib/hvext
  if [ ! -f "$file" ]; then
    log "creating a ${size_mib} MiB swap file $file"
    fallocate -l "${size_mib}M" "$file" || dd if=/dev/zero of="$file" bs=1M count="$size_mib" status=none
    chmod 600 "$file"
    mkswap -q "$file" >/dev/null
  fi
  swapon "$file" || die "swapon $file failed; hvext reclaim --method swap will not work"
  log "host swap: $file enabled"
}

# Post-copy migration: QEMU runs as libvirt-qemu without capabilities, and the destination
# QEMU needs userfaultfd for kernel faults, which kernels since 5.11 allow unprivileged
# processes only with this setting (at 0 libvirt reports "Postcopy is not supported").
# Trade-off: host-wide, so every local user may catch kernel faults with userfaultfd (an aid
# for exploiting kernel races). QEMU 7.2 has only the system call, not /dev/userfaultfd
# (QEMU 8.1+), so there is no narrower grant. `hvext doctor` reports it; README "Known limits".
sysctls() {
  if [ "$(cat /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null)" = "1" ]; then
    log "vm.unprivileged_userfaultfd: 1"
    return
  fi
  echo "vm.unprivileged_userfaultfd = 1" > /etc/sysctl.d/60-hvext.conf
  sysctl -q -w vm.unprivileged_userfaultfd=1 || die "cannot set vm.unprivileged_userfaultfd (post-copy migration needs it)"
  log "vm.unprivileged_userfaultfd: set to 1 (post-copy migration)"
}

# Shell completion of commands, options and domain names (argcomplete, hvext/cli/completion.py).
# The file is read by bash-completion (installed by `packages`): every interactive login shell
# (/etc/profile.d/bash_completion.sh) and Debian's default ~/.bashrc (/etc/skel) load it.
completion() {
  local root venv target=/etc/bash_completion.d/hvext tmp
  root="$(cd "$(dirname "$0")/.." && pwd)"
  venv="${HVEXT_VENV:-$root/.venv}"
  [ -x "$venv/bin/python" ] || die "no virtualenv at $venv: make venv builds it"
  install -d -m 0755 /etc/bash_completion.d
  tmp="$(mktemp /etc/bash_completion.d/.hvext.XXXXXX)"
  if ! "$venv/bin/python" -m hvext.cli.completion bash > "$tmp"; then
    rm -f "$tmp"
    die "python -m hvext.cli.completion failed (is argcomplete installed in $venv? make venv)"
  fi
  if cmp -s "$tmp" "$target"; then
    rm -f "$tmp"
    log "shell completion: $target up to date"
    return
  fi
  chmod 0644 "$tmp"
  mv -f "$tmp" "$target"
  log "shell completion: $target installed"
}

# After boot (like libvirtd above): this host's etcd member first, since hvextd's [ha] renews its lease
# through it, then hvextd. Each only if this host has one (the member: member.json, made by `hvext cluster
# init/join`; hvextd: its config file) and only unless it runs. With systemd and hvext's units installed
# (ops/systemd/hvext-etcd.service, the role's hvextd.service), systemctl starts them instead.
# Environment: HVEXT_STATE_DIR, HVEXT_RUN_DIR, HVEXT_LOG_DIR, HVEXT_CONFIG (hvext's own), HVEXT_VENV,
# HVEXT_DAEMON_URI (hvextd's libvirt URI; default libvirt's).
ha() {
  local root venv state config out
  root="$(cd "$(dirname "$0")/.." && pwd)"
  venv="${HVEXT_VENV:-$root/.venv}"
  state="${HVEXT_STATE_DIR:-/var/lib/hvext}"
  config="${HVEXT_CONFIG:-/etc/hvext/hvextd.toml}"
  if [ ! -f "$state/ha/member.json" ] && [ ! -f "$config" ]; then
    log "etcd and hvextd: this host has no cluster member ($state/ha/member.json) and no hvextd config ($config)"
    return
  fi
  [ -x "$venv/bin/python" ] || die "no virtualenv at $venv: make venv builds it"
  hvext_cli() { PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m hvext.cli.main "$@"; }
  if [ ! -f "$state/ha/member.json" ]; then
    log "etcd: this host has no cluster member (hvext cluster init/join makes one)"
  elif have_systemd && systemctl cat hvext-etcd.service >/dev/null 2>&1; then
    systemctl start hvext-etcd.service && log "etcd: hvext-etcd.service started"
  else
    out="$(hvext_cli cluster start)" || die "this host's etcd member did not start (see above)"
    log "$out"
  fi
  if [ ! -f "$config" ]; then
    log "hvextd: no config $config; not started"
  elif have_systemd && systemctl cat hvextd.service >/dev/null 2>&1; then
    systemctl start hvextd.service && log "hvextd: hvextd.service started"
  else
    out="$(hvext_cli ${HVEXT_DAEMON_URI:+-c "$HVEXT_DAEMON_URI"} daemon start)" || die "hvextd did not start (see above)"
    log "$out"
  fi
}

case "${1:-all}" in
  packages) packages ;;
  libvirtd) libvirtd ;;
  swap) swap ;;
  sysctls) sysctls ;;
  completion) completion ;;
  ha) ha ;;
  all) packages; libvirtd; swap; sysctls; ha ;;
  *) die "unknown step ${1}; use packages, libvirtd, swap, sysctls, completion, ha or all" ;;
esac
