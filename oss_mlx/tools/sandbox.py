"""Which sandbox confines the python tool's worker here, its limits, and how the worker starts.

The decision (docs/harmony.md §5.10, benchmarks/sandbox_compare.py): the operating system's own
sandbox around a plain CPython process, as the Codex CLI does for the commands it runs:
Seatbelt (`sandbox-exec`) on macOS, Landlock + seccomp on Linux. No Docker, no VM, no
download; the code can import the standard library and whatever is installed beside oss-mlx
(numpy included), and a session is one long-lived process, so its globals persist.
Where neither is available the tool is not offered, with the one-line reason `support()` gives:
code that cannot be sandboxed is never run.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from oss_mlx.tools import seatbelt

SANDBOX_EXEC = "/usr/bin/sandbox-exec"
WORKER = Path(__file__).with_name("worker.py")

# Linux: what a Python process reads besides its installation: the loader's cache, the time
# zone, MIME types (mimetypes opens the file when it exists), fonts, the CPU description
# (os.cpu_count, BLAS), its own /proc entry (resolved to the worker's pid when the worker
# opens it), random devices. Not /etc/passwd, not other processes' /proc entries.
LINUX_READ = (
    "/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin",
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
    "/etc/timezone", "/etc/mime.types", "/etc/os-release", "/etc/fonts",
    "/proc/self", "/proc/cpuinfo", "/proc/meminfo", "/sys/devices/system/cpu",
    "/dev/zero", "/dev/random", "/dev/urandom",
)


@dataclass
class Limits:
    """Bounds of one python session. wall_s, cpu_s: per call; session_cpu_s: the CPU time of
    the whole session (the hard limit a call's budget cannot be raised past); memory_mb: the
    worker's address space on Linux (RLIMIT_AS), its resident memory on macOS (watched by
    oss-mlx); file_mb: the largest file it may write; output_chars: what of a call's output
    goes back to the model (the rest is cut, with a note)."""

    wall_s: float = 120.0
    cpu_s: float = 120.0
    session_cpu_s: float = 3600.0
    memory_mb: int = 4096
    file_mb: int = 1024
    open_files: int = 256
    output_chars: int = 16_000

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Support:
    available: bool
    kind: str  # "seatbelt" | "landlock+seccomp" | ""
    reason: str  # a line for the user: what confines the code, or why the tool is off


def _load_jail():
    """oss_mlx/tools/jail_linux.py, loaded by path as the worker loads it (it is standalone)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_oss_mlx_jail", WORKER.with_name("jail_linux.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def support() -> Support:
    """Whether the python tool can run here, and with what."""
    if sys.platform == "darwin":
        if os.path.exists(SANDBOX_EXEC):
            return Support(True, "seatbelt", "python runs under macOS Seatbelt (sandbox-exec)")
        return Support(False, "", f"python tool off: {SANDBOX_EXEC} is missing on this Mac")
    if sys.platform.startswith("linux"):
        ok, why = _load_jail().support()
        if ok:
            return Support(True, "landlock+seccomp", f"python runs under {why}")
        return Support(False, "", f"python tool off: {why}")
    return Support(False, "", f"python tool off: no sandbox for {sys.platform} (macOS and Linux only)")


def _contains(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def python_roots() -> list[str]:
    """The Python installation the worker runs on, as real paths: its prefixes, the folder of
    its binary and the existing entries of sys.path (site-packages, an editable install's
    source). A root that would open the user's home (or everything) is left out."""
    home = os.path.realpath(os.path.expanduser("~"))
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  str(Path(os.path.realpath(sys.executable)).parent.parent), *sys.path]
    roots = []
    for p in candidates:
        if not p or not os.path.exists(p):
            continue
        real = os.path.realpath(p)
        if real == "/" or _contains(real, home):
            continue
        roots.append(real)
    return list(dict.fromkeys(roots))


def worker_command(workdir: str, limits: Limits, ready: str) -> tuple[list[str], dict]:
    """argv and environment of a worker for `workdir` (a real path)."""
    python = os.path.realpath(sys.executable)
    config = {
        "read": [*python_roots(), *LINUX_READ],
        "write": [workdir, os.devnull],
        "cpu_s": limits.cpu_s,
        "session_cpu_s": limits.session_cpu_s,
        "memory_bytes": limits.memory_mb << 20,
        "file_bytes": limits.file_mb << 20,
        "open_files": limits.open_files,
        "ready": ready,
    }
    import json

    # -I: no user site-packages, no PYTHON* variables, no current folder on sys.path.
    argv = [python, "-I", "-B", "-X", "utf8", str(WORKER), json.dumps(config)]
    if sys.platform == "darwin":
        prof = seatbelt.profile(python_roots(), workdir, python)
        argv = [SANDBOX_EXEC, "-p", prof, *argv]
    # A clean environment: none of oss-mlx's variables (keys, tokens) reach the code; HOME and
    # TMPDIR point into the working folder, so caches and temporary files land there.
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": os.path.join(workdir, ".tmp"),
        "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg",
    }
    return argv, env


def make_workdir(base: str | None = None) -> str:
    """A new private working folder (mode 700) for one conversation, as a real path."""
    import tempfile

    path = os.path.realpath(tempfile.mkdtemp(prefix="oss-mlx-python-", dir=base))
    os.mkdir(os.path.join(path, ".tmp"), 0o700)
    return path


def remove_workdir(path: str):
    shutil.rmtree(path, ignore_errors=True)
