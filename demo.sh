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
  if virsh -q -c "${LIBVIRT_DEFAULT_URI:-qemu:///system}" dominfo "$DOMAIN" >/dev/null 2>&1; then
    $HVEXT destroy "$DOMAIN" >/dev/null 2>&1 || true
    $HVEXT undefine "$DOMAIN" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
cleanup

step() { printf '\n\033[1m$ hvext %s\033[0m\n' "$*"; $HVEXT "$@"; }

step doctor || true
step define "$DOMAIN" --memory 768M --vcpus 1
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
# persistent memory: a hot-plugged NVDIMM used with DAX in the guest (C11)
step pmem-attach "$DOMAIN" --size 64M --live
sleep 2
step pmem-list "$DOMAIN"
step shutdown "$DOMAIN" --wait 60
step undefine "$DOMAIN"
trap - EXIT
