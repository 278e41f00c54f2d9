"""`oss-mlx doctor`: is this machine and its model store ready, and what fits where.

Reports, offline and in a second or two:
- the machine: chip, memory, the GPU working set and the iogpu wired limit (macOS), the limit
  the memory plan uses, MLX's version and backend;
- the store: its location, whether it exists, free disk;
- each model in it: size, dtype / dense quantization, layers and experts, and its integrity
  against manifest.json (written by `oss-mlx convert`: sha256 and bytes of every file). The
  quick check (default) compares every file's size, parses every safetensors header against
  its file (tensor extents inside the file), and hashes every file up to QUICK_HASH_BYTES in
  full (config.json, the index, the vocabulary, small shards); `--full` hashes every shard too
  (about 2 s/GB). The vocabulary file must be the genuine o200k_base (its sha256);
- what fits at 8k / 32k / 128k tokens for each model in the store and for gpt-oss-20b and
  -120b as published (bf16 or 8-bit dense, full-precision or 8-bit KV), oss_mlx/engine/memory.py.

Exit status 1 when something is broken (a model fails its check, the limit is unreadable),
else 0; an empty or missing store is not broken. `--json` prints one object.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

from oss_mlx.engine import machine, memory
from oss_mlx.errors import OssMlxError

QUICK_HASH_BYTES = 256 << 20
CONTEXTS = (8192, 32768, 131072)
# Measured logit error of 8- and 4-bit dense weights against bf16 (benchmarks/memory_kv.py
# error; docs/memory.md "Quantized KV and dense weights"), shown by doctor next to the table.
DENSE_ERROR = {
    "8-bit": "mean |logit error| 0.013 x the logits' std, max 0.93 x, top-1 agreement 95% (2048 positions, tiny random-weight model, float32)",
    "4-bit": "mean |logit error| 0.131 x the logits' std, max 1.86 x, top-1 agreement 57% (2048 positions, tiny random-weight model, float32)",
}


# ---- the machine ---------------------------------------------------------------------------


def machine_report() -> dict:
    import mlx.core as mx

    limit = machine.machine_limit()
    return {
        "chip": machine.chip(), "os": f"{platform.system()} {platform.release()}",
        "memory_bytes": limit.total_ram,
        "gpu_working_set_bytes": limit.recommended, "wired_limit_mb": limit.wired_limit_mb,
        "limit_bytes": limit.bytes, "limit_source": limit.source,
        "mlx": mx.__version__, "backend": machine.backend(),
    }


# ---- one model -----------------------------------------------------------------------------


def check_model(folder: Path, full: bool = False) -> list[str]:
    """Problems found in a converted folder against its manifest (empty: healthy)."""
    from oss_mlx.checkpoint import safetensors as stio
    from oss_mlx.checkpoint import vocab

    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["manifest.json missing or unreadable: cannot check the files"]
    problems = []
    for name, want in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != want.get("bytes"):
            problems.append(f"{name}: {size} bytes, the manifest says {want.get('bytes')}")
            continue
        if name.endswith(".safetensors"):
            try:
                stio.read_header(path)
            except OssMlxError as e:
                problems.append(str(e))
                continue
        if (full or size <= QUICK_HASH_BYTES) and stio.file_sha256(path) != want.get("sha256"):
            problems.append(f"{name}: sha256 mismatch (corrupted or modified)")
    vocab_file = folder / vocab.O200K_FILE
    if vocab_file.is_file() and vocab.sha256(vocab_file.read_bytes()) != vocab.O200K_SHA256:
        problems.append(f"{vocab.O200K_FILE}: not the genuine o200k_base vocabulary")
    return problems


def _fits(plans: dict, limit: int) -> dict:
    return {k: {"total_bytes": p.total, "fits": p.total <= limit} for k, p in plans.items()}


def model_report(row: dict, limit: int, full: bool) -> dict:
    folder = Path(row["path"])
    problems = [row["broken"]] if row.get("broken") else check_model(folder, full)
    plans = {}
    if not problems:
        for ctx in CONTEXTS:
            for kv in (None, 8):
                key = f"{ctx // 1024}k" + (f" kv{kv}" if kv else "")
                plans[key] = memory.plan_for_folder(folder, ctx, kv)
    return {**row, "check": "full" if full else "quick", "ok": not problems,
            "problems": problems, "fits": _fits(plans, limit)}


def reference(limit: int) -> list[dict]:
    """The published models (real shapes from synth's presets), whether on disk or not."""
    from oss_mlx.config import PRESETS

    rows = []
    for name in ("20b", "120b"):
        for dense in (16, 8):
            for kv in (None, 8):
                plans = {f"{c // 1024}k": memory.plan_for_config(PRESETS[name], c, kv, dense)
                         for c in CONTEXTS}
                rows.append({"model": f"gpt-oss-{name}",
                             "dense": "bf16" if dense == 16 else "8-bit",
                             "kv": f"{kv}-bit" if kv else "bf16",
                             "fits": _fits(plans, limit)})
    return rows


def vocabulary() -> dict:
    """Where the offline o200k_base copy (for `convert` of original/ layouts) comes from."""
    from oss_mlx.checkpoint import vocab

    try:
        _, where = vocab.load_o200k()
        return {"ok": True, "o200k_base": where, "sha256": vocab.O200K_SHA256}
    except OssMlxError as e:
        return {"ok": False, "o200k_base": None, "problem": str(e)}


def report(full: bool = False) -> dict:
    from oss_mlx.store import list_models, store_root

    m = machine_report()
    root = store_root()
    probe = root
    while not probe.exists():
        probe = probe.parent
    store = {"path": str(root), "exists": root.is_dir(),
             "free_disk_bytes": shutil.disk_usage(probe).free}
    models = [model_report(r, m["limit_bytes"], full) for r in list_models()]
    voc = vocabulary()
    return {"machine": m, "store": store, "models": models, "vocabulary": voc,
            "reference": reference(m["limit_bytes"]), "dense_error": DENSE_ERROR,
            "ok": all(x["ok"] for x in models) and voc["ok"]}


# ---- the command -----------------------------------------------------------------------------


def _print(r: dict) -> None:
    from rich.table import Table

    from oss_mlx.cli.output import console
    from oss_mlx.store import human_size

    c = console()
    m = r["machine"]
    ws = human_size(m["gpu_working_set_bytes"]) if m["gpu_working_set_bytes"] else "-"
    c.print(f"[bold]machine[/] {m['chip']} · {m['os']} · memory {human_size(m['memory_bytes'])} "
            f"· GPU working set {ws} · wired limit {m['wired_limit_mb'] or 'default'} · "
            f"MLX {m['mlx']} ({m['backend']})")
    c.print(f"[bold]limit[/] {human_size(m['limit_bytes'])} ({m['limit_source']}) — what the "
            "memory plan compares with")
    s = r["store"]
    state = "" if s["exists"] else " [yellow](does not exist yet: oss-mlx convert openai/gpt-oss-20b)[/]"
    c.print(f"[bold]store[/] {s['path']}{state} · free disk {human_size(s['free_disk_bytes'])}")
    v = r["vocabulary"]
    c.print(f"[bold]vocabulary[/] o200k_base: {v['o200k_base'] or v.get('problem')}")
    for x in r["models"]:
        mark = "[green]ok[/]" if x["ok"] else "[red]BROKEN[/]"
        if x.get("broken"):  # its config.json cannot be read: nothing more to say about it
            c.print(f"[bold]{x['name']}[/] {human_size(x['size'])} · {mark}")
        else:
            c.print(f"[bold]{x['name']}[/] {human_size(x['size'])} · {x['dense']} dense · "
                    f"{x['experts']} experts · {x['layers']} layers · {x['check']} check {mark}")
        for p in x["problems"]:
            c.print(f"  {p}", style="red", markup=False)
        if not x["ok"]:
            c.print(f"  re-convert it (oss-mlx convert SRC --force) or remove it "
                    f"(oss-mlx rm {x['name']})", markup=False)
        if x["fits"]:
            c.print("  fits: " + ", ".join(
                f"{k} {'yes' if f['fits'] else 'no'} ({human_size(f['total_bytes'])})"
                for k, f in x["fits"].items()))
    t = Table(title="published models on this machine (memory plan)", title_justify="left")
    for col in ("model", "dense", "KV") + tuple(f"{c_ // 1024}k" for c_ in CONTEXTS):
        t.add_column(col)
    for row in r["reference"]:
        t.add_row(row["model"], row["dense"], row["kv"], *(
            f"{'[green]fits[/]' if f['fits'] else '[red]no[/]'} {human_size(f['total_bytes'])}"
            for f in row["fits"].values()))
    c.print(t)
    for bits, e in r["dense_error"].items():
        c.print(f"[dim]{bits} dense weights vs bf16: {e}[/]")


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--full", action="store_true",
                        help="sha256 every weight file too (slow for big models)")
    parser.add_argument("--macs", action="store_true",
                        help="print what fits on 16-128 GB Macs (markdown, from the memory plan)")


def main(args) -> int:
    if args.macs:
        print("Default GPU working set:\n\n" + memory.mac_table())
        print("\nWired limit raised to RAM - 4 GB (sudo sysctl iogpu.wired_limit_mb=...):\n\n"
              + memory.mac_table(limit_of=memory.raised_gpu_limit))
        return 0
    r = report(full=args.full)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        _print(r)
    return 0 if r["ok"] else 1
