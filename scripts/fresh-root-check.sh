#!/usr/bin/env bash
# Prove the README's setup on a fresh Debian 12 root: build one with mmdebstrap (minbase, nothing of
# this host's tools), copy this checkout into it, run `scripts/setup.sh --test` there (apt installs
# included) and a smoke subset of the tests. Needs root, mmdebstrap and Debian's mirror; ~5-10 min.
#   bash scripts/fresh-root-check.sh [WORKDIR]      (WORKDIR default: a temp dir, removed afterwards)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
given="${1:-}"
work="${given:-$(mktemp -d /var/tmp/dirge-fresh-XXXXXX)}"
root="$work/root"
cleanup() {
    for m in dev/pts dev proc sys; do mountpoint -q "$root/$m" && umount -l "$root/$m"; done
    [ -z "$given" ] && [ "${KEEP:-0}" != 1 ] && rm -rf "$work"
    return 0
}
trap cleanup EXIT
mmdebstrap --quiet --variant=minbase bookworm "$root"
mkdir -p "$root/src"
git -C "$repo" archive HEAD | tar -x -C "$root/src"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# a site behind a TLS-intercepting proxy: pip inside needs the host's CA bundle (minbase has none)
# (and the site's own CAs, so a later update-ca-certificates in there keeps them)
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$root/etc/ssl/certs" && cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
fi
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
chroot "$root" /bin/bash -c '
    set -euo pipefail
    cd /src
    bash scripts/setup.sh --test
    # smoke: pure logic, a real registry, the demo (chroot run: no nested mounts of the host needed)
    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_reference.py tests/test_registry_fixtures.py \
        tests/test_customize_files.py tests/test_layering.py
    .venv/bin/dirge demo --no-boot --dir /var/tmp/dirge-demo
'
echo "fresh-root-check: setup.sh --test and the smoke subset passed on a fresh Debian 12 root"
