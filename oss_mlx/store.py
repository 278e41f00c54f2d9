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

from oss_mlx.config import (BrokenModelFolder, NotAModelFolder, describe_dense,
                            read_model_folder)
from oss_mlx.errors import OssMlxError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def home() -> Path:
    """`$OSS_MLX_HOME`, or `~/.cache/oss-mlx`: the store and caches live under it. A file there
    is a one-line error, not a NotADirectoryError wherever it is first written to."""
    env = os.environ.get("OSS_MLX_HOME")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "oss-mlx"
    _must_be_a_folder(path, f"OSS_MLX_HOME ({path})" if env else str(path),
                      "point OSS_MLX_HOME at a folder" if env else "move it away, or set "
                      "OSS_MLX_HOME to a folder")
    return path


def store_root() -> Path:
    root = home() / "models"
    _must_be_a_folder(root, str(root), "move it away, or set OSS_MLX_HOME to another folder")
    return root


def _must_be_a_folder(path: Path, what: str, fix: str) -> None:
    if path.exists() and not path.is_dir():
        raise OssMlxError(f"{what} is a file, not a folder: oss-mlx keeps its models and "
                          f"caches there; {fix}")


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
    if dense_bits < 16:
        name += f"-q{dense_bits}"
    return store_root() / name


def read_model_config(path: Path) -> dict | None:
    """The converted folder's config.json, or None if `path` is not a usable oss-mlx model
    folder (config.read_model_folder says why)."""
    try:
        return read_model_folder(path).meta
    except OssMlxError:
        return None


def model_status(path: Path) -> str | None:
    """None for a usable converted folder, "missing" for no oss-mlx model at all, else why the
    folder is broken (its config.json cannot be read)."""
    try:
        read_model_folder(path)
    except BrokenModelFolder as e:
        return str(e)
    except NotAModelFolder:
        return "missing"
    return None


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


def _names_a_path(s: str, p: Path) -> bool:
    """Whether `s` can only mean a path: anything with a folder separator (`ck/tiny`,
    `../ck/tiny`, `~/m`, `/abs`) that exists on disk, or that is not an `owner/name` Hub id.
    A bare name (`tiny`) is a store name first, even when a folder of that name is here."""
    bare = "/" not in s and os.sep not in s and not s.startswith(("~", "."))
    return not bare and (p.exists() or not HUB_ID.match(s))


def converted_from(folder: Path) -> Path | None:
    """The source folder a converted model was made from (its manifest's), if it says."""
    try:
        source = json.loads((Path(folder) / "manifest.json").read_text()).get("source_folder")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(source) if isinstance(source, str) and source else None


def _same_checkpoint(source: Path | None, folder: Path) -> bool:
    """Whether `source` (a manifest's source_folder) is the checkpoint in `folder` (its root, or
    its `original/`)."""
    if source is None:
        return False
    here = folder.resolve()
    return source.resolve() in (here, here / "original")


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A converted model folder from a path, a store name (`gpt-oss-20b`) or a Hub id.

    One rule: a folder that is a converted model wins; else, for a name (`tiny`, or an
    `owner/name` Hub id that is no path here), the store entry of that name (a same-named
    upstream folder in the current directory does not hide it); else an error that says what
    the argument is and a command that works. A path that exists is a path: `ck/tiny` is never
    the store's `tiny`.
    """
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.is_dir() and _usable(p):
        return p
    path = _names_a_path(s, p)
    if not path:
        name = s.split("/")[-1]
        entry = store_root() / name
        if name not in ("", ".", "..") and entry.is_dir() and _usable(entry, store_name=name):
            return entry
    if p.is_file():
        raise OssMlxError(f"{s} is a file, not a model folder: --model takes a converted model "
                          f"folder or a store name (see `oss-mlx list`)")
    if p.is_dir():
        raise OssMlxError(_unconverted(s, p))
    if path:
        raise OssMlxError(f"no such model folder: {s}")
    raise OssMlxError(_not_in_store(s))


def _unconverted(s: str, p: Path) -> str:
    """What to do with a folder that is not a converted model."""
    kind = checkpoint_kind(p)
    if kind is None:
        return f"{s} is not an oss-mlx model folder (no oss-mlx config.json)"
    target = store_path_for(p)
    if read_model_config(target) is None:
        return (f"{s} is {kind}, not a converted model: run `oss-mlx convert {s}` first "
                f"(then --model {target.name})")
    source = converted_from(target)
    if _same_checkpoint(source, p):
        return (f"{s} is {kind}, not a converted model; it is converted in the store already: "
                f"use --model {model_arg(target)}")
    other = f"converted from {source}" if source else "of unknown source"
    return (f"{s} is {kind}, not a converted model: run `oss-mlx convert {s} -o FOLDER` first "
            f"(the store's {target.name!r} is another model, {other})")


def _usable(folder: Path, store_name: str | None = None) -> bool:
    """Whether `folder` is a usable converted model; a broken one is an error that says why."""
    status = model_status(folder)
    if status is None:
        return True
    if status == "missing":
        return False
    in_store = store_name or (folder.name if folder.resolve().parent == store_root().resolve()
                              else None)
    fix = "re-convert it (oss-mlx convert SRC --force)" + (
        f" or remove it (oss-mlx rm {in_store})" if in_store else "")
    raise OssMlxError(f"model {store_name or str(folder)!r} is broken: {status}; {fix}")


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
    """One dict per model in the store, sorted by name; a broken one (its config.json cannot
    be read) is listed too, with `broken` saying why (else None)."""
    root = store_root()
    rows = []
    if not root.is_dir():
        return rows
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue  # a converter's temporary folder, or a stray file
        try:
            folder = read_model_folder(entry)
        except NotAModelFolder:
            continue
        except BrokenModelFolder as e:
            rows.append({"name": entry.name, "path": str(entry), "size": folder_size(entry),
                         "broken": str(e), "dense": "?", "experts": "?", "layers": None,
                         "num_experts": None, "top_k": None})
            continue
        q, c = folder.quantization, folder.config
        dense = q.get("dense")
        rows.append({
            "name": entry.name, "path": str(entry), "size": folder_size(entry), "broken": None,
            "dense": describe_dense(dense) if dense else folder.meta.get("dtype", "?"),
            "experts": (q.get("experts") or {}).get("mode", "?"),
            "layers": c.num_hidden_layers, "num_experts": c.num_experts,
            "top_k": c.experts_per_token,
        })
    return rows


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def remove_model(name: str) -> int:
    """Delete the store entry `name` (usable or broken); returns the bytes freed. Only a
    folder directly in the store that holds a model (or a broken one) is removed."""
    import shutil

    entry = store_root() / name
    if "/" in name or os.sep in name or name in ("", ".", "..") or not entry.is_dir():
        raise OssMlxError(_not_in_store(name))
    if model_status(entry) == "missing":
        raise OssMlxError(f"{entry} is not a model folder; not removing it")
    size = folder_size(entry)
    shutil.rmtree(entry)
    return size


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
