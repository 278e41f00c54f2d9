"""Helpers the tests share, imported as `support.NAME` (pytest puts tests/ on sys.path:
pyproject's `pythonpath`). Some also run as scripts in a child process: `python
tests/support/scripted.py chat ...`."""

import functools
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


@functools.lru_cache(maxsize=1)
def no_network() -> list[str] | None:
    """The command prefix that runs a child without a network (a private network namespace
    with no interface up: `unshare -n`, or `unshare -rn` as a user), or None where this machine
    cannot make one. Asked once a session (it starts `unshare`: call it from a test marked
    subprocess)."""
    import subprocess

    for cmd in (["unshare", "-n"], ["unshare", "-rn"]):
        try:
            if subprocess.run(cmd + ["true"], capture_output=True).returncode == 0:
                return cmd
        except FileNotFoundError:
            return None
    return None
