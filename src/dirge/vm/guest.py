"""The guest side of a boot: dirge's init, put into a session (never into the shared base).

A session that boots carries, under ``/.dirge/``:

    busybox   Debian's static busybox (the image may have no shell and no libc)
    setid     a generated static program that switches to the image's user and execs (``vm.setid``)
    init      the script below, run as PID 1 (``init=/.dirge/init``)
    config    shell assignments the host writes: hostname, working dir, environment, default command

The init mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm, /run and /tmp; sets the hostname;
runs the command (``-- ARGS`` on the kernel command line, each base64-encoded, else the config's
Entrypoint + Cmd) in the image's environment, working dir and user; prints one line

    DIRGE-EXIT <nonce> <status>

on the console and powers the VM off. For a read-only erofs root (an erofs disk session), the kernel's
root is the session's scratch disk, which holds ``/.dirge`` beside ``upper/`` and ``work/``; with
``dirge.lower=<disk serial>`` the init mounts the erofs base, stacks an overlay (upper on the scratch, or
on a tmpfs with ``dirge.upper=tmpfs``), pivots into it and runs again from there. So any VMM that boots
``root=<scratch> init=/.dirge/init`` with a kernel having the drivers built in runs it the same way.

The user is resolved here, on the host, against the image's own /etc/passwd and /etc/group (Docker's
rules: ``name``, ``uid``, ``uid:gid``, ``user:group``), and baked into ``setid``.
"""

from __future__ import annotations

import os
import shlex
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BootError
from ..session.customize import RootfsWriter
from .setid import setid_program

__all__ = ["BUSYBOX_CANDIDATES", "EXIT_MARKER", "GuestSpec", "Identity", "find_busybox", "guest_config",
           "install_guest", "resolve_user"]

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
EXIT_MARKER = "DIRGE-EXIT"
FAIL_MARKER = "DIRGE-BOOT-FAILED"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

GUEST_INIT = r"""#!/.dirge/busybox sh
# dirge guest init: PID 1 of a dirge session (see dirge/vm/guest.py). Uses only /.dirge/busybox.
B=/.dirge/busybox
for a in mount umount mkdir cat hostname chroot pivot_root base64 sleep sync poweroff reboot env sed ls; do
    eval "$a() { \$B $a \"\$@\"; }"
done
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}"; return;; esac; done; }
fail() { echo "DIRGE-BOOT-FAILED ${nonce:--} $*"; sync; poweroff -f; reboot -f; }
disk() {  # the block device whose virtio serial is $1 (waits for it to appear)
    for i in $($B seq 200); do
        for s in /sys/block/*/serial; do
            [ -e "$s" ] && [ "$(cat "$s")" = "$1" ] && { d=${s%/serial}; echo "/dev/${d##*/}"; return 0; }
        done
        sleep 0.05
    done
    return 1
}

mkdir -p /proc /dev /sys
mount -t proc proc /proc 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0<>/dev/console 1>&0 2>&0
nonce=$(arg dirge.nonce)
lower=$(arg dirge.lower)

if [ -n "$lower" ] && [ -z "$DIRGE_ASSEMBLED" ]; then
    # Running from the scratch disk: stack upper/ (or a tmpfs) over the erofs base and move into it.
    mount -o remount,rw / || fail "cannot write the scratch disk"
    mount -t sysfs sysfs /sys
    dev=$(disk "$lower") || fail "no disk with serial $lower"
    upper=/upper work=/work
    if [ "$(arg dirge.upper)" = tmpfs ]; then
        mkdir -p /.dirge/tmp && mount -t tmpfs -o mode=0755 tmpfs /.dirge/tmp || fail "cannot mount a tmpfs"
        mkdir -p /.dirge/tmp/upper /.dirge/tmp/work
        upper=/.dirge/tmp/upper work=/.dirge/tmp/work
    fi
    mkdir -p /.dirge/lower /.dirge/merged
    mount -t erofs -o ro "$dev" /.dirge/lower || fail "cannot mount the erofs base $dev"
    mount -t overlay overlay -o "lowerdir=/.dirge/lower,upperdir=$upper,workdir=$work" /.dirge/merged \
        || fail "cannot mount the overlay"
    mkdir -p /.dirge/merged/.dirge && mount --bind /.dirge /.dirge/merged/.dirge || fail "cannot bind /.dirge"
    # the lazy unmount of the old root below takes its /proc, /sys and /dev along
    cd /.dirge/merged && pivot_root . . && umount -l . || fail "cannot switch into the overlay"
    exec $B chroot . $B env DIRGE_ASSEMBLED=1 /.dirge/init "$@"
fi

mkdir -p /sys /dev/pts /dev/shm /run /tmp
mount -t sysfs sysfs /sys
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
mount -t tmpfs -o mode=0755,nosuid,nodev run /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmp /tmp
if [ -s /.dirge/capfiles ]; then  # 9p serves no security.* xattrs: capabilities come from copies (vm/share.py)
    mount -t tmpfs -o mode=0700,nodev caps /.dirge/caps || fail "cannot mount a tmpfs for file capabilities"
    while read -r n p; do
        p=$(echo "$p" | base64 -d) && $B cp -p "$p" "/.dirge/caps/$n" || fail "cannot copy $p"
    done < /.dirge/capfiles
    /.dirge/setcaps || fail "cannot set file capabilities"
    while read -r n p; do
        p=$(echo "$p" | base64 -d)
        mount --bind "/.dirge/caps/$n" "$p" && mount -o remount,bind,ro "$p" || fail "cannot give $p its capabilities"
    done < /.dirge/capfiles
fi

. /.dirge/config || fail "cannot read /.dirge/config"
name=$(arg dirge.hostname)
hostname "${name:-$DIRGE_HOSTNAME}"
if [ $# -gt 0 ]; then  # a command from the kernel command line: each word base64
    n=$#
    for a in "$@"; do set -- "$@" "$(echo "$a" | base64 -d)"; done
    shift $n
else
    eval "set -- $DIRGE_COMMAND"
fi
[ $# -gt 0 ] || fail "no command: the image has no Entrypoint or Cmd"
mkdir -p "$DIRGE_WORKDIR"
cd "$DIRGE_WORKDIR" || fail "cannot enter the working directory $DIRGE_WORKDIR"
dirge_run "$@"
status=$?
sync
echo "DIRGE-EXIT ${nonce:--} $status"
poweroff -f
reboot -f
"""


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def _entries(data: bytes | None) -> list[list[str]]:
    text = (data or b"").decode("utf-8", "replace")
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(user: str, passwd: bytes | None, group: bytes | None) -> Identity:
    """``User`` from an image config → ids, as Docker does (unknown numeric uid: gid 0, HOME /)."""
    spec = user or "0"
    name, _, grp = spec.partition(":")
    users = [e for e in _entries(passwd) if len(e) >= 7]
    groups = [e for e in _entries(group) if len(e) >= 3]
    entry = next((e for e in users if (e[2] == name if name.isdigit() else e[0] == name)), None)
    if entry is None and not name.isdigit():
        raise BootError(f"image user {user!r}: no user {name!r} in the image's /etc/passwd; "
                        "use a numeric uid or add the user to the image")
    uid = int(name) if name.isdigit() else int(entry[2])  # type: ignore[index]
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    if grp:
        if grp.isdigit():
            gid = int(grp)
        else:
            g = next((e for e in groups if e[0] == grp), None)
            if g is None or not g[2].isdigit():
                raise BootError(f"image user {user!r}: no group {grp!r} in the image's /etc/group")
            gid = int(g[2])
    extra: list[int] = [gid]
    if entry is not None:
        for g in groups:
            members = g[3].split(",") if len(g) > 3 else []
            if entry[0] in members and g[2].isdigit() and int(g[2]) not in extra:
                extra.append(int(g[2]))
    home = entry[5] if entry is not None and entry[5] else "/"
    return Identity(uid, gid, tuple(extra), home)


@dataclass
class GuestSpec:
    """What the guest runs: the image config's command, environment, working dir and user."""
    argv: list[str]
    env: list[str]
    workdir: str = "/"
    user: str = ""
    hostname: str = "dirge"
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, hostname: str = "dirge",
                    command: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> "GuestSpec":
        """Docker's rule: a given command replaces ``Cmd``; ``Entrypoint`` stays."""
        entrypoint = list(config.get("Entrypoint") or [])
        cmd = list(command) if command else list(config.get("Cmd") or [])
        return cls(argv=entrypoint + cmd, env=list(config.get("Env") or []),
                   workdir=config.get("WorkingDir") or "/", user=config.get("User") or "", hostname=hostname,
                   extra_env=dict(env or {}))


def guest_config(spec: GuestSpec, ident: Identity) -> str:
    """The ``/.dirge/config`` text: shell the init sources (every value single-quoted)."""
    env = {e.split("=", 1)[0]: e for e in spec.env if "=" in e}
    env.setdefault("PATH", f"PATH={DEFAULT_PATH}")
    env.setdefault("HOME", f"HOME={ident.home}")
    env.setdefault("HOSTNAME", f"HOSTNAME={spec.hostname}")
    env.update({k: f"{k}={v}" for k, v in spec.extra_env.items()})
    q = shlex.quote
    return (
        "# written by dirge for this session; sourced by /.dirge/init\n"
        f"DIRGE_HOSTNAME={q(spec.hostname)}\n"
        f"DIRGE_WORKDIR={q(spec.workdir)}\n"
        f"DIRGE_COMMAND={q(' '.join(q(a) for a in spec.argv))}  # shell words, for eval\n"
        f"dirge_run() {{ /.dirge/setid /.dirge/busybox env -i {' '.join(q(e) for e in env.values())} \"$@\"; }}\n"
    )


def find_busybox() -> Path:
    """The host's static busybox (it runs in images with no libc)."""
    for candidate in BUSYBOX_CANDIDATES:
        if os.path.exists(candidate) and _is_static(Path(candidate)):
            return Path(candidate)
    raise BootError("no static busybox found on this host (/bin/busybox); install it with: "
                    "apt-get install busybox-static")


def _is_static(path: Path) -> bool:
    """An ELF without a PT_INTERP program header needs no dynamic loader."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def install_guest(writer: RootfsWriter, spec: GuestSpec, *, user_source: RootfsWriter | None = None) -> Identity:
    """Write ``/.dirge/`` for ``spec`` through ``writer``; the user is looked up through ``user_source``
    (default: the same writer; an erofs session reads the image's passwd through its overlay view)."""
    source = user_source or writer
    ident = resolve_user(spec.user, source.read_file("/etc/passwd"), source.read_file("/etc/group"))
    busybox = find_busybox().read_bytes()
    writer.mkdir("/.dirge", 0o755, 0, 0)
    writer.write_file("/.dirge/busybox", busybox, 0o755, 0, 0)
    writer.write_file("/.dirge/setid", setid_program(ident.uid, ident.gid, ident.groups), 0o755, 0, 0)
    writer.write_file("/.dirge/init", GUEST_INIT.encode(), 0o755, 0, 0)
    writer.write_file("/.dirge/config", guest_config(spec, ident).encode(), 0o600, 0, 0)
    return ident
