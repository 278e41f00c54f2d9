"""gpt-oss's built-in tools, local and offline (issue 22): `python` in a sandbox, `browser`
over a backend the user picks, and the turn loop that runs them (docs/harmony.md §5.10-5.11).

    from oss_mlx.tools import (Toolbox, PythonSession, Limits, python_support,
                               Browser, LocalFolder, web_backend, run_turn)

    if python_support().available:             # else: .reason, one line for the user
        box = Toolbox(python=PythonSession(), browser=Browser(LocalFolder("~/notes"), enc))
    for ev in run_turn(engine, conversation, box, params, cancel=cancel): ...
    box.close()

Nothing here imports a UI; chat, generate and serve build on these names.
"""

from oss_mlx.tools.backends import BackendError, HttpJson, LocalFolder, web_backend
from oss_mlx.tools.browser import Browser
from oss_mlx.tools.documents import pdf_support
from oss_mlx.tools.python_tool import PythonSession, ToolResult
from oss_mlx.tools.sandbox import Limits, Support
from oss_mlx.tools.sandbox import support as python_support
from oss_mlx.tools.toolbox import Toolbox, call_name
from oss_mlx.tools.turn import ToolEvent, TurnDone, run_turn

__all__ = [
    "Toolbox", "PythonSession", "ToolResult", "Limits", "Support", "python_support",
    "Browser", "LocalFolder", "HttpJson", "BackendError", "web_backend", "pdf_support",
    "run_turn", "ToolEvent", "TurnDone", "call_name",
]
