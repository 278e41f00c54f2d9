"""The Berkeley Function Calling Leaderboard, offline: its cases and its scoring rules, taken
from the installed `bfcl-eval` package (Apache-2.0), so a score here is comparable with the
leaderboard's.

    from oss_mlx.eval import bfcl

    cases = bfcl.load_cases("simple_python", limit=20)       # real BFCL cases, from the package
    verdict = bfcl.score(cases[0], calls, text)              # BFCL's own checker decides

What comes from bfcl-eval, unchanged: the data files (questions, function docs, possible
answers), its loaders (`bfcl_eval.utils.load_dataset_entry` / `load_ground_truth_entry`, which
add its language hints to the function docs), the AST checker (`ast_checker`) and its output
format checks (`is_function_calling_format_output`, `is_empty_output`). What is ours: the few
lines that glue them the way BFCL's evaluation runner does for an OpenAI function-calling model
(`score`, `decode_ast`, mirrored from `eval_checker/eval_runner.py` and the OpenAI handlers'
`decode_ast`), because that runner cannot be imported without pandas and BFCL's multi-turn and
agentic machinery.

Importing the checker without the heavy parts: `ast_checker.py` imports `MODEL_CONFIG_MAPPING`
from `constants/model_config.py`, which imports every model handler BFCL has (anthropic,
openai, cohere, mistralai, google-genai, qwen-agent, boto3, tree-sitter, ...; with them,
`pip install bfcl-eval` brings 152 packages, torch included). The checker reads that mapping in
one place only, `convert_func_name`, for one flag (`underscore_to_dot`). So the checker is
imported with a stand-in for that one module holding our entry, removed from `sys.modules`
right after (see `_import_checker`); everything else the checker runs is BFCL's code. The rest
of bfcl-eval that we import needs only `filelock` (which huggingface_hub already brings).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import types
from dataclasses import dataclass, field
from functools import lru_cache

from oss_mlx.errors import OssMlxError

# The bfcl-eval release this module was written and tested against (the data's v4 files).
TESTED_VERSION = "2026.3.23"
INSTALL_HINT = ("pip install 'oss-mlx[eval]' && pip install --no-deps "
                f"bfcl-eval=={TESTED_VERSION}")

# BFCL's single-turn categories that run offline (no execution, no web): the leaderboard's
# "non-live" and "live" AST groups. simple_java / simple_javascript are accepted but not run
# by default (their values are Java/JS source text in strings).
DEFAULT_CATEGORIES = (
    "simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance",
    "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
    "live_irrelevance", "live_relevance",
)
CATEGORIES = DEFAULT_CATEGORIES + ("simple_java", "simple_javascript")
ALIASES = {"simple": "simple_python"}

# The model name we give the checker. Like OpenAI's function-calling models in BFCL
# (underscore_to_dot=True), function names are shown to the model with "." replaced by "_"
# (harmony recipients and OpenAI tool names allow no dots), and the checker compares the
# model's names with the expected ones converted the same way.
CHECKER_MODEL = "oss-mlx"


@dataclass(frozen=True)
class _CheckerConfig:
    """The one field of BFCL's ModelConfig that the AST checker reads."""

    underscore_to_dot: bool = True


@dataclass
class Case:
    """One BFCL test case. functions: the docs as BFCL shows them to a model (with its language
    hint); checker_functions: the raw docs its checker reads; ground_truth: the possible
    answers (None for the relevance / irrelevance categories, which have none)."""

    id: str
    category: str
    messages: list  # the one turn's messages: [{"role", "content"}]
    functions: list
    checker_functions: list
    ground_truth: list | None = None

    @property
    def relevance(self) -> bool:
        """Scored on whether a call was made at all (BFCL's relevance_file_runner)."""
        return "relevance" in self.category

    @property
    def parallel(self) -> bool:
        return "parallel" in self.category


@dataclass
class Verdict:
    valid: bool
    error_type: str = ""
    error: list = field(default_factory=list)
    decoded: list | None = None

    def to_dict(self) -> dict:
        return {"valid": self.valid, "error_type": self.error_type, "error": self.error,
                "decoded": self.decoded}


# ---- finding and importing bfcl-eval ------------------------------------------------------


def canonical(category: str) -> str:
    """BFCL's name for a category ("simple" -> "simple_python"); OssMlxError when unknown."""
    name = ALIASES.get(category, category)
    if name not in CATEGORIES:
        raise OssMlxError(f"unknown BFCL category {category!r}: choose from "
                          f"{', '.join(CATEGORIES)} (or 'simple')")
    return name


def version() -> str | None:
    """The installed bfcl-eval's version, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("bfcl-eval")
    except metadata.PackageNotFoundError:
        return None


def require():
    """bfcl-eval's modules we use, imported once; OssMlxError (one line: how to install it)
    when the package or what its checker needs is missing."""
    try:
        return _modules()
    except ImportError as e:
        raise OssMlxError(f"`oss-mlx eval tools` needs the bfcl-eval package ({e}): "
                          f"{INSTALL_HINT}") from None


@lru_cache(maxsize=1)
def _modules():
    # The first import of bfcl_eval.constants.eval_config makes three folders under
    # $BFCL_PROJECT_ROOT, by default beside site-packages (read-only for a system Python);
    # point it at our own cache folder for that import.
    from oss_mlx.store import home

    old = os.environ.get("BFCL_PROJECT_ROOT")
    if old is None:
        os.environ["BFCL_PROJECT_ROOT"] = str(home() / "bfcl")
    try:
        utils = importlib.import_module("bfcl_eval.utils")
        enums = importlib.import_module("bfcl_eval.constants.enums")
        checker = _import_checker()
    finally:
        if old is None:
            os.environ.pop("BFCL_PROJECT_ROOT", None)
    return types.SimpleNamespace(utils=utils, enums=enums, checker=checker)


class _Mapping(dict):
    """Our entry; any other model's is looked up in BFCL's real mapping (imported only then)."""

    def __missing__(self, key):
        return importlib.import_module(_MODEL_CONFIG).MODEL_CONFIG_MAPPING[key]


_MODEL_CONFIG = "bfcl_eval.constants.model_config"


def _import_checker():
    """bfcl_eval.eval_checker.ast_eval.ast_checker, imported with a stand-in for
    constants/model_config.py (see the module doc) unless the real one is already loaded."""
    name = "bfcl_eval.eval_checker.ast_eval.ast_checker"
    if name in sys.modules or _MODEL_CONFIG in sys.modules:
        module = importlib.import_module(name)
    else:
        stand_in = types.ModuleType(_MODEL_CONFIG)
        stand_in.MODEL_CONFIG_MAPPING = _Mapping()
        sys.modules[_MODEL_CONFIG] = stand_in
        try:
            module = importlib.import_module(name)
        finally:
            # Gone again: whoever imports model_config later gets BFCL's real module.
            del sys.modules[_MODEL_CONFIG]
            parent = sys.modules.get("bfcl_eval.constants")
            if getattr(parent, "model_config", None) is stand_in:
                delattr(parent, "model_config")
    module.MODEL_CONFIG_MAPPING.setdefault(CHECKER_MODEL, _CheckerConfig())
    return module


# ---- the cases -----------------------------------------------------------------------------


def load_cases(category: str, limit: int | None = None) -> list[Case]:
    """The first `limit` cases (all when None) of a BFCL category, in BFCL's order."""
    category = canonical(category)
    bfcl = require()
    shown = bfcl.utils.load_dataset_entry(category)  # with BFCL's language hints
    raw = {e["id"]: e for e in bfcl.utils.load_dataset_entry(
        category, include_language_specific_hint=False)}
    answers = {}
    if "relevance" not in category:
        answers = {e["id"]: e["ground_truth"] for e in bfcl.utils.load_ground_truth_entry(category)}
    cases = []
    for entry in shown[:limit] if limit is not None else shown:
        # Single-turn categories have exactly one turn of messages.
        cases.append(Case(id=entry["id"], category=category, messages=entry["question"][0],
                          functions=entry["function"],
                          checker_functions=raw[entry["id"]]["function"],
                          ground_truth=answers.get(entry["id"])))
    return cases


# ---- scoring -------------------------------------------------------------------------------


def model_result(calls: list, text: str):
    """What BFCL's OpenAI function-calling handlers record as a response: one {name:
    arguments JSON text} per tool call; the text answer when the model made no call."""
    if calls:
        return [{c["name"]: c["arguments"]} for c in calls]
    return text or ""


def decode_ast(result) -> list:
    """BFCL's decode_ast for OpenAI function-calling models (openai_response.py), as written
    there: a text answer is iterated too, so it fails to decode (or, when empty, decodes to
    no call), which is how BFCL tells "no function call" apart."""
    decoded = []
    for invoked in result:
        name = list(invoked.keys())[0]
        decoded.append({name: json.loads(invoked[name])})
    return decoded


def _language(bfcl, category: str):
    Language = bfcl.enums.Language
    if category == "simple_java":
        return Language.JAVA
    if category == "simple_javascript":
        return Language.JAVASCRIPT
    return Language.PYTHON


def score(case: Case, calls: list, text: str = "") -> Verdict:
    """BFCL's verdict on a response: `calls` as Completion.tool_calls ([{"name", "arguments"
    (JSON text)}, ...], all the calls the model made for this case), `text` its text answer
    (read only when there is no call). Mirrors eval_runner's _evaluate_single_relevance_entry
    and _evaluate_single_ast_entry."""
    bfcl = require()
    result = model_result(calls, text)
    if case.relevance:
        return _relevance(bfcl, case, result)
    try:
        decoded = decode_ast(result)
    except Exception as e:  # noqa: BLE001 - BFCL: any decode failure is a miss
        return Verdict(False, "ast_decoder:decoder_failed",
                       [f"Invalid syntax. Failed to decode AST. {e}"])
    if not bfcl.utils.is_function_calling_format_output(decoded):
        return Verdict(False, "ast_decoder:decoder_wrong_output_format",
                       ["Did not output in the specified format."], decoded)
    try:
        out = bfcl.checker.ast_checker(case.checker_functions, decoded, case.ground_truth,
                                       _language(bfcl, case.category), case.category,
                                       CHECKER_MODEL)
    except Exception as e:  # noqa: BLE001 - BFCL's runner would stop here; we call it a miss
        return Verdict(False, "oss_mlx:checker_raised",
                       [f"the BFCL checker raised {type(e).__name__}: {e}"], decoded)
    return Verdict(bool(out["valid"]), out.get("error_type", "") if not out["valid"] else "",
                   list(out.get("error", [])), decoded)


def _relevance(bfcl, case: Case, result) -> Verdict:
    """irrelevance: right when no call decodes; relevance: right when one does."""
    decoded, error = None, ""
    try:
        decoded = decode_ast(result)
        called = not bfcl.utils.is_empty_output(decoded)
    except Exception as e:  # noqa: BLE001 - BFCL: a failed decode means "no call"
        called, error = False, str(e)
    if "irrelevance" in case.category:
        if called:
            return Verdict(False, "irrelevance_error:decoder_success",
                           ["Valid syntax. Successfully decode AST when it should not."], decoded)
        return Verdict(True, decoded=decoded)
    if not called:
        return Verdict(False, "relevance_error:decoder_failed",
                       [f"Invalid syntax. Failed to decode AST when it should have. {error}"],
                       decoded)
    return Verdict(True, decoded=decoded)
