"""Helpers the tests share, imported as `support.NAME` (pytest puts tests/ on sys.path:
pyproject's `pythonpath`). Some also run as scripts in a child process: `python
tests/support/scripted.py chat ...`."""

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SUPPORT = TESTS / "support"
REPO = TESTS.parent


def child_env(env: dict | None = None) -> dict:
    """An environment in which a child Python finds both oss_mlx and the `support` package."""
    import os

    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), str(REPO),
                                                    env.get("PYTHONPATH", "")) if p)
    return env
