"""A static x86-64 program with no libc, for images that hold nothing else: it prints its working
directory, its environment and (given PATH NAME) one xattr as text, or in hex given PATH NAME x (for
binary values: ``security.capability``, ACLs), so a booted guest can be judged from its console. Built with binutils (``as``, ``ld``) from the source below."""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCE = r"""
    .globl _start
    .text
_start:
    mov     %rsp, %r12                  # r12 = &argc
    lea     s_cwd(%rip), %rsi
    call    put
    lea     buf(%rip), %rdi
    mov     $4096, %esi
    mov     $79, %eax                   # getcwd
    syscall
    lea     buf(%rip), %rsi
    call    put
    call    nl
    mov     (%r12), %rbx                # argc
    lea     16(%r12,%rbx,8), %r13       # envp
1:  cmpq    $0, (%r13)
    je      2f
    lea     s_env(%rip), %rsi
    call    put
    mov     (%r13), %rsi
    call    put
    call    nl
    add     $8, %r13
    jmp     1b
2:  cmp     $3, %rbx                    # probe PATH NAME: print that xattr
    jl      3f
    mov     16(%r12), %rdi
    mov     24(%r12), %rsi
    lea     buf(%rip), %rdx
    mov     $4095, %r10d
    mov     $192, %eax                  # lgetxattr
    syscall
    test    %rax, %rax
    js      4f
    cmp     $4, %rbx                    # probe PATH NAME x: in hex
    jge     7f
    lea     buf(%rip), %rcx
    movb    $0, (%rcx,%rax)
    lea     s_xattr(%rip), %rsi
    call    put
    lea     buf(%rip), %rsi
    call    put
    call    nl
3:  xor     %edi, %edi
    mov     $60, %eax
    syscall
4:  lea     s_noxattr(%rip), %rsi
    call    put
    call    nl
    mov     $1, %edi
    mov     $60, %eax
    syscall
7:  mov     %rax, %r14                  # r14 = length, r15 = index
    lea     s_xattr(%rip), %rsi
    call    put
    xor     %r15d, %r15d
8:  cmp     %r14, %r15
    jge     9f
    lea     buf(%rip), %rcx
    movzbl  (%rcx,%r15), %eax
    mov     %eax, %edx
    shr     $4, %eax
    and     $15, %edx
    lea     s_hex(%rip), %rcx
    movzbl  (%rcx,%rax), %eax
    movzbl  (%rcx,%rdx), %edx
    lea     hexout(%rip), %rsi
    movb    %al, (%rsi)
    movb    %dl, 1(%rsi)
    call    put
    inc     %r15
    jmp     8b
9:  call    nl
    jmp     3b
nl: lea     s_nl(%rip), %rsi
put:                                    # write(1, rsi, strlen(rsi))
    xor     %edx, %edx
5:  cmpb    $0, (%rsi,%rdx)
    je      6f
    inc     %rdx
    jmp     5b
6:  mov     $1, %eax
    mov     $1, %edi
    syscall
    ret
    .data
s_cwd:      .asciz "cwd="
s_env:      .asciz "env="
s_xattr:    .asciz "xattr="
s_noxattr:  .asciz "xattr: none"
s_nl:       .asciz "\n"
s_hex:      .ascii "0123456789abcdef"
hexout:     .asciz "00"
    .bss
buf:        .space 4096
"""


def build_probe(workdir: Path) -> bytes:
    """The probe's ELF bytes (needs ``as`` and ``ld``)."""
    src, obj, exe = workdir / "probe.s", workdir / "probe.o", workdir / "probe"
    src.write_text(SOURCE)
    subprocess.run(["as", "-o", str(obj), str(src)], check=True, capture_output=True)
    subprocess.run(["ld", "-static", "-o", str(exe), str(obj)], check=True, capture_output=True)
    return exe.read_bytes()
