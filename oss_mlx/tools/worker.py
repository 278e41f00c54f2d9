"""The python tool's worker: a notebook-like Python process that runs inside the sandbox.

Started by oss_mlx.tools.python_tool as `python -I -B worker.py CONFIG_JSON`, with its stdout and
stderr on one pipe to oss-mlx and its stdin the request pipe; on macOS under `sandbox-exec`
(the Seatbelt profile of oss_mlx.tools.seatbelt), on Linux it jails itself (jail_linux.enter)
before it reads the first request. It imports nothing from oss_mlx: it is run by file path,
and the jail module is loaded the same way, under a private name.

Protocol (docs/harmony.md §5.10): each request is one JSON line {"code": ..., "end": NONCE}; the
worker runs the code in the session's globals, prints what a notebook shows (the output, the
value of a last bare expression, the traceback of an error), then writes b"\\0NONCE\\0" so
oss-mlx knows this call's output is complete. Startup ends with the same mark built from the
config's "ready" nonce; a worker that cannot sandbox itself prints why and exits without it.
"""

from __future__ import annotations

import ast
import builtins
import json
import linecache
import os
import signal
import sys
import traceback


class CpuTimeExceeded(Exception):
    """Raised in the cell when the call's CPU time budget (RLIMIT_CPU soft limit) is spent."""


def _on_sigxcpu(signum, frame):
    raise CpuTimeExceeded("CPU time limit of this call exceeded")


def _load_jail():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail_linux.py")
    spec = importlib.util.spec_from_file_location("_oss_mlx_jail", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _macos_sandboxed() -> bool:
    """Whether Seatbelt confines this process (sandbox_check with no operation)."""
    import ctypes

    try:
        check = ctypes.CDLL("/usr/lib/libSystem.B.dylib").sandbox_check
    except (OSError, AttributeError):
        return False
    check.restype = ctypes.c_int
    check.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    return check(os.getpid(), None, 0) != 0


def _set_limits(cfg: dict):
    import resource

    def cap(which, value):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass  # macOS does not enforce RLIMIT_AS: oss-mlx watches the memory instead

    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_FSIZE, int(cfg["file_bytes"]))
    cap(resource.RLIMIT_NOFILE, int(cfg["open_files"]))
    if sys.platform.startswith("linux"):
        cap(resource.RLIMIT_AS, int(cfg["memory_bytes"]))
    total = int(cfg["session_cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (total, total))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG instead


def _cell_signals(inside: bool):
    """Ctrl-C (SIGINT from oss-mlx) and the CPU budget (SIGXCPU) interrupt a cell, never the
    worker's own loop between cells (an interrupt that arrives just after a cell ended is
    dropped; oss-mlx gets that cell's end mark all the same)."""
    signal.signal(signal.SIGINT, signal.default_int_handler if inside else signal.SIG_IGN)
    signal.signal(signal.SIGXCPU, _on_sigxcpu if inside else signal.SIG_IGN)


def _budget_cpu(seconds: float):
    """Let this call use `seconds` more CPU time (soft limit; the hard one is the session's)."""
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = used.ru_utime + used.ru_stime
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = int(spent + seconds) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _sandbox(cfg: dict):
    if sys.platform == "darwin":
        if not _macos_sandboxed():
            raise RuntimeError("refusing to run: this process is not inside the Seatbelt sandbox")
    elif sys.platform.startswith("linux"):
        jail = _load_jail()
        try:
            jail.enter(cfg["read"], cfg["write"])
        except jail.JailError as e:
            raise RuntimeError(str(e)) from None
        finally:
            sys.modules.pop("_oss_mlx_jail", None)
    else:
        raise RuntimeError(f"no sandbox for {sys.platform}")


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the cell's own frames on (the worker's frames are not the model's)."""
    tb = exc.__traceback__
    here = os.path.abspath(__file__)
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) == here:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def run_cell(code: str, ns: dict, name: str):
    """Run a cell as a notebook does: statements, then the value of a last bare expression."""
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    try:
        tree = ast.parse(code, name, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, name, "exec"), ns)
        if last is not None:
            value = eval(compile(last, name, "eval"), ns)
            if value is not None:
                print(repr(value))
    except SystemExit:
        pass
    except BaseException as e:  # noqa: BLE001 - the model sees every error as text
        sys.stdout.write(_user_traceback(e))


def _mark(nonce: str):
    sys.stdout.flush()
    os.write(1, b"\0" + nonce.encode() + b"\0")


def main(argv):
    cfg = json.loads(argv[1])
    requests = os.fdopen(os.dup(0), "rb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # input() in a cell gets EOF, never the next request
    os.close(devnull)
    sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
    sys.stderr = sys.stdout  # one stream, in the order things were written
    os.chdir(cfg["write"][0])
    try:
        _set_limits(cfg)
        _sandbox(cfg)
    except Exception as e:  # noqa: BLE001 - reported to oss-mlx as the reason
        print(f"sandbox setup failed: {e}", flush=True)
        return 3
    ns = {"__name__": "__main__", "__builtins__": builtins}
    _cell_signals(False)
    _mark(cfg["ready"])
    count = 0
    for line in requests:
        request = json.loads(line)
        count += 1
        _budget_cpu(float(cfg["cpu_s"]))
        _cell_signals(True)
        try:
            run_cell(request["code"], ns, f"<cell {count}>")
        finally:
            _cell_signals(False)
        _mark(request["end"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
