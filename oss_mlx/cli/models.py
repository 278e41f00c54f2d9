"""Which model a command runs: --demo (a tiny random-weight model made on the spot), --model
(a store name, a folder or a converted Hub id), or the default gpt-oss-20b from the store,
offered for download when it is missing and someone is at the terminal.

The demo synthesises the "tiny" preset with the project's own generator and converts it like a
real checkpoint: its text is noise, but every layer of the runtime (loader, harmony, engine,
cache, REPL, server) runs for real, and nothing touches the network (the tokenizer file comes
from the installed `bpe-openai` package).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from oss_mlx.defaults import DEFAULT_MODEL, DEMO_NAME
from oss_mlx.errors import OssMlxError


@dataclass
class Chosen:
    folder: Path  # the converted model folder
    name: str  # how to call it (a server's model id, chat's title)
    demo: bool = False


def make_demo_model(folder: str | Path, seed: int = 0) -> Path:
    """Synthesise the "tiny" preset into `folder`/src and convert it into `folder`/tiny-random."""
    from oss_mlx.convert.convert import convert
    from oss_mlx.convert.synth import synth

    folder = Path(folder)
    src = synth(folder / "src", preset="tiny", layout="hf", seed=seed)
    model_dir = convert(src, folder / DEMO_NAME)
    # The upstream-layout copy is only a stepping stone; the converted folder is self-contained.
    shutil.rmtree(src, ignore_errors=True)
    return Path(model_dir)


@contextmanager
def demo_model(seed: int = 0):
    """A converted random-weight model folder in a temporary directory, removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="oss-mlx-demo-")
    try:
        yield make_demo_model(tmp, seed=seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def choose(args, stack: ExitStack, say=None, interactive: bool = False) -> Chosen:
    """The model of a command's --demo / --model flags (options.add_model). The demo's folder
    lives as long as `stack`. `say(text)`: how to speak to the user (the download offer)."""
    from oss_mlx.store import resolve_model

    if getattr(args, "demo", False):
        return Chosen(stack.enter_context(demo_model()), DEMO_NAME, demo=True)
    if args.model:
        folder = resolve_model(args.model)
        return Chosen(folder, Path(str(args.model).rstrip("/")).name or str(folder))
    return Chosen(default_model(interactive, say or (lambda text: None)), DEFAULT_MODEL)


def network_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def default_model(interactive: bool, say) -> Path:
    """gpt-oss-20b from the local store, or how to get it (offered when online and interactive)."""
    from oss_mlx.store import resolve_model

    try:
        return resolve_model(DEFAULT_MODEL)
    except OssMlxError:
        pass
    how = f"oss-mlx convert openai/{DEFAULT_MODEL}"
    if interactive and network_reachable():
        say(f"{DEFAULT_MODEL} is not in the local model store. It can be downloaded from Hugging "
            f"Face (about 13 GB) and converted now ({how}).")
        try:
            answer = input("Download and convert it now? [y/N] ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer in ("y", "yes"):
            import subprocess

            rc = subprocess.call([sys.executable, "-m", "oss_mlx.cli", "convert",
                                  f"openai/{DEFAULT_MODEL}"])
            if rc != 0:
                raise OssMlxError(f"the conversion failed; try again with: {how}")
            return resolve_model(DEFAULT_MODEL)
    raise OssMlxError(f"{DEFAULT_MODEL} is not in the local model store; get it with "
                      f"`{how}` (needs the network once), pass --model FOLDER, or try the "
                      f"demo: --demo")
