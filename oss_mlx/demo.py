"""A tiny random-weight gpt-oss model made on the spot, so a fresh machine can run the whole stack.

`chat --demo` (and anything else that wants a model without a download) synthesises the "tiny"
preset with the project's own generator and converts it like a real checkpoint. The weights are
random: the text it produces is noise, but every layer of the runtime (loader, harmony, engine,
cache, REPL) runs for real. Nothing touches the network: the tokenizer file comes from the
installed `bpe-openai` package.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

DEMO_NAME = "tiny-random (demo)"


def make_demo_model(folder: str | Path, seed: int = 0) -> Path:
    """Synthesise the "tiny" preset into `folder`/src and convert it into `folder`/tiny-random."""
    from oss_mlx.convert.convert import convert
    from oss_mlx.convert.synth import synth

    folder = Path(folder)
    src = synth(folder / "src", preset="tiny", layout="hf", seed=seed)
    model_dir = convert(src, folder / "tiny-random")
    # The upstream-layout copy is only a stepping stone; the converted folder is self-contained.
    shutil.rmtree(src, ignore_errors=True)
    return Path(model_dir)


@contextmanager
def demo_model(seed: int = 0):
    """Yield a converted random-weight model folder in a temporary directory, removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="oss-mlx-demo-")
    try:
        yield make_demo_model(tmp, seed=seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
