"""Shared fixtures: tiny random-weight checkpoints made by the project's own generator.

Everything is session-scoped: synthesising and converting is the slow part, and every test
module reads the same few folders without writing to them.
"""

from __future__ import annotations

import os
import sys

import pytest

# Tests never touch the user's model store or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---- the `subprocess` marker, checked -----------------------------------------------------------
# A test that starts a child process (the CLI, a server, mlx.launch, a sandbox, through whatever
# library) must carry @pytest.mark.subprocess, so `-m "not slow and not subprocess"` is the quick
# run. An audit hook sees every process start; a test that started one unmarked fails. The
# machine probes that libraries run (`uname -p` for platform.processor(), ...) do not count.

_SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn",
                           "os.spawn", "os.system"})
_PROBES = frozenset({"uname", "sysctl", "ps", "lscpu"})
_spawned: list | None = None  # what the running test (setup, call) started; None between tests


def _audit(event, args):
    if event in _SPAWN_EVENTS and _spawned is not None:
        program = str(args[0]) if args else ""
        if os.path.basename(program) not in _PROBES:
            _spawned.append(f"{event} {program}"[:120])


sys.addaudithook(_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    global _spawned
    _spawned = []
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    global _spawned
    spawned, _spawned = _spawned, None
    result = yield
    if spawned and item.get_closest_marker("subprocess") is None:
        pytest.fail(f"{item.nodeid} starts a child process ({spawned[0]}) but is not marked "
                    "@pytest.mark.subprocess (see tests/README.md)", pytrace=False)
    return result


@pytest.fixture(scope="session", autouse=True)
def _isolated_store(tmp_path_factory):
    os.environ["OSS_MLX_HOME"] = str(tmp_path_factory.mktemp("oss-mlx-home"))
    yield


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A tiny checkpoint in the Hugging Face layout (repo root)."""
    from oss_mlx.convert.synth import synth

    return synth(tmp_path_factory.mktemp("src") / "tiny-hf", preset="tiny", layout="hf", seed=0)


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory):
    """The same weights (same seed) in the `original/` layout."""
    from oss_mlx.convert.synth import synth

    return synth(
        tmp_path_factory.mktemp("src") / "tiny-original", preset="tiny", layout="original", seed=0
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_hf, tmp_path_factory):
    """`tiny_hf` converted: an MLX model folder (bf16 dense weights, mxfp4 experts)."""
    from oss_mlx.convert.convert import convert

    return convert(tiny_hf, tmp_path_factory.mktemp("mlx") / "tiny")


@pytest.fixture(scope="session")
def tiny_model_original(tiny_original, tmp_path_factory):
    from oss_mlx.convert.convert import convert

    return convert(tiny_original, tmp_path_factory.mktemp("mlx") / "tiny-original")


@pytest.fixture(scope="session")
def encoding(tmp_path_factory):
    """The harmony encoding over the genuine vocabulary alone (no model): what a scripted
    engine (tests/scripted.py) needs."""
    from oss_mlx.harmony import load_encoding
    from support.scripted import vocab_dir

    return load_encoding(vocab_dir(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="session")
def scripted_dir(tmp_path_factory):
    """A folder the commands take as a converted model (the vocabulary and an oss-mlx
    config.json, no weights): what a scripted engine needs behind the real CLI."""
    from support.scripted import scripted_model_dir

    return scripted_model_dir(tmp_path_factory.mktemp("scripted-model"))
