"""The local model store: converted models by name, so `--model gpt-oss-20b` works from anywhere.

Root: `$OSS_MLX_HOME/models` (default `~/.cache/oss-mlx/models`). A store entry is a folder
written by `oss-mlx convert`; its name is the Hub repo's name (`openai/gpt-oss-20b` ->
`gpt-oss-20b`) or the source folder's name, with `-q8` / `-q4` when the dense weights are 8-/4-bit.
`oss-mlx list` shows what is there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import OssMlxError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def home() -> Path:
    """`$OSS_MLX_HOME`, or `~/.cache/oss-mlx`: the store and caches live under it."""
    env = os.environ.get("OSS_MLX_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "oss-mlx"


def store_root() -> Path:
    return home() / "models"


def is_hub_id(s: str) -> bool:
    """`owner/name` that is not a local path (paths win when both could be meant)."""
    return bool(HUB_ID.match(s)) and not Path(s).expanduser().exists() and not s.startswith(".")


def store_path_for(src: str | os.PathLike, dense_bits: int = 16) -> Path:
    """Where `oss-mlx convert SRC` puts its output when no `-o` is given."""
    s = str(src)
    if is_hub_id(s):
        name = s.split("/")[-1]
    else:
        p = Path(s).expanduser().resolve()
        # `.../gpt-oss-20b/original` is named after its repo, not "original".
        name = p.parent.name if p.name == "original" else p.name
    if dense_bits < 16:
        name += f"-q{dense_bits}"
    return store_root() / name


def read_model_config(path: Path) -> dict | None:
    """The converted folder's config.json, or None if `path` is not an oss-mlx model folder."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("format") == "oss-mlx" else None


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A converted model folder from a path, a store name (`gpt-oss-20b`) or a Hub id."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.is_dir():
        if read_model_config(p) is not None:
            return p
        if (p / "config.json").is_file() or (p / "original" / "config.json").is_file():
            raise OssMlxError(
                f"{s} is not a converted oss-mlx model (an upstream checkpoint?): "
                f"run `oss-mlx convert {s}` first"
            )
        raise OssMlxError(f"{s} is not an oss-mlx model folder (no oss-mlx config.json)")
    name = s.split("/")[-1] if is_hub_id(s) else s
    if "/" not in name and os.sep not in name and name not in ("", ".", ".."):
        entry = store_root() / name
        if read_model_config(entry) is not None:
            return entry
    if os.sep in s and not is_hub_id(s) or s.startswith((".", "~")):
        raise OssMlxError(f"no such model folder: {s}")
    hub = s if is_hub_id(s) else f"openai/{name}"
    raise OssMlxError(
        f"model {s!r} is not in the local store ({store_root()}); get it with: oss-mlx convert {hub}"
    )


def list_models() -> list[dict]:
    """One dict per converted model in the store, sorted by name."""
    root = store_root()
    rows = []
    if not root.is_dir():
        return rows
    for entry in sorted(root.iterdir()):
        cfg = read_model_config(entry) if entry.is_dir() else None
        if cfg is None:
            continue
        m = cfg.get("model", {})
        q = cfg.get("quantization") or {}
        dense = q.get("dense")
        experts = q.get("experts") or {}
        rows.append({
            "name": entry.name,
            "path": str(entry),
            "size": sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()),
            "dense": f"{dense['mode']} {dense['bits']}-bit" if dense else cfg.get("dtype", "?"),
            "experts": experts.get("mode", "?"),
            "layers": m.get("num_hidden_layers"),
            "num_experts": m.get("num_experts"),
            "top_k": m.get("experts_per_token"),
        })
    return rows


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


# ---- `oss-mlx list` ---------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the list as JSON")


def main(args) -> int:
    rows = list_models()
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not rows:
        console.print(f"No models in {store_root()}. Get one with: oss-mlx convert openai/gpt-oss-20b")
        return 0
    table = Table(title=f"Models in {store_root()}", title_justify="left")
    for col in ("name", "size", "dense", "experts", "layers", "experts/top-k"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("size", "layers") else "left")
    for r in rows:
        table.add_row(r["name"], human_size(r["size"]), r["dense"], r["experts"], str(r["layers"]),
                      f"{r['num_experts']}/top-{r['top_k']}")
    console.print(table)
    return 0
