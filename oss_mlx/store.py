"""The local model store: converted models by name, so `--model gpt-oss-20b` works from anywhere.

Root: `$OSS_MLX_HOME/models` (default `~/.cache/oss-mlx/models`). A store entry is a folder
written by `oss-mlx convert`; its name is the Hub repo's name (`openai/gpt-oss-20b` ->
`gpt-oss-20b`) or the source folder's name, with `-q8` when the dense weights are 8-bit.
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
        p = Path(os.path.abspath(Path(s).expanduser()))  # a symlink keeps its own name
        # `.../gpt-oss-20b/original` is named after its repo, not "original".
        name = p.parent.name if p.name == "original" else p.name
    if dense_bits == 8:
        name += "-q8"
    return store_root() / name


def read_model_config(path: Path) -> dict | None:
    """The converted folder's config.json, or None if `path` is not an oss-mlx model folder."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("format") == "oss-mlx" else None


def model_arg(folder: Path) -> str:
    """How to name a converted folder on the command line: its store name when it is in the
    store, else its path."""
    folder = Path(folder)
    return folder.name if folder.parent == store_root() else str(folder)


def checkpoint_kind(folder: Path) -> str | None:
    """'an upstream gpt-oss checkpoint' / 'an mlx-lm gpt_oss folder' for a folder `oss-mlx
    convert` reads, 'a converted oss-mlx model' for one it wrote, None for anything else."""
    if read_model_config(folder) is not None:
        return "a converted oss-mlx model"
    for cfg in (folder / "config.json", folder / "original" / "config.json"):
        try:
            d = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("model_type") == "gpt_oss" and "quantization" in d:
            return "an mlx-lm gpt_oss folder"
        if isinstance(d, dict) and (d.get("model_type") == "gpt_oss" or "rope_ntk_alpha" in d):
            return "an upstream gpt-oss checkpoint"
    return None


def _explicit_path(s: str) -> bool:
    """A string the user can only have meant as a path (`./tiny`, `~/m`, `a/b/c`)."""
    return s.startswith((".", "~", os.sep)) or ((os.sep in s or "/" in s) and not HUB_ID.match(s))


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A converted model folder from a path, a store name (`gpt-oss-20b`) or a Hub id.

    One rule: a folder that is a converted model wins; else the store entry of that name (a
    same-named upstream folder in the current directory does not hide it); else an error that
    says what the argument is and a command that works.
    """
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.is_dir() and read_model_config(p) is not None:
        return p
    explicit = _explicit_path(s)
    if not explicit or HUB_ID.match(s):
        name = s.split("/")[-1]
        entry = store_root() / name
        if name not in ("", ".", "..") and read_model_config(entry) is not None:
            return entry
    if p.is_file():
        raise OssMlxError(f"{s} is a file, not a model folder: --model takes a converted model "
                          f"folder or a store name (see `oss-mlx list`)")
    if p.is_dir():
        kind = checkpoint_kind(p)
        if kind is None:
            raise OssMlxError(f"{s} is not an oss-mlx model folder (no oss-mlx config.json)")
        target = store_path_for(p)
        if read_model_config(target) is not None:
            raise OssMlxError(f"{s} is {kind}, not a converted model; it is converted in the "
                              f"store already: use --model {model_arg(target)}")
        raise OssMlxError(f"{s} is {kind}, not a converted model: run `oss-mlx convert {s}` "
                          f"first (then --model {target.name})")
    if explicit and not HUB_ID.match(s):
        raise OssMlxError(f"no such model folder: {s}")
    raise OssMlxError(_not_in_store(s))


def _not_in_store(s: str) -> str:
    import difflib

    name = s.split("/")[-1]
    names = [r["name"] for r in list_models()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    have = (f"; did you mean {' or '.join(close)}?" if close
            else f"; it has {', '.join(names)}" if names else "")
    if HUB_ID.match(s):
        how = f"get it with: oss-mlx convert {s}"
    elif name.startswith("gpt-oss-"):
        how = f"get it with: oss-mlx convert openai/{name}"
    else:
        how = "convert a checkpoint with: oss-mlx convert SRC (stored under SRC's folder name)"
    return f"model {s!r} is not in the local store ({store_root()}){have}; {how}"


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
