#!/usr/bin/env bash
# One setup for the README's quick start and for CI: system tools, then a venv with dirge.
#   bash scripts/setup.sh          runtime (+ the tools the demo uses)
#   bash scripts/setup.sh --test   also the reference tools and Python test extras
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_pkgs=(python3 python3-venv busybox-static qemu-system-x86 linux-image-amd64 fuse-overlayfs fuse3)
[ "$want_test" = 1 ] && apt_pkgs+=(umoci skopeo attr util-linux tar xfsprogs btrfs-progs docker-registry openssl apache2-utils curl acl qemu-utils
                              buildah mmdebstrap arch-test libdpkg-perl gpg erofs-utils binutils libarchive-tools
                              crun fakeroot uidmap libpython3.11-testsuite cpio pax zstd)
# --no-install-recommends below, so the recommends the tools need are named: buildah's OCI runtime
# (crun; the tests use --isolation chroot, users' builds may not), mmdebstrap's fakeroot and uidmap.

missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
extra=""
[ "$want_test" = 1 ] && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
