"""`oss-mlx eval`: measure tool calling on the user's own machine (issue 23).

    from oss_mlx.eval import bfcl, run_case, run_loop, Settings

    settings = Settings(model="gpt-oss-20b", reasoning="low")     # constrain=True by default
    for case in bfcl.load_cases("simple_python", limit=10):       # real BFCL cases, offline
        record = run_case(engine, case, settings)                 # record["valid"]: BFCL's verdict
    report = run_loop(engine, settings, target=32)                # report.first_break: call number

Modules: bfcl (cases and BFCL's own scoring), functions (BFCL docs -> tools), turns (one model
turn with tools and the constraint), runner (a BFCL case), agent_loop (the long-loop format
test), settings, results (the JSON Lines results file, --resume), report (progress bar and
table), plot (accuracy per setting), command (`oss-mlx eval tools`). Importing this package
needs neither bfcl-eval nor mlx; they load when used.
"""

from oss_mlx.eval import bfcl
from oss_mlx.eval.agent_loop import LoopReport, run_loop
from oss_mlx.eval.results import ResultsFile, read_lines, summarize
from oss_mlx.eval.runner import run_case
from oss_mlx.eval.settings import Settings

__all__ = ["bfcl", "run_case", "run_loop", "LoopReport", "Settings", "ResultsFile",
           "read_lines", "summarize"]
