"""`oss-mlx chat`: the terminal chat. repl.py holds the loop and its commands, session.py the
conversation and its file format, view.py the terminal and pipe views, input.py the line
editor and the pipe reader."""

from oss_mlx.cli.chat.repl import add_arguments, main

__all__ = ["add_arguments", "main"]
