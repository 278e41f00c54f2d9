"""README.md runs as shown, so it cannot drift (issue 20).

Every command in README's shell blocks runs in order, in one folder, as a user would type it,
with three differences a CPU test machine needs and nothing else:

- "the real model" is the project's tiny random-weight checkpoint: `oss-mlx convert
  openai/gpt-oss-20b` (and -120b) finds it in a Hugging Face cache offline, so every command
  that names gpt-oss-20b runs unchanged on it (the demo model where a real one is named);
- answers are capped at a few tokens and benchmarks at a few runs (`oss-mlx` is a wrapper that
  adds `--max-tokens 8` to chat, generate and eval, and shrinks bench's lengths and repeats):
  random weights never stop by themselves; the wrapper also hides the packages only the dev
  extra installs (httpx, openai, pytest, ...), so every command runs as on a user's install;
- a server listens on a free port instead of 8000 (the machine is shared), and the client
  examples are pointed at that port.

`pip install` lines are checked against pyproject's extras and the test command against
`.ci/run` (running the test suite inside itself would not end). The client examples (the OpenAI
SDK, Codex's config.toml, opencode's config) run against `oss-mlx serve --demo`, which answers
as gpt-oss-20b, the name they use (item 4). The built-in tools' commands run once chat has
`--tools`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, child_env

README = REPO / "README.md"
CLIENT_PAGES = (README, REPO / "docs" / "clients.md")
TIMEOUT = 600


def fenced(path: Path) -> list[tuple[str, str, str]]:
    """(section heading, language, text) of every fenced code block of a markdown file."""
    out, section, lang, lines = [], "", None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        if lang is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        elif lang is None and line.startswith("```"):
            lang, lines = line[3:].strip() or "text", []
        elif lang is not None and line.startswith("```"):
            out.append((section, lang, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"{path.name}: an unclosed code block"
    return out


def commands(text: str) -> list[str]:
    """The command lines of a shell block (a trailing backslash continues a line)."""
    out, pending = [], ""
    for line in text.splitlines():
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line and not line.startswith("#"):
            out.append(line)
    return out


SHELL = [(section, cmds) for section, lang, text in fenced(README) if lang in ("bash", "sh")
         for cmds in [commands(text)]]


# ---- the environment: a store, a Hugging Face cache and an `oss-mlx` that keeps answers short


def dev_only() -> set[str]:
    """The import names of what only the dev extra installs: neither a dependency of
    `pip install .` nor of another extra (pyproject.toml)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = lambda req: re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("-", "_")  # noqa: E731
    extras = project["optional-dependencies"]
    others = {name(r) for k, reqs in extras.items() if k != "dev" for r in reqs}
    return {name(r) for r in extras["dev"]} - {name(r) for r in project["dependencies"]} - others


WRAPPER = '''#!{python}
"""`oss-mlx` for README's commands on a CPU test machine (tests/test_readme.py), as installed by
`pip install .`: the packages only the dev extra brings cannot be imported."""
import sys


class DevOnly:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {dev_only!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)


sys.meta_path.insert(0, DevOnly())
from oss_mlx.cli import main  # noqa: E402

SHORTER = {{"--prompt-tokens": "16", "--gen-tokens": "4", "--repeat": "1", "--limit": "1",
           "--serve-requests": "1"}}
args = sys.argv[1:]
for i, a in enumerate(args[:-1]):
    if a in SHORTER:
        args[i + 1] = SHORTER[a]
if args[:1] in (["chat"], ["generate"], ["eval"]) and "--max-tokens" not in args:
    args += ["--max-tokens", "8"]
if args[:1] == ["bench"] and "--plot" not in args[:2]:
    args += ["--repeat", "1", "--warmup", "0", "--gen-tokens", "4", "--prompt-tokens", "16",
             "--serve-requests", "1"]
sys.exit(main(args))
'''


def fake_hub(root: Path, repo: str, files: Path) -> None:
    """A Hugging Face cache entry holding `files` (refs/main -> snapshots/<commit>/)."""
    entry = root / ("models--" + repo.replace("/", "--"))
    snap = entry / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    for f in files.iterdir():
        (snap / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def world(tiny_hf, tmp_path_factory):
    """Where README's commands run: a folder, its own store, gpt-oss-20b and -120b in an
    offline Hugging Face cache (the tiny checkpoint), `oss-mlx` on the PATH."""
    root = tmp_path_factory.mktemp("readme")
    for repo in ("openai/gpt-oss-20b", "openai/gpt-oss-120b"):
        fake_hub(root / "hub", repo, tiny_hf)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "oss-mlx").write_text(WRAPPER.format(python=sys.executable, dev_only=dev_only()))
    (bin_dir / "oss-mlx").chmod(0o755)
    work = root / "work"
    work.mkdir()
    (work / "docs").symlink_to(REPO / "docs")  # `--browse docs`: the repository's own pages
    env = child_env({**os.environ, "OSS_MLX_HOME": str(root / "home"),
                     "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1",
                     "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"})
    env.pop("COLUMNS", None)
    # The one model README names that no command of it converts.
    run(["oss-mlx convert openai/gpt-oss-120b"], env, work)
    return env, work


def run(lines, env, cwd, stdin="Hello\n"):
    for line in lines:
        r = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=cwd, env=env,
                           input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, f"README command failed: {line}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


class Served:
    """`oss-mlx ARGS --port 0` in the background: the name it serves and its base URL."""

    def __init__(self, args: list[str], env, cwd):
        self.proc = subprocess.Popen(["oss-mlx", *args, "--port", "0"], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.match(r"oss-mlx: serving '([^']+)' at (http://127\.0\.0\.1:(\d+)/v1)", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"{args}: {line}{self.proc.stderr.read()[-3000:]}")
        self.name, self.url, self.port = m.group(1), m.group(2), int(m.group(3))

    def models(self) -> list[str]:
        import urllib.request

        with urllib.request.urlopen(self.url + "/models", timeout=30) as r:
            return [m["id"] for m in json.load(r)["data"]]

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=60) == 0


# ---- the shell blocks, in order -----------------------------------------------------------


def _checked_not_run(part: str) -> bool:
    """`pip install ...` and the test command: checked against pyproject and .ci/run."""
    words = shlex.split(part, comments=True)
    if words[:2] == ["pip", "install"]:
        extras = re.findall(r"\[([\w,]+)\]", part)
        declared = _extras()
        for group in extras:
            assert set(group.split(",")) <= declared, f"{part}: no such extra"
        if "-e" in words:
            assert re.search(r"pip install .*-e \"\.\[dev\]\"", _ci()), ".ci/run installs otherwise"
        return True
    if words[1:] == ["-m", "pytest", "-q", "tests"] and words[0] in ("python", "python3"):
        assert "python3 -m pytest -q tests" in _ci(), ".ci/run runs another test command"
        return True
    return False


def _extras() -> set[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
               ["optional-dependencies"])


def _ci() -> str:
    return (REPO / ".ci" / "run").read_text()


def _has_option(command: str, option: str) -> bool:
    from oss_mlx.cli import build_parser

    _, parsers = build_parser()
    return any(option in a.option_strings for a in parsers[command]._actions)


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("section, lines", SHELL, ids=[f"{i}-{s}" for i, (s, _) in enumerate(SHELL)])
def test_readme_commands_run_as_shown(section, lines, world):
    env, work = world
    if any("--tools" in line or "--browse" in line for line in lines) and not _has_option(
            "chat", "--tools"):
        pytest.skip("chat --tools is not built yet (the tools integration)")
    if any(" eval " in f" {line} " for line in lines):
        pytest.importorskip("bfcl_eval")
    for line in lines:
        parts = [p.strip() for p in line.split("&&")]
        todo = [p for p in parts if not _checked_not_run(p)]
        if not todo:
            continue
        words = shlex.split(todo[0], comments=True)
        if words[:2] == ["oss-mlx", "serve"]:
            server = Served(words[1:] + ["--max-tokens", "8"], env, work)
            try:  # README's comment says which model it serves, and where
                comment = line.split("#", 1)[1]
                assert "gpt-oss-20b" in comment and server.name == "gpt-oss-20b"
                assert server.models() == ["gpt-oss-20b"]
                assert "http://127.0.0.1:8000/v1" in comment or "--demo" in words
            finally:
                server.stop()
            continue
        run([" && ".join(todo)], env, work)


# ---- the client examples, against `oss-mlx serve --demo` -----------------------------------


@pytest.fixture(scope="module")
def demo_server(world):
    env, work = world
    server = Served(["serve", "--demo", "--max-tokens", "8"], env, work)
    yield server
    server.stop()


CLIENTS = [(path.relative_to(REPO), section, lang, text) for path in CLIENT_PAGES
           for section, lang, text in fenced(path) if lang in ("python", "toml", "json")]


def test_readme_shows_the_three_client_configs():
    langs = [lang for path, _, lang, _ in CLIENTS if path.name == "README.md"]
    assert sorted(langs) == ["json", "python", "toml"]


@pytest.mark.slow
@pytest.mark.parametrize("page, section, lang, text", CLIENTS,
                         ids=[f"{p.name}-{lang}" for p, _, lang, _ in CLIENTS])
@pytest.mark.subprocess
def test_client_examples_work_against_the_demo_server(page, section, lang, text, demo_server,
                                                       world):
    """Unchanged but for the port: the demo answers under the name the examples use."""
    openai = pytest.importorskip("openai")
    assert "127.0.0.1:8000" in text
    text = text.replace("127.0.0.1:8000", f"127.0.0.1:{demo_server.port}")
    if lang == "python":
        env, work = world
        r = subprocess.run([sys.executable, "-c", text + "\nprint(repr(msg.content))"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr[-3000:]
        return
    if lang == "toml":  # Codex's config.toml: a custom provider on the Responses API
        try:
            import tomllib
        except ImportError:
            tomllib = pytest.importorskip("tomli")
        cfg = tomllib.loads(text)
        provider = cfg["model_providers"][cfg["model_provider"]]
        assert provider["wire_api"] == "responses"
        client = openai.OpenAI(base_url=provider["base_url"], api_key="unused")
        r = client.responses.create(model=cfg["model"], input="Hello")
        assert r.model == cfg["model"] and r.status in ("completed", "incomplete")
        return
    # opencode's opencode.json: an OpenAI-compatible provider, i.e. Chat Completions
    cfg = json.loads(text)
    name, model = cfg["model"].split("/", 1)
    provider = cfg["provider"][name]
    assert provider["npm"] == "@ai-sdk/openai-compatible" and model in provider["models"]
    client = openai.OpenAI(base_url=provider["options"]["baseURL"], api_key="unused")
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
    assert r.model == model and r.choices[0].finish_reason in ("stop", "length")


# ---- what the page is -------------------------------------------------------------------


def test_readme_is_a_page_a_newcomer_reads_top_to_bottom():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    headings = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("## ")]
    order = ["Two commands", "Install", "Get a model", "Chat", "Generate", "The built-in tools",
             "Serve", "eval", "bench", "doctor", "Several Macs"]
    found = [next(i for i, h in enumerate(headings) if want in h) for want in order]
    assert found == sorted(found), headings
    assert "oss-mlx chat --demo" in text.split("## Install")[0]  # the first thing to try


def test_readme_links_resolve_and_ci_matches_what_it_says():
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target
    bfcl = re.search(r"pip install --no-deps (bfcl-eval==[\d.]+)", text).group(1)
    assert f'"{bfcl}"' in _ci()
    from oss_mlx.eval import bfcl as ours

    assert bfcl == f"bfcl-eval=={ours.TESTED_VERSION}"


# The pages that show how figures were made: the machine by its kind, commands anyone can run.
LOCAL = re.compile(r"/work/|/tmp/|/root/|/home/\w|flock|bench\.lock|load average (?:of )?~?\d")


def _usage(f: Path) -> str:
    text = f.read_text(encoding="utf-8")
    if f.suffix != ".py":
        return text
    m = re.match(r'\s*(?:#[^\n]*\n\s*)*"""(.*?)"""', text, re.S)  # the docstring's usage lines
    return m.group(1) if m else ""


def test_no_local_paths_or_other_jobs_in_the_figures_pages():
    pages = [README, REPO / "benchmarks" / "README.md",
             REPO / "tests" / "server" / "traffic" / "README.md",
             *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "benchmarks").glob("*.py")),
             *sorted((REPO / "benchmarks").glob("*.sh")),
             *sorted((REPO / "benchmarks" / "results").glob("*.md")),
             *sorted((REPO / "tests" / "server" / "traffic").glob("*.py"))]
    bad = [f"{p.relative_to(REPO)}: {m.group(0)!r}" for p in pages
           for m in LOCAL.finditer(_usage(p))]
    assert not bad, "\n".join(bad)
    for script in sorted((REPO / "benchmarks").glob("*.sh")):
        assert "benchmarks/plot.py" not in script.read_text(), script  # it is `bench --plot`
