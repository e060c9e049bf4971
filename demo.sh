#!/bin/bash
# The hvext demo: define and boot a guest, wait for its agent, show its memory
# from QMP and from the agent side by side, shut it down and undefine it.
set -euo pipefail
cd "$(dirname "$0")"
HVEXT=".venv/bin/hvext"
DOMAIN="${HVEXT_DEMO_DOMAIN:-hvext-demo}"
# the demo's resource pools live in a scratch store, not the host's
export HVEXT_POOLS_DB="$(mktemp -d)/pools.sqlite"

cleanup() {
  rm -rf "$(dirname "$HVEXT_POOLS_DB")"
  for backing in $($HVEXT power list --json 2>/dev/null | python3 -c "import json,sys; [print(d['backing']) for d in json.load(sys.stdin) if d['domain']=='$DOMAIN']" 2>/dev/null); do
    $HVEXT power unprotect "$DOMAIN" "$backing" --remove-store >/dev/null 2>&1 || true
    rm -f "$backing"
  done
  if virsh -q -c "${LIBVIRT_DEFAULT_URI:-qemu:///system}" dominfo "$DOMAIN" >/dev/null 2>&1; then
    $HVEXT destroy "$DOMAIN" >/dev/null 2>&1 || true
    $HVEXT undefine "$DOMAIN" --remove-power-store >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
cleanup

step() { printf '\n\033[1m$ hvext %s\033[0m\n' "$*"; $HVEXT "$@"; }

step doctor || true
step define "$DOMAIN" --memory 768M --vcpus 1
# persistent memory in host RAM (/dev/shm), protected by a store on disk (C11, C12)
step pmem-attach "$DOMAIN" --size 64M --volatile-backing
step start "$DOMAIN" --wait-agent 120
step agent-ping "$DOMAIN"
step dommemstat "$DOMAIN"
step qmp "$DOMAIN" query-balloon
# memory: a pool tree with the guest as a leaf, and a reclaim decision (issue C1-C3)
step pool-create /prod --reservation 512M --limit 4G --shares 2000
step pool-assign --create "$DOMAIN" /prod/demo
step pool-list
step memclass "$DOMAIN" || true
step reclaim "$DOMAIN" 128M
# the guest writes to its PMEM with DAX; the power fails; the power comes back
step pmem-mount "$DOMAIN" pmem0 /mnt/pmem --format
step guest-exec "$DOMAIN" -- sh -c 'echo "written before the power loss at $(date)" > /mnt/pmem/note && sync'
step pmem-list "$DOMAIN"
step power loss --domain "$DOMAIN"    # only the demo's guest: other VMs on this host are not touched
BACKING="$($HVEXT power list --json | python3 -c "import json,sys; print(next(d['backing'] for d in json.load(sys.stdin) if d['domain']=='$DOMAIN'))")"
printf '\n\033[1m# the host loses power: QEMU dies and /dev/shm is wiped\033[0m\n'
$HVEXT destroy "$DOMAIN"
rm -f "$BACKING"
step power restore --domain "$DOMAIN"
for _ in $(seq 90); do $HVEXT agent-ping "$DOMAIN" >/dev/null 2>&1 && break; sleep 2; done
step pmem-mount "$DOMAIN" pmem0 /mnt/pmem
step guest-exec "$DOMAIN" -- cat /mnt/pmem/note
step power unprotect "$DOMAIN" "$BACKING" --remove-store
step shutdown "$DOMAIN" --wait 60
step undefine "$DOMAIN"
trap - EXIT
