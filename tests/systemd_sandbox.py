"""Run a command under the seccomp filters deploy/finopsd.service asks systemd for.

``python tests/systemd_sandbox.py [--allow GROUP...] [--deny GROUP...] -- COMMAND...``
installs, as systemd 252 builds them from the unit (and then execs COMMAND):

- ``MemoryDenyWriteExecute=yes``: ``mmap`` of memory both writable and executable,
  ``mprotect``/``pkey_mprotect`` adding execute, ``shmat`` with ``SHM_EXEC`` fail
  with EPERM;
- ``RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX``: ``socket()`` of any other
  family fails with EAFNOSUPPORT;
- with ``--allow`` (``SystemCallFilter=@system-service``) and ``--deny``
  (``SystemCallFilter=~@privileged @resources``): an allow list, every other call
  failing with EPERM (``SystemCallErrorNumber=EPERM``). The groups are expanded
  with ``systemd-analyze syscall-filter``, so this needs systemd-analyze.

It needs libseccomp (``libseccomp.so.2``, which systemd itself links). The mount
namespace settings (ProtectSystem=, PrivateTmp=, ProcSubset=, ...) are not
reproduced here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys

ALLOW = 0x7FFF0000
CMP_EQ = 4
CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
KEPT_FAMILIES = {1, 2, 10}  # AF_UNIX, AF_INET, AF_INET6
AF_MAX = 46


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    return lib


def syscall_group(name: str) -> set[str]:
    """The system calls of a systemd group such as ``@system-service``, nested groups included."""
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= syscall_group(item) if item.startswith("@") else {item}
    return calls


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str, *cmps: ArgCmp) -> None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:  # not a system call of this architecture
        return
    array = (ArgCmp * max(1, len(cmps)))(*cmps)
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
    if rc < 0:
        raise OSError(-rc, f"seccomp rule for {name}")


def install(allow: list[str], deny: list[str]) -> None:
    lib = _lib()
    eperm = errno_action(errno.EPERM)
    filters = []
    b = lib.seccomp_init(ALLOW)
    _rule(
        lib,
        b,
        eperm,
        "mmap",
        ArgCmp(2, CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC),
    )
    for name in ("mprotect", "pkey_mprotect"):
        _rule(lib, b, eperm, name, ArgCmp(2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
    _rule(lib, b, eperm, "shmat", ArgCmp(2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
    for family in range(AF_MAX):
        if family not in KEPT_FAMILIES:
            _rule(lib, b, errno_action(errno.EAFNOSUPPORT), "socket", ArgCmp(0, CMP_EQ, family, 0))
    filters.append(b)
    if allow:
        allowed = set().union(*map(syscall_group, allow))
        allowed -= set().union(set(), *map(syscall_group, deny))
        a = lib.seccomp_init(eperm)
        for name in sorted(allowed):
            _rule(lib, a, ALLOW, name)
        filters.append(a)  # last: the allow list does not hold seccomp() itself
    for ctx in filters:
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, "seccomp_load")


def main(argv: list[str]) -> None:
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    allow: list[str] = []
    deny: list[str] = []
    target = allow
    for item in options:
        if item in ("--allow", "--deny"):
            target = allow if item == "--allow" else deny
        else:
            target.append(item)
    install(allow, deny)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
