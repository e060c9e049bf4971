#!/bin/bash
# Build qemu-system-x86_64 from Debian 12's QEMU 7.2 source with the hvext
# patch series (qemu-patches/series) and install it where hvext looks for it:
#
#   /var/cache/hvext/qemu/<hash>/qemu-system-x86_64   (the build, cached)
#   /usr/local/lib/hvext/qemu-system-x86_64           (symlink to it)
#
# <hash> covers the series file, every patch in it and this script, so a
# rerun with nothing changed only checks the symlink and takes seconds.
# Steps: deb-src sources (deb822) -> build dependencies -> `apt-get source`
# + dpkg-source -x -> patch -p1 -> configure -> nice ninja -j2 -> install.
# Needs root (apt-get, /var/cache, /usr/local).  Environment overrides:
#   HVEXT_QEMU_JOBS  ninja jobs (default 2)
#   HVEXT_QEMU_FORCE=1  rebuild even if the cached binary exists
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SERIES="$HERE/series"
CACHE_ROOT=/var/cache/hvext/qemu
SRC_ROOT=/var/cache/hvext/qemu-src
LINK_DIR=/usr/local/lib/hvext
LINK="$LINK_DIR/qemu-system-x86_64"
DEB_SRC_LIST=/etc/apt/sources.list.d/hvext-deb-src.sources
JOBS=${HVEXT_QEMU_JOBS:-2}
BUILD_DEPS=(meson ninja-build libglib2.0-dev libpixman-1-dev libfdt-dev
            zlib1g-dev flex bison dpkg-dev gcc libc6-dev pkg-config python3
            patch xz-utils)
FIRMWARE_PATH=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
CONFIGURE_FLAGS=(--target-list=x86_64-softmmu --without-default-features
                 --enable-kvm --enable-tcg --enable-fdt=system
                 --disable-install-blobs --disable-docs --disable-werror
                 --with-git-submodules=ignore
                 "--firmwarepath=$FIRMWARE_PATH")

say()  { printf '[qemu-patches] %s\n' "$*"; }
die()  { printf '[qemu-patches] ERROR: %s\n' "$*" >&2; DIED=1; exit 1; }
DIED=0
trap 'rc=$?; [ $rc -eq 0 ] || [ $DIED = 1 ] || printf "[qemu-patches] ERROR: failed (exit %s): %s\n" "$rc" "$BASH_COMMAND" >&2' EXIT

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, $CACHE_ROOT, $LINK_DIR)"
[ -f "$SERIES" ] || die "no series file at $SERIES"

# ---------------------------------------------------------------- cache key
mapfile -t PATCHES < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$SERIES" | grep -v '^$' || true)
[ "${#PATCHES[@]}" -gt 0 ] || die "series file lists no patches"
for p in "${PATCHES[@]}"; do
    [ -f "$HERE/$p" ] || die "patch listed in series not found: $HERE/$p"
done
HASH=$( (cd "$HERE" && cat series "${PATCHES[@]}" build.sh) | sha256sum | cut -c1-16)
OUT_DIR="$CACHE_ROOT/$HASH"
OUT="$OUT_DIR/qemu-system-x86_64"

install_link() {
    mkdir -p "$LINK_DIR"
    chmod 0755 /var/cache/hvext "$CACHE_ROOT" "$OUT_DIR" "$LINK_DIR"
    chmod 0755 "$OUT"
    if [ "$(readlink "$LINK" 2>/dev/null)" != "$OUT" ]; then
        ln -sfn "$OUT" "$LINK.tmp.$$"
        mv -Tf "$LINK.tmp.$$" "$LINK"
        say "linked $LINK -> $OUT"
    else
        say "$LINK -> $OUT (unchanged)"
    fi
}

# Start the binary with no -L and a NIC + VGA, as libvirt would: fails if the
# baked-in firmware path does not find bios-256k.bin, efi-virtio.rom, vgabios.
smoke_test() {
    local bin=$1 out
    out=$(printf '%s\n' '{"execute":"qmp_capabilities"}' \
              '{"execute":"query-commands"}' '{"execute":"quit"}' |
          timeout 60 "$bin" -machine pc -accel tcg -m 64 -display none \
              -nodefaults -no-user-config -vga std -device virtio-net-pci \
              -S -qmp stdio 2>&1) ||
        die "smoke test of $bin failed: $(printf '%s' "$out" | tail -3)"
    for c in x-hvext-dirty-log-start x-hvext-dirty-log-stop x-hvext-query-dirty-pages; do
        grep -q "\"$c\"" <<<"$out" || die "smoke test: $c missing from query-commands of $bin"
    done
}

exec 9>"/var/lock/hvext-qemu-build.lock"
flock 9

if [ -x "$OUT" ] && [ "${HVEXT_QEMU_FORCE:-0}" != 1 ]; then
    say "series $HASH already built: $OUT"
    smoke_test "$OUT"
    install_link
    exit 0
fi
say "building series $HASH (${#PATCHES[@]} patches) -> $OUT"
T0=$(date +%s)

# ------------------------------------------------------------- deb-src apt
# Same mirrors as the deb entries in /etc/apt/sources.list.d/*.sources.
mirror_for() {   # $1: suite to look for
    awk -v suite="$1" '
        /^[[:space:]]*$/ { if (uris != "" && types ~ /(^| )deb( |$)/ && suites ~ ("(^| )" suite "( |$)")) { print uris; exit } uris=""; types=""; suites=""; next }
        /^URIs:/   { sub(/^URIs:[[:space:]]*/, ""); uris=$1 }
        /^Types:/  { sub(/^Types:[[:space:]]*/, ""); types=$0 }
        /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites=$0 }
        END { if (uris != "" && types ~ /(^| )deb( |$)/ && suites ~ ("(^| )" suite "( |$)")) print uris }
    ' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1
}
MAIN_MIRROR=$(mirror_for bookworm); MAIN_MIRROR=${MAIN_MIRROR:-http://deb.debian.org/debian}
SEC_MIRROR=$(mirror_for bookworm-security); SEC_MIRROR=${SEC_MIRROR:-http://deb.debian.org/debian-security}
WANT_LIST="Types: deb-src
URIs: $MAIN_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: $SEC_MIRROR
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
NEED_UPDATE=0
if [ "$(cat "$DEB_SRC_LIST" 2>/dev/null)" != "$WANT_LIST" ]; then
    say "writing $DEB_SRC_LIST (deb-src for bookworm, bookworm-updates, bookworm-security)"
    printf '%s\n' "$WANT_LIST" > "$DEB_SRC_LIST"
    NEED_UPDATE=1
fi
# (output captured first: `apt-cache ... | grep -q` fails under pipefail)
SHOWSRC=$(apt-cache showsrc qemu 2>/dev/null || true)
if [ $NEED_UPDATE = 1 ] || ! grep -q '^Package: qemu$' <<<"$SHOWSRC"; then
    say "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    SHOWSRC=$(apt-cache showsrc qemu 2>/dev/null || true)
fi

# ------------------------------------------------------- build dependencies
MISSING=()
for pkg in "${BUILD_DEPS[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || MISSING+=("$pkg")
done
if [ ${#MISSING[@]} -gt 0 ]; then
    say "installing build dependencies: ${MISSING[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/dev/null; } ||
        die "could not install build dependencies: ${MISSING[*]}"
fi

# ------------------------------------------------------------------- source
# The source of the installed Debian QEMU if the archive still has it,
# else the newest qemu source of bookworm.
mkdir -p "$SRC_ROOT"
cd "$SRC_ROOT"
SRC_VER=$(dpkg-query -W -f='${source:Version}' qemu-system-x86 2>/dev/null || true)
if [ -n "$SRC_VER" ] && grep -qx "Version: $SRC_VER" <<<"$SHOWSRC"; then
    SPEC="qemu=$SRC_VER"
else
    SRC_VER=$(sed -n 's/^Version: //p' <<<"$SHOWSRC" | sort -V | tail -1)
    [ -n "$SRC_VER" ] || die "apt-cache showsrc qemu finds no source package"
    SPEC="qemu=$SRC_VER"
fi
DSC="qemu_${SRC_VER#*:}.dsc"
if [ ! -f "$DSC" ]; then
    say "apt-get source --download-only $SPEC"
    apt-get source -qq --download-only "$SPEC" 2>&1 | grep -v "unsandboxed as root" || true
    [ -f "$DSC" ] || die "apt-get source did not produce $SRC_ROOT/$DSC"
fi
TREE="$SRC_ROOT/hvext-$HASH"
rm -rf "$SRC_ROOT"/hvext-*.partial "$TREE"
say "unpacking $DSC into $TREE (dpkg-source -x applies Debian's patches)"
# (its "gpgv: Can't check signature" is expected: apt already verified the
# files against the signed Release file)
dpkg-source -q -x "$DSC" "$TREE.partial" > "$SRC_ROOT/dpkg-source.log" 2>&1 ||
    { tail -5 "$SRC_ROOT/dpkg-source.log" >&2; die "dpkg-source -x $DSC failed"; }

for p in "${PATCHES[@]}"; do
    say "applying $p"
    patch -d "$TREE.partial" -p1 --batch --forward --quiet < "$HERE/$p" ||
        die "patch $p does not apply to qemu $SRC_VER"
done
mv "$TREE.partial" "$TREE"

# --------------------------------------------------------- configure, build
mkdir -p "$TREE/build"
cd "$TREE/build"
say "configure ${CONFIGURE_FLAGS[*]}"
../configure "${CONFIGURE_FLAGS[@]}" > configure.log 2>&1 ||
    { tail -20 configure.log >&2; die "configure failed, see $TREE/build/configure.log"; }
say "nice -n 10 ninja -j$JOBS qemu-system-x86_64 (a few minutes; log in $TREE/build/ninja.log)"
T1=$(date +%s)
nice -n 10 ninja -j"$JOBS" qemu-system-x86_64 > ninja.log 2>&1 ||
    { grep -E 'error|FAILED' ninja.log | head -20 >&2; die "build failed, see $TREE/build/ninja.log"; }
T2=$(date +%s)
say "compiled in $((T2 - T1)) s"

# ------------------------------------------------------------------ install
mkdir -p "$OUT_DIR"
install -m 0755 qemu-system-x86_64 "$OUT.tmp"
smoke_test "$OUT.tmp"
mv -f "$OUT.tmp" "$OUT"
{
    echo "qemu source: $SRC_VER ($DSC)"
    echo "series hash: $HASH"
    printf 'patch: %s\n' "${PATCHES[@]}"
    echo "configure: ${CONFIGURE_FLAGS[*]}"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(( $(date +%s) - T0 )) s (compile $((T2 - T1)) s)"
} > "$OUT_DIR/BUILDINFO"
install_link
# keep only the tree of this build (about 1 GB each)
for old in "$SRC_ROOT"/hvext-*; do
    [ "$old" = "$TREE" ] || rm -rf "$old"
done
say "done: $("$OUT" --version | head -1), series $HASH, $(( $(date +%s) - T0 )) s"
