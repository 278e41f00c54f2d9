"""Shared fixtures: tiny random-weight checkpoints made by the project's own generator.

Everything is session-scoped: synthesising and converting is the slow part, and every test
module reads the same few folders without writing to them.
"""

from __future__ import annotations

import os

import pytest

# Tests never touch the user's model store or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
