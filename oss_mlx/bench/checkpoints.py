"""The checkpoints `bench --synth` times: random-weight upstream checkpoints with the real
dimensions, built once and kept; and the upstream checkpoint a converted folder came from (for
mlx-lm, which reads the upstream layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from oss_mlx.errors import OssMlxError

SYNTH_PRESETS = ("20b", "120b", "narrow")


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    from oss_mlx.store import home  # $OSS_MLX_HOME moves every cache of oss-mlx

    return home() / "bench"


def synth_checkpoint(preset: str, layers: int | None, seed: int, root: Path) -> tuple[Path, Path]:
    """A random-weight upstream checkpoint (HF layout, so mlx-lm loads it too) with the real
    dimensions of `preset`, and its conversion; built once and kept under `root`."""
    from oss_mlx.convert.convert import convert
    from oss_mlx.convert.synth import synth

    if preset not in SYNTH_PRESETS:
        raise OssMlxError(f"unknown --synth preset {preset!r}; choose one of {', '.join(SYNTH_PRESETS)}")
    folder = root / f"synth-{preset}-L{layers or 'all'}-seed{seed}"
    src, mlx_dir = folder / "hf", folder / "mlx"
    # synth and convert write through stio.AtomicFolder: a folder with a config.json is complete.
    for final, build in ((src, lambda: synth(src, preset=preset, layout="hf", layers=layers, seed=seed)),
                         (mlx_dir, lambda: convert(src, mlx_dir))):
        if (final / "config.json").is_file():
            continue
        shutil.rmtree(final, ignore_errors=True)  # a leftover that is not a finished build
        build()
    return src, mlx_dir


def source_of(model_dir: Path) -> Path | None:
    """The upstream checkpoint a converted folder came from, if its manifest names one that
    exists: the local folder convert read (for a Hub id, its Hugging Face cache snapshot), or
    the repository root above an `original/` folder when that root is in the Hugging Face
    layout mlx-lm reads."""
    try:
        manifest = json.loads((model_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    candidates = []
    for src in (manifest.get("source_folder"), manifest.get("source")):
        if isinstance(src, dict):
            src = src.get("path")
        if isinstance(src, str) and src:
            path = Path(src)
            candidates += [path.parent, path] if path.name == "original" else [path]
    found = [c for c in candidates if (c / "config.json").is_file()]
    hf = [c for c in found if _hf_config(c / "config.json")]
    return (hf or found or [None])[0]


def _hf_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("model_type") == "gpt_oss"
    except (OSError, ValueError, AttributeError):
        return False
