"""The Linux jail of the python tool's worker: Landlock + seccomp + no capabilities.

The worker (oss_mlx/tools/worker.py) calls `enter(config)` on itself before it runs any of the
model's code; every step is irreversible for the process and inherited by anything it could
start. This is the pair the Codex CLI uses to sandbox the commands it runs on Linux, and it
needs no privileges, no user namespaces and no helper binary (docs/harmony.md §5.10):

  * Landlock (kernel 5.13+): files. Read/execute under the read-only roots (the Python
    installation, the system's libraries), everything under the working folder, nothing else:
    the user's home, other folders, other processes' /proc entries are refused (EACCES).
    On ABI 4+ TCP bind/connect are refused too; on ABI 6+ signals to processes outside the
    sandbox and abstract unix sockets.
  * seccomp: syscalls. No sockets (socket/connect/bind/...), no new processes (fork, vfork,
    clone without CLONE_THREAD; clone3 answers ENOSYS so libc falls back to clone for threads),
    no exec, no ptrace, no signals or rlimit changes aimed at another process, no chmod/chown/
    xattr by path (Landlock does not cover them), no mount/namespaces/modules/io_uring/bpf.
    Refusals answer EPERM: the code sees PermissionError.
  * capabilities: all dropped (the worker may run as root, e.g. in a container or CI).

This module is loaded by the worker by file path and imports nothing from oss_mlx.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# ---- Landlock (include/uapi/linux/landlock.h) -----------------------------------------------

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # all architectures
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FILE_ONLY = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1

READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


class JailError(Exception):
    """The jail could not be set up: the worker refuses to run code."""


def _syscall(nr: int, *args) -> int:
    res = _libc.syscall(ctypes.c_long(nr), *args)
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return res


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    try:
        return _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except OSError:
        return 0


def _fs_rights(abi: int) -> int:
    rights = _FS_ABI1
    if abi >= 2:
        rights |= _FS_REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def _ruleset(abi: int) -> int:
    """A ruleset that handles every right this ABI knows (what it does not allow is refused)."""
    fields = [_fs_rights(abi)]
    if abi >= 4:
        fields.append(_NET_BIND_TCP | _NET_CONNECT_TCP)  # no rule allows any port
    if abi >= 6:
        fields.append(_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL)
    attr = struct.pack(f"={len(fields)}Q", *fields)
    buf = ctypes.create_string_buffer(attr, len(attr))
    return _syscall(_SYS_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))


def _allow(ruleset_fd: int, path: str, rights: int, abi: int):
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a root that does not exist on this machine
    try:
        if not os.path.isdir(path):
            rights &= _FILE_ONLY
        rights &= _fs_rights(abi)
        attr = struct.pack("=Qi", rights, fd)  # landlock_path_beneath_attr is packed
        buf = ctypes.create_string_buffer(attr, len(attr))
        _syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset_fd), ctypes.c_int(_RULE_PATH_BENEATH), buf,
                 ctypes.c_uint32(0))
    finally:
        os.close(fd)


def landlock(read_roots, write_roots, abi: int):
    rs = _ruleset(abi)
    try:
        for p in read_roots:
            _allow(rs, p, READ, abi)
        for p in write_roots:
            _allow(rs, p, _fs_rights(abi), abi)
        _syscall(_SYS_RESTRICT_SELF, ctypes.c_int(rs), ctypes.c_uint32(0))
    finally:
        os.close(rs)


# ---- seccomp (include/uapi/linux/seccomp.h, filter.h) ---------------------------------------

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# Syscall numbers, from the kernel's asm/unistd_64.h (x86_64) and asm-generic/unistd.h (arm64).
_NR = {
    "x86_64": dict(
        socket=41, connect=42, accept=43, sendto=44, sendmsg=46, bind=49, listen=50, clone=56,
        fork=57, vfork=58, execve=59, kill=62, chmod=90, chown=92, fchown=93, lchown=94,
        ptrace=101, syslog=103, utime=132, mknod=133, uselib=134, personality=135,
        setpriority=141, sched_setparam=142, sched_setscheduler=144, pivot_root=155,
        adjtimex=159, setrlimit=160, chroot=161, acct=163, settimeofday=164, mount=165,
        umount2=166, swapon=167, swapoff=168, reboot=169, sethostname=170, setdomainname=171,
        iopl=172, ioperm=173, init_module=175, delete_module=176, quotactl=179, nfsservctl=180,
        setxattr=188, lsetxattr=189, fsetxattr=190, removexattr=197, lremovexattr=198,
        fremovexattr=199, tkill=200, sched_setaffinity=203, lookup_dcookie=212,
        clock_settime=227, tgkill=234, utimes=235, kexec_load=246, add_key=248,
        request_key=249, keyctl=250, ioprio_set=251, migrate_pages=256, mknodat=259,
        fchownat=260, futimesat=261, fchmodat=268, unshare=272, move_pages=279, accept4=288,
        perf_event_open=298, prlimit64=302, name_to_handle_at=303, open_by_handle_at=304,
        clock_adjtime=305, sendmmsg=307, setns=308, process_vm_readv=310,
        process_vm_writev=311, kcmp=312, finit_module=313, sched_setattr=314,
        kexec_file_load=320, bpf=321, execveat=322, userfaultfd=323, pidfd_send_signal=424,
        io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428,
        move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, pidfd_open=434,
        clone3=435, pidfd_getfd=438, process_madvise=440, mount_setattr=442, fchmodat2=452,
    ),
    "aarch64": dict(
        setxattr=5, lsetxattr=6, fsetxattr=7, removexattr=14, lremovexattr=15,
        fremovexattr=16, lookup_dcookie=18, ioprio_set=30, mknodat=33, umount2=39, mount=40,
        pivot_root=41, nfsservctl=42, chroot=51, fchmodat=53, fchownat=54, fchown=55,
        acct=89, personality=92, unshare=97, kexec_load=104, init_module=105,
        delete_module=106, clock_settime=112, syslog=116, ptrace=117, sched_setparam=118,
        sched_setscheduler=119, sched_setaffinity=122, kill=129, tkill=130, tgkill=131,
        reboot=142, setpriority=140, sethostname=161, setdomainname=162, setrlimit=164,
        settimeofday=170, adjtimex=171, socket=198, bind=200, listen=201, accept=202,
        connect=203, sendto=206, sendmsg=211, add_key=217, request_key=218, keyctl=219,
        clone=220, execve=221, swapon=224, swapoff=225, migrate_pages=238, move_pages=239,
        perf_event_open=241, accept4=242, prlimit64=261, name_to_handle_at=264,
        open_by_handle_at=265, clock_adjtime=266, setns=268, sendmmsg=269,
        process_vm_readv=270, process_vm_writev=271, kcmp=272, finit_module=273,
        sched_setattr=274, bpf=280, execveat=281, userfaultfd=282, kexec_file_load=294,
        pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
        open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        pidfd_open=434, clone3=435, pidfd_getfd=438, process_madvise=440, mount_setattr=442,
        fchmodat2=452,
    ),
}

# Refused outright (EPERM), where the architecture has them.
_DENY = """socket connect bind listen accept accept4 sendmsg sendmmsg fork vfork execve execveat
ptrace process_vm_readv process_vm_writev kcmp pidfd_open pidfd_send_signal pidfd_getfd tkill
mount umount2 pivot_root chroot unshare setns open_tree move_mount fsopen fsconfig fsmount
fspick mount_setattr bpf perf_event_open keyctl add_key request_key kexec_load kexec_file_load
init_module finit_module delete_module reboot swapon swapoff io_uring_setup io_uring_enter
io_uring_register open_by_handle_at name_to_handle_at userfaultfd chmod fchmodat fchmodat2
chown fchown lchown fchownat setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr
settimeofday clock_settime clock_adjtime adjtimex sethostname setdomainname syslog acct iopl
ioperm quotactl mknod mknodat uselib nfsservctl lookup_dcookie personality setpriority
ioprio_set sched_setscheduler sched_setparam sched_setattr migrate_pages move_pages
process_madvise""".split()
# Allowed only when their first argument names this process (0 or our pid; kill also -pid).
_SELF_ONLY = ("kill", "tgkill", "prlimit64", "sched_setaffinity")

_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
_RET_ALLOW, _RET_KILL = 0x7FFF0000, 0x80000000
_OFF_NR, _OFF_ARCH, _OFF_ARGS = 0, 4, 16
_CLONE_THREAD = 0x00010000


def _errno(e: int) -> int:
    return 0x00050000 | e


def _ins(code, k, jt=0, jf=0):
    return (code, jt, jf, k & 0xFFFFFFFF)


def _arg_lo(i: int) -> int:
    return _OFF_ARGS + 8 * i  # little-endian: the low 32 bits first


def seccomp_program(arch: str, pid: int) -> list[tuple]:
    """The filter as (code, jt, jf, k) instructions. Every block ends in a return, so no block
    needs the syscall number reloaded after it looked at an argument."""
    nr = _NR[arch]
    prog = [
        _ins(_LD_W_ABS, _OFF_ARCH),
        _ins(_JEQ_K, _AUDIT_ARCH[arch], jt=1),
        _ins(_RET_K, _RET_KILL),  # a syscall of another ABI: never expected
        _ins(_LD_W_ABS, _OFF_NR),
    ]
    if arch == "x86_64":  # the x32 ABI (bit 30 set) reuses numbers with other meanings
        prog += [_ins(0x35, 0x40000000, jf=1), _ins(_RET_K, _errno(errno.ENOSYS))]  # JGE
    for name in _DENY:
        if name in nr:
            prog += [_ins(_JEQ_K, nr[name], jf=1), _ins(_RET_K, _errno(errno.EPERM))]
    # clone3's flags live in a struct the filter cannot read: ENOSYS makes libc use clone.
    prog += [_ins(_JEQ_K, nr["clone3"], jf=1), _ins(_RET_K, _errno(errno.ENOSYS))]
    # clone: threads only.
    prog += [
        _ins(_JEQ_K, nr["clone"], jf=4),
        _ins(_LD_W_ABS, _arg_lo(0)),
        _ins(_JSET_K, _CLONE_THREAD, jf=1),
        _ins(_RET_K, _RET_ALLOW),
        _ins(_RET_K, _errno(errno.EPERM)),
    ]
    # sendto with an address (a datagram to some unix socket path): refused; send() is fine.
    prog += [
        _ins(_JEQ_K, nr["sendto"], jf=6),
        _ins(_LD_W_ABS, _arg_lo(4)),
        _ins(_JEQ_K, 0, jf=2),
        _ins(_LD_W_ABS, _arg_lo(4) + 4),
        _ins(_JEQ_K, 0, jt=1),
        _ins(_RET_K, _errno(errno.EPERM)),
        _ins(_RET_K, _RET_ALLOW),
    ]
    for name in _SELF_ONLY:
        prog += [
            _ins(_JEQ_K, nr[name], jf=6),
            _ins(_LD_W_ABS, _arg_lo(0)),
            _ins(_JEQ_K, pid, jt=3),
            _ins(_JEQ_K, 0, jt=2),
            _ins(_JEQ_K, -pid if name == "kill" else pid, jt=1),
            _ins(_RET_K, _errno(errno.EPERM)),
            _ins(_RET_K, _RET_ALLOW),
        ]
    prog.append(_ins(_RET_K, _RET_ALLOW))
    return prog


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


def _prctl(option: int, arg2=0, arg3=0, arg4=0, arg5=0):
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                            ctypes.c_ulong]
    if _libc.prctl(option, arg2, arg3, arg4, arg5) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def seccomp(arch: str, pid: int):
    prog = seccomp_program(arch, pid)
    if len(prog) > 255 * 4:
        raise JailError("seccomp program too long")
    arr = (_SockFilter * len(prog))(*[_SockFilter(*i) for i in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(arr, ctypes.POINTER(_SockFilter)))
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                            ctypes.c_ulong]
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# ---- capabilities ---------------------------------------------------------------------------

_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_CAP_V3 = 0x20080522


def drop_capabilities():
    """Empty the bounding, ambient, effective, permitted and inheritable sets (a root worker
    keeps uid 0 but none of root's powers: no CAP_DAC_OVERRIDE, no CAP_SYS_ADMIN...)."""
    for cap in range(64):
        try:
            _prctl(_PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno == errno.EINVAL:  # past the last capability this kernel knows
                break
            if e.errno != errno.EPERM:  # EPERM: not ours to drop (not root): nothing to do
                raise
    try:
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass
    header = struct.pack("=Ii", _CAP_V3, 0)
    data = bytes(24)  # two __user_cap_data_struct {effective, permitted, inheritable}, all 0
    _syscall(126 if platform.machine() == "x86_64" else 91,  # capset
             ctypes.create_string_buffer(header, len(header)),
             ctypes.create_string_buffer(data, len(data)))


# ---- the whole jail -------------------------------------------------------------------------


def support() -> tuple[bool, str]:
    """(available, reason): whether this kernel can jail the worker."""
    arch = platform.machine()
    if arch not in _NR:
        return False, f"no seccomp filter for {arch} (x86_64 and aarch64 only)"
    abi = landlock_abi()
    if abi < 1:
        return False, ("this Linux kernel has no Landlock (needs Linux 5.13+ with landlock in "
                       "its lsm= list)")
    return True, f"Landlock ABI {abi} + seccomp"


def enter(read_roots, write_roots):
    """Jail this process for good; raises JailError when any step fails."""
    ok, reason = support()
    if not ok:
        raise JailError(reason)
    try:
        drop_capabilities()
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        landlock(read_roots, write_roots, landlock_abi())
        seccomp(platform.machine(), os.getpid())
    except OSError as e:
        raise JailError(f"cannot set up the Linux sandbox: {e}") from None
