"""A tiny static x86-64 program, generated here, that drops to a uid/gid/groups and execs its arguments.

Why generate it: the guest must switch users in images with no shell, no libc and no ``setpriv``, and
Debian's static busybox has no applet that takes a numeric uid. The identity is resolved on the host
(against the image's own passwd/group) and baked into the code as constants, so the program parses
nothing. It is ~200 bytes and does, in order:

    setgroups(n, groups); setresgid(g, g, g); setresuid(u, u, u); execve(argv[1], argv + 1, envp)

and on any failure writes one line to stderr and exits 126 (nothing half-switched ever runs).
"""

from __future__ import annotations

import struct

__all__ = ["setid_program", "SETID_FAILED"]

SETID_FAILED = 126
_BASE = 0x400000
_HEADERS = 64 + 56  # ELF header + one program header


def _mov32(reg: int, value: int) -> bytes:
    """``mov r32, imm32`` (zero-extends into the 64-bit register): B8+reg."""
    return bytes([0xB8 + reg]) + struct.pack("<I", value & 0xFFFFFFFF)


_EAX, _EDX, _ESI, _EDI = 0, 2, 6, 7
_SYSCALL = b"\x0f\x05"
_TEST_RAX = b"\x48\x85\xc0"


def setid_program(uid: int, gid: int, groups: tuple[int, ...] = ()) -> bytes:
    """The ELF executable for this identity (``groups``: supplementary gids; may be empty)."""
    for n in (uid, gid, *groups):
        if not 0 <= n < 2**32 - 1:
            raise ValueError(f"id {n} out of range")
    message = b"dirge: cannot switch user or execute the command\n"
    # Code is assembled with placeholders for the two rip-relative addresses, patched below.
    code = bytearray()
    code += b"\x48\x83\x3c\x24\x02"            # cmp qword [rsp], 2
    code += b"\x0f\x8c" + b"\0\0\0\0"          # jl fail (rel32, patched)
    jl_at = len(code) - 4
    code += _mov32(_EAX, 116) + _mov32(_EDI, len(groups))
    code += b"\x48\x8d\x35" + b"\0\0\0\0"      # lea rsi, [rip + groups]
    lea_groups_at = len(code) - 4
    code += _SYSCALL + _TEST_RAX
    fail_jumps = []
    code += b"\x0f\x88" + b"\0\0\0\0"          # js fail
    fail_jumps.append(len(code) - 4)
    for number, value in ((119, gid), (117, uid)):  # setresgid, then setresuid
        code += _mov32(_EAX, number) + _mov32(_EDI, value) + _mov32(_ESI, value) + _mov32(_EDX, value)
        code += _SYSCALL + _TEST_RAX
        code += b"\x0f\x88" + b"\0\0\0\0"
        fail_jumps.append(len(code) - 4)
    code += b"\x48\x8b\x1c\x24"                # mov rbx, [rsp]          (argc)
    code += b"\x48\x8d\x74\x24\x10"            # lea rsi, [rsp + 16]     (&argv[1])
    code += b"\x48\x8b\x7c\x24\x10"            # mov rdi, [rsp + 16]     (argv[1])
    code += b"\x48\x8d\x54\xdc\x10"            # lea rdx, [rsp + rbx*8 + 16]  (envp)
    code += _mov32(_EAX, 59) + _SYSCALL        # execve; returns only on failure
    fail = len(code)
    code += _mov32(_EAX, 1) + _mov32(_EDI, 2)  # write(2, message, len)
    code += b"\x48\x8d\x35" + b"\0\0\0\0"      # lea rsi, [rip + message]
    lea_message_at = len(code) - 4
    code += _mov32(_EDX, len(message)) + _SYSCALL
    code += _mov32(_EAX, 60) + _mov32(_EDI, SETID_FAILED) + _SYSCALL  # exit
    groups_at = len(code)
    code += struct.pack(f"<{len(groups)}I", *groups)
    message_at = len(code)
    code += message

    def patch(at: int, target: int) -> None:
        code[at:at + 4] = struct.pack("<i", target - (at + 4))

    patch(jl_at, fail)
    for at in fail_jumps:
        patch(at, fail)
    patch(lea_groups_at, groups_at)
    patch(lea_message_at, message_at)

    return elf_executable(bytes(code))


def elf_executable(code: bytes) -> bytes:
    """A static ELF whose one R+X segment is ``code`` (position-independent: rip-relative data)."""
    size = _HEADERS + len(code)
    entry = _BASE + _HEADERS
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD, R+X
    return header + phdr + code
