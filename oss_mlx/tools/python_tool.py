"""The `python` tool: one sandboxed, stateful Python worker per conversation.

    session = PythonSession()                  # nothing starts until the first call
    result = session.run("x = 6 * 7\\nx")      # ToolResult(text="42\\n", error=None, ...)
    result = session.run("print(x + 1)")       # globals persist: "43\\n"
    session.close()                            # ends the worker, removes its working folder

The worker (oss_mlx/tools/worker.py) runs under the platform's sandbox (oss_mlx.tools.sandbox);
this side enforces what a process cannot enforce on itself: the wall time of a call, the
interrupt (Ctrl-C: `cancel`), the size of the output the model gets back, and, on macOS, the
memory (RLIMIT_AS is not enforced there). Everything that goes wrong inside, an escape refused
by the sandbox, a timeout, a memory bomb, a crash of the worker, becomes the text of the
result, for the model to read; it never raises into oss-mlx (docs/harmony.md §5.10).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass

from oss_mlx.errors import OssMlxError
from oss_mlx.tools.sandbox import Limits, make_workdir, remove_workdir, support, worker_command

EMPTY = ("[WARN] No output available. Use print() to output anything to stdout to receive "
         "the output")  # the words of OpenAI's reference python tool
GRACE_S = 2.0  # how long an interrupted cell has to stop before the worker is killed
START_S = 30.0  # how long the worker has to start and sandbox itself
POLL_S = 0.1


@dataclass
class ToolResult:
    """A call's output as the model will read it. error: None, or "timeout", "cancelled",
    "memory", "crashed" (the worker died: the session restarts, its variables are lost),
    "unavailable" (no sandbox could be started: nothing ran)."""

    text: str
    error: str | None = None
    truncated: bool = False
    seconds: float = 0.0


class _Output:
    """A call's output as it streams in: the first and last halves of the kept size, the
    total, and the end mark (which may straddle two reads)."""

    def __init__(self, keep: int, mark: bytes):
        self.keep, self.mark = keep, mark
        self.head, self.tail = bytearray(), bytearray()
        self.total = 0
        self.pending = b""  # bytes that may be the start of the mark
        self.done = False

    def feed(self, chunk: bytes):
        data = self.pending + chunk
        i = data.find(self.mark)
        if i >= 0:
            self.done = True
            self._keep(data[:i])
            self.pending = b""
            return
        n = len(self.mark) - 1
        safe = max(0, len(data) - n)
        while safe < len(data) and not self.mark.startswith(data[safe:]):
            safe += 1
        self._keep(data[:safe])
        self.pending = data[safe:]

    def _keep(self, data: bytes):
        self.total += len(data)
        half = self.keep // 2
        room = half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        if len(self.tail) > 2 * half:  # trim now and then, not on every read
            del self.tail[: len(self.tail) - half]

    def text(self) -> tuple[str, bool]:
        tail = bytes(self.tail[-(self.keep // 2):]) if self.tail else b""
        shown = len(self.head) + len(tail)
        if shown >= self.total:
            return (bytes(self.head) + tail).decode("utf-8", "replace"), False
        note = (f"\n[output truncated: {self.total} bytes in all; the first {len(self.head)} "
                f"and the last {len(tail)} are shown]\n")
        return (self.head.decode("utf-8", "replace") + note
                + tail.decode("utf-8", "replace")), True


def _rss_bytes(pid: int) -> int:
    """Resident memory of a process; 0 when it cannot be read."""
    try:
        if sys.platform.startswith("linux"):
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) << 10
            return 0
        out = subprocess.run(["/bin/ps", "-o", "rss=", "-p", str(pid)], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        return int(out) << 10 if out else 0
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


class PythonSession:
    """The python tool of one conversation. Thread-safe for one call at a time (a lock)."""

    def __init__(self, limits: Limits | None = None, workdir_base: str | None = None):
        self.limits = limits or Limits()
        self._base = workdir_base
        self.workdir: str | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._finalizer = None

    # ---- lifecycle ----

    def _start(self):
        sup = support()
        if not sup.available:
            raise OssMlxError(sup.reason)
        if self.workdir is None:
            self.workdir = make_workdir(self._base)
            self._finalizer = weakref.finalize(self, _cleanup, {"proc": None}, self.workdir)
        ready = os.urandom(16).hex()
        argv, env = worker_command(self.workdir, self.limits, ready)
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=self.workdir, env=env, start_new_session=True,  # Ctrl-C reaches oss-mlx only
        )
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _cleanup, {"proc": self._proc}, self.workdir)
        out = _Output(self.limits.output_chars, b"\0" + ready.encode() + b"\0")
        self._pump(out, time.monotonic() + START_S, None)
        if not out.done:
            text, _ = out.text()
            self._kill()
            raise OssMlxError(f"the python sandbox did not start: {text.strip() or 'timeout'}")

    def _kill(self):
        proc, self._proc = self._proc, None
        if proc is not None:
            _end(proc)

    def close(self):
        """End the worker and remove the working folder (and every file the code wrote)."""
        with self._lock:
            self._kill()
            if self._finalizer is not None:
                self._finalizer()
            self.workdir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- a call ----

    def run(self, code: str, cancel: threading.Event | None = None) -> ToolResult:
        """Run one cell; never raises for what the code does (see ToolResult.error)."""
        with self._lock:
            t0 = time.monotonic()
            if self._proc is None or self._proc.poll() is not None:
                try:
                    self._start()
                except OssMlxError as e:  # no sandbox here, or it failed: the code never runs
                    return ToolResult(f"[ERROR] {e}", "unavailable", False, time.monotonic() - t0)
            end = os.urandom(16).hex()
            out = _Output(self.limits.output_chars, b"\0" + end.encode() + b"\0")
            try:
                self._proc.stdin.write(json.dumps({"code": code, "end": end}).encode() + b"\n")
                self._proc.stdin.flush()
            except OSError:
                pass  # the worker is gone: _pump sees its end
            error = self._pump(out, t0 + self.limits.wall_s, cancel)
            text, truncated = out.text()
            text = _finish(text, error, self.limits, self._proc)
            if error in ("crashed", "memory") or (error == "timeout" and not out.done):
                self._kill()
            return ToolResult(text, error, truncated, time.monotonic() - t0)

    def _pump(self, out: _Output, deadline: float, cancel) -> str | None:
        """Read the worker's output until `out` sees its end mark; enforce the wall time, the
        interrupt and the memory on the way. Returns the error kind, None when all went well."""
        proc, fd = self._proc, self._proc.stdout.fileno()
        error, interrupted_at, next_mem = None, None, 0.0
        while not out.done:
            ready, _, _ = select.select([fd], [], [], POLL_S)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    proc.wait()
                    return error if error in ("timeout", "cancelled", "memory") else "crashed"
                out.feed(chunk)
                continue
            now = time.monotonic()
            if error is None and cancel is not None and cancel.is_set():
                error = "cancelled"
            elif error is None and now >= deadline:
                error = "timeout"
            elif error is None and now >= next_mem:
                next_mem = now + 0.5
                if _rss_bytes(proc.pid) > (self.limits.memory_mb << 20):
                    error = "memory"
                    proc.kill()
            if error in ("cancelled", "timeout") and interrupted_at is None:
                interrupted_at = now
                _signal(proc, signal.SIGINT)  # a KeyboardInterrupt in the cell; state kept
            elif interrupted_at is not None and now - interrupted_at > GRACE_S:
                proc.kill()  # the cell ignored the interrupt (C code, a handler): end it
        return error


def _signal(proc, sig):
    try:
        proc.send_signal(sig)
    except OSError:
        pass


def _end(proc):
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _cleanup(state: dict, workdir: str):
    """Run at close() or when the session is collected / the interpreter exits."""
    if state.get("proc") is not None:
        _end(state["proc"])
    remove_workdir(workdir)


def _finish(text: str, error: str | None, limits: Limits, proc) -> str:
    """The output, with what happened said in words the model can act on."""
    restarted = proc is None or proc.poll() is not None
    lost = " The python session was restarted: its variables are lost." if restarted else ""
    notes = {
        "timeout": f"[ERROR] Execution timed out after {limits.wall_s:g} seconds.{lost}",
        "cancelled": f"[ERROR] Execution interrupted by the user.{lost}",
        "memory": f"[ERROR] Memory limit of {limits.memory_mb} MB exceeded.{lost}",
        "crashed": f"[ERROR] The python process ended unexpectedly{_how(proc)}.{lost}",
    }
    if error is None:
        return text if text.strip() else EMPTY
    return (text.rstrip("\n") + "\n" if text.strip() else "") + notes[error]


def _how(proc) -> str:
    if proc is None or proc.returncode is None:
        return ""
    if proc.returncode < 0:
        try:
            return f" ({signal.Signals(-proc.returncode).name})"
        except ValueError:
            return f" (signal {-proc.returncode})"
    return f" (exit code {proc.returncode})"
