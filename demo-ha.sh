#!/bin/bash
# The hvext HA demo (C13): a 3-host cluster lab (etcd member, libvirtd and hvextd per host), a guest
# protected through a shared store writing durable records into its DAX-mounted PMEM, the power loss
# of its host, and the guest running on another host with every record it saw durable.
# Needs the lab to be free: it refuses to run beside a lab someone else brought up.
set -euo pipefail
cd "$(dirname "$0")"
HVEXT=".venv/bin/hvext"
PY=".venv/bin/python"
DOMAIN="${HVEXT_DEMO_DOMAIN:-hvext-demo-ha}"
SHARED="/var/lib/hvext/ha-demo-shared"   # the lab hosts share /var/lib/hvext, as a shared file system would
LAB_UP=0

say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }
step() { printf '\n\033[1m$ hvext %s\033[0m\n' "$*"; $HVEXT "$@"; }
# the CLI reaches the cluster through a lab host's etcd member (its files; hidden options)
member() { local d="/var/lib/hvext/lab/$1" r="/run/hvext-lab/$1"; echo "--state-dir $d --run-dir $r --log-dir $r"; }
uri() { echo "qemu+unix:///system?socket=/run/hvext-lab/$1/libvirt/libvirt-sock"; }

cleanup() {
  set +e
  if [ "$LAB_UP" = 1 ]; then
    for h in host1 host2 host3; do
      # shellcheck disable=SC2046
      $HVEXT ha unprotect "$DOMAIN" $(member "$h") >/dev/null 2>&1 && break
    done
    for h in host2 host3 host1; do
      if virsh -q -c "$(uri "$h")" dominfo "$DOMAIN" >/dev/null 2>&1; then
        $HVEXT -c "$(uri "$h")" destroy "$DOMAIN" >/dev/null 2>&1
        $HVEXT -c "$(uri "$h")" undefine "$DOMAIN" >/dev/null 2>&1
      fi
    done
    $HVEXT power unprotect "$DOMAIN" "/dev/shm/hvext/$DOMAIN/nvdimm0.img" --remove-store >/dev/null 2>&1
    $HVEXT lab down >/dev/null 2>&1 && echo "lab down"
  fi
  rm -rf "/dev/shm/hvext/$DOMAIN" "$SHARED" "/var/lib/hvext/domains/$DOMAIN"
}
trap cleanup EXIT

if [ "$($HVEXT lab status --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["up"] is not False)')" = True ]; then
  echo "error: a lab is already up (maybe someone else's); \`hvext lab down\` first" >&2
  trap - EXIT
  exit 1
fi
LAB_UP=1
rm -rf "$SHARED" && mkdir -m 0700 "$SHARED"
step lab up --hosts 3 --cluster
U1="$(uri host1)"
say "a guest on host1 with a 64 MiB NVDIMM in host RAM, saved to $SHARED on power loss"
step -c "$U1" define "$DOMAIN" --memory 512M --vcpus 1
step -c "$U1" pmem-attach "$DOMAIN" --size 64M --volatile-backing --store "$SHARED/$DOMAIN/nvdimm0"
step -c "$U1" start "$DOMAIN" --wait-agent 240
step -c "$U1" pmem-mount "$DOMAIN" pmem0 /mnt/pmem --format
# shellcheck disable=SC2046
step -c "$U1" ha protect "$DOMAIN" --host host1 --via-shared-store "$SHARED" $(member host1)
for _ in $(seq 30); do
  # shellcheck disable=SC2046
  [ "$($HVEXT ha status "$DOMAIN" --json $(member host1) | $PY -c 'import json,sys; print(json.load(sys.stdin)["owner"])')" = host1 ] && break
  sleep 1
done
# shellcheck disable=SC2046
step ha status $(member host1)
say "the guest appends numbered, checksummed records to /mnt/pmem (fdatasync after each)"
step -c "$U1" guest-exec "$DOMAIN" -- sh -c 'setsid python3 -m hvext_agent.records write --dir /mnt/pmem/records --status /run/hvext-records.json >/dev/null 2>&1 </dev/null &'
sleep 8
step -c "$U1" guest-exec "$DOMAIN" -- cat /run/hvext-records.json
DURABLE="$($HVEXT -c "$U1" guest-exec "$DOMAIN" -- cat /run/hvext-records.json | $PY -c 'import json,sys; print(json.load(sys.stdin)["last_durable"])')"
say "host1 loses power: hvextd saves the PMEM on battery, records the final generation, hands the domain off; 10 s later host1 dies"
FAILED_AT=$(date +%s.%N)
step lab fail host1 --power-loss
OWNER=""
for _ in $(seq 120); do
  # shellcheck disable=SC2046
  OWNER="$($HVEXT ha status "$DOMAIN" --json $(member host2) 2>/dev/null | $PY -c 'import json,sys; print(json.load(sys.stdin)["owner"] or "")' 2>/dev/null || true)"
  if [ -n "$OWNER" ] && [ "$OWNER" != host1 ] && $HVEXT -c "$(uri "$OWNER")" agent-ping "$DOMAIN" --timeout 2 >/dev/null 2>&1; then break; fi
  sleep 2
done
[ -n "$OWNER" ] && [ "$OWNER" != host1 ] || { echo "error: no other host runs $DOMAIN" >&2; exit 1; }
say "$DOMAIN runs on $OWNER $(printf '%.1f' "$($PY -c "import time; print(time.time() - $FAILED_AT)")") s after the power loss began (host1 was killed 10 s in)"
UN="$(uri "$OWNER")"
# shellcheck disable=SC2046
step ha status $(member "$OWNER")
BLOCKDEV="$($HVEXT -c "$UN" pmem-list "$DOMAIN" --json | $PY -c 'import json,sys; print(next(n["blockdev"] for n in json.load(sys.stdin)["guest"] if n["mode"] == "fsdax"))')"
step -c "$UN" pmem-mount "$DOMAIN" "$BLOCKDEV" /mnt/pmem
step -c "$UN" guest-exec "$DOMAIN" -- python3 -m hvext_agent.records verify --dir /mnt/pmem/records
VALID="$($HVEXT -c "$UN" guest-exec "$DOMAIN" -- python3 -m hvext_agent.records verify --dir /mnt/pmem/records | $PY -c 'import json,sys; r = json.load(sys.stdin); print(r["last_valid"] if r["contiguous"] else -1)')"
say "records the guest saw durable (read just before the power loss): $DURABLE; on $OWNER: $VALID, all intact"
[ "$VALID" -ge "$DURABLE" ] || { echo "error: records were lost" >&2; exit 1; }
