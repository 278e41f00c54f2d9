"""What the sandbox is told: the macOS Seatbelt profile's text (macOS itself cannot run here),
the roots the worker may read, the environment it gets, the tool's description."""

from __future__ import annotations

import os
import sys

import pytest

from oss_mlx.tools import Limits, PythonSession, python_support
from oss_mlx.tools.sandbox import python_roots, worker_command
from oss_mlx.tools.seatbelt import profile
from oss_mlx.tools.toolbox import python_config


def test_seatbelt_profile_is_closed_by_default():
    wd = "/private/var/folders/ab/T/oss-mlx-python-1"
    text = profile(["/opt/py"], wd, "/opt/py/bin/python3.12")
    lines = text.splitlines()
    assert lines[:2] == ["(version 1)", "(deny default)"]
    assert "network" not in text  # nothing allows a socket
    assert "process-fork" not in text  # no fork: no fork bomb, no subprocess
    assert '(allow process-exec (literal "/opt/py/bin/python3.12"))' in text
    writes = [ln for ln in lines if "file-write" in ln]
    assert writes == ["(allow file-read* file-write*", '(allow file-write-data (literal "/dev/null"))']
    assert text.index("file-write*") < text.index(f'(subpath "{wd}")')  # the only writable folder
    assert '(subpath "/opt/py")' in text and "/Users" not in text


def test_seatbelt_paths_are_quoted():
    text = profile(['/a "b"\\c'], "/w", "/p")
    assert '(subpath "/a \\"b\\"\\\\c")' in text


def test_roots_never_open_the_home(monkeypatch):
    home = os.path.realpath(os.path.expanduser("~"))
    monkeypatch.setattr(sys, "path", [home, os.path.dirname(home), "/", *sys.path])
    roots = python_roots()
    assert home not in roots and "/" not in roots and os.path.dirname(home) not in roots
    assert all(not home.startswith(r.rstrip("/") + "/") for r in roots)
    assert os.path.realpath(os.__file__).startswith(tuple(r + "/" for r in roots))


@pytest.mark.subprocess
def test_the_worker_gets_none_of_our_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OSS_MLX_TEST_API_KEY", "sk-secret")
    argv, env = worker_command(str(tmp_path), Limits(), "r")
    assert "OSS_MLX_TEST_API_KEY" not in env and env["HOME"] == str(tmp_path)
    if not python_support().available:
        pytest.skip(python_support().reason)
    with PythonSession(workdir_base=str(tmp_path)) as s:
        out = s.run("import os\nprint(sorted(os.environ))").text
    assert "OSS_MLX_TEST_API_KEY" not in out and "HOME" in out


def test_python_description_tells_the_truth():
    text = python_config(PythonSession(Limits(wall_s=30))).description
    assert "time out after 30.0 seconds" in text
    assert "/mnt/data" not in text and "Internet access for this session is disabled." in text
    assert text.startswith("Use this tool to execute Python code in your chain of thought.")
