"""Writing files and folders all or nothing: the one way oss-mlx writes to disk.

`atomic_write` (a file) and `AtomicFolder` (a folder: convert's and synth's outputs) write beside
the target under a name of this process and rename at the end, so a half-written output never
appears under the final name, whatever ends the process (Ctrl-C, SIGTERM, a full disk).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from oss_mlx.errors import OssMlxError


def disk_check(folder: Path, need: int) -> None:
    """Fail before writing anything rather than with a full disk halfway through."""
    import shutil

    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise OssMlxError(f"not enough disk space in {probe}: need {need / 1e9:.1f} GB, "
                          f"{free / 1e9:.1f} GB free")


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp"):
    """A temporary path beside `path` (named by this process, so concurrent writers never share
    one) for the caller to write; renamed over `path` when the block succeeds, removed
    otherwise. `suffix`: what the temporary name ends with (a writer may insist on an
    extension, as MLX's safetensors writer does)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write a file all or nothing (atomic_path), flushed to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the `.NAME.partial-PID` / `.NAME.old-PID` folders that AtomicFolder left beside
    its outputs in `folder` when its process died (killed hard, power loss); returns them."""
    import re
    import shutil

    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = re.fullmatch(r"\.(.+)\.(partial|old)-(\d+)", p.name)
        if not m or not p.is_dir() or int(m.group(3)) == os.getpid() or _alive(int(m.group(3))):
            continue
        name = folder / m.group(1)
        if m.group(2) == "old" and not name.exists():
            os.rename(p, name)  # died between its two renames: the old output is the only copy
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


class AtomicFolder:
    """Write into a temporary folder beside `out`; rename it to `out` only on success.

    On any failure (or Ctrl-C, or SIGTERM) the temporary folder is removed, so a half-written
    output never appears under the final name. With `replace`, an existing `out` is swapped out
    at the end. Entering also removes the temporary folders of dead processes
    (remove_stale_partials).
    """

    def __init__(self, out: Path, replace: bool = False):
        self.out = out
        self.replace = replace
        self.tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        self._sigterm = None

    def __enter__(self) -> Path:
        import shutil

        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.out.parent)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self._trap_sigterm()
        return self.tmp

    def _trap_sigterm(self) -> None:
        """SIGTERM unwinds like Ctrl-C (so __exit__ cleans up) and exits with 128 + 15."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigterm(signum, frame):
            raise SystemExit(128 + signum)

        self._sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def __exit__(self, exc_type, exc, tb):
        import shutil
        import signal

        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            if not self.replace:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise OssMlxError(f"{self.out} already exists (use --force to replace it)")
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
