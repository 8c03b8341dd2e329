"""The seccomp filter of the environment sandbox: a small classic-BPF program that bubblewrap loads
(`--seccomp FD`) right before it runs the sandbox worker.

It refuses (EPERM) the system calls a package never needs and an escape would: another process's memory and
namespaces (ptrace, process_vm_*, setns, unshare, clone with a namespace flag, kcmp, pidfd_getfd), mounting
(mount, the new mount API, pivot_root, chroot), the kernel's keyrings, BPF, perf, userfaultfd, io_uring
(whose operations bypass seccomp), modules, kexec, swap, reboot, clocks, syslog, handles to files by inode
(open_by_handle_at) and terminal injection (ioctl TIOCSTI / TIOCLINUX). clone3 answers ENOSYS, so the C
library falls back to clone, whose flags the filter can read. A call from another ABI (32-bit int 0x80, x32)
kills the process. Built here, with no libseccomp: x86_64 and aarch64.
"""

from __future__ import annotations

import errno
import platform
import struct

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
_NR, _ARCH, _ARG0_LO, _ARG1_LO = 0, 4, 16, 24

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

RET_KILL_PROCESS = 0x80000000
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000

# Every namespace flag of clone(2): CLONE_NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
CLONE_NAMESPACES = (
    0x80 | 0x20000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
)
TIOCSTI, TIOCLINUX = 0x5412, 0x541C

# name, x86_64 number, aarch64 number (from the kernel's unistd_64.h and asm-generic/unistd.h); "-": none.
_TABLE = """
ptrace 101 117
process_vm_readv 310 270
process_vm_writev 311 271
setns 308 268
unshare 272 97
kcmp 312 272
pidfd_getfd 438 438
process_madvise 440 440
migrate_pages 256 238
move_pages 279 239
mount 165 40
umount2 166 39
pivot_root 155 41
chroot 161 51
fsopen 430 430
fsconfig 431 431
fsmount 432 432
fspick 433 433
move_mount 429 429
open_tree 428 428
mount_setattr 442 442
keyctl 250 219
add_key 248 217
request_key 249 218
bpf 321 280
perf_event_open 298 241
userfaultfd 323 282
io_uring_setup 425 425
io_uring_enter 426 426
io_uring_register 427 427
kexec_load 246 104
kexec_file_load 320 294
init_module 175 105
finit_module 313 273
delete_module 176 106
open_by_handle_at 304 265
name_to_handle_at 303 264
swapon 167 224
swapoff 168 225
reboot 169 142
acct 163 89
quotactl 179 60
quotactl_fd 443 443
settimeofday 164 170
clock_settime 227 112
clock_adjtime 305 266
adjtimex 159 171
syslog 103 116
lookup_dcookie 212 18
vhangup 153 58
fanotify_init 300 262
iopl 172 -
ioperm 173 -
uselib 134 -
_sysctl 156 -
"""
_SPECIAL = {"clone": (56, 220), "clone3": (435, 435), "ioctl": (16, 29)}
_ARCHES = ("x86_64", "aarch64")
_DENIED = [line.split()[0] for line in _TABLE.split("\n") if line]
SYSCALLS: dict[str, dict[str, int]] = {
    arch: {
        **{f[0]: int(f[1 + i]) for line in _TABLE.split("\n") if line and (f := line.split())[1 + i] != "-"},
        **{name: nrs[i] for name, nrs in _SPECIAL.items()},
    }
    for i, arch in enumerate(_ARCHES)
}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000


class SeccompUnsupported(RuntimeError):
    """No filter is built for this machine's architecture."""


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def denied_syscalls(arch: str | None = None) -> list[str]:
    arch = arch or platform.machine()
    return [name for name in _DENIED if name in SYSCALLS.get(arch, {})]


def program(arch: str | None = None) -> bytes:
    """The filter for `arch` (this machine's by default), as the bytes of an array of `struct sock_filter`."""
    arch = arch or platform.machine()
    if arch not in SYSCALLS:
        raise SeccompUnsupported(f"no seccomp filter for the {arch} architecture")
    nr = SYSCALLS[arch]
    eperm = RET_ERRNO | errno.EPERM
    out = [
        _ins(_LD_W_ABS, _ARCH),
        _ins(_JEQ_K, AUDIT_ARCH[arch], 1, 0),
        _ins(_RET_K, RET_KILL_PROCESS),  # another ABI on this kernel (32-bit int 0x80): never
        _ins(_LD_W_ABS, _NR),
    ]
    if arch == "x86_64":
        out += [_ins(_JGE_K, X32_SYSCALL_BIT, 0, 1), _ins(_RET_K, RET_KILL_PROCESS)]  # the x32 ABI
    for name in denied_syscalls(arch):
        out += [_ins(_JEQ_K, nr[name], 0, 1), _ins(_RET_K, eperm)]
    out += [_ins(_JEQ_K, nr["clone3"], 0, 1), _ins(_RET_K, RET_ERRNO | errno.ENOSYS)]
    # clone(flags, ...): refused with any namespace flag (flags are its first argument on both ABIs).
    out += [
        _ins(_JEQ_K, nr["clone"], 0, 4),
        _ins(_LD_W_ABS, _ARG0_LO),
        _ins(_JSET_K, CLONE_NAMESPACES, 0, 1),
        _ins(_RET_K, eperm),
        _ins(_RET_K, RET_ALLOW),
    ]
    # ioctl(fd, request, ...): no typing into a terminal (TIOCSTI) or console tricks (TIOCLINUX).
    out += [
        _ins(_JEQ_K, nr["ioctl"], 0, 6),
        _ins(_LD_W_ABS, _ARG1_LO),
        _ins(_JEQ_K, TIOCSTI, 0, 1),
        _ins(_RET_K, eperm),
        _ins(_JEQ_K, TIOCLINUX, 0, 1),
        _ins(_RET_K, eperm),
        _ins(_RET_K, RET_ALLOW),
    ]
    out.append(_ins(_RET_K, RET_ALLOW))
    return b"".join(out)
