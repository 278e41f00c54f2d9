"""The design pages in docs/ and the citations of them: every `docs/<page>.md §<number>` in the
code, the tests, the benchmarks and the pages themselves names a page that exists and a heading
of that page that starts with that number; the numbering is one tree across the pages.

Citation forms understood: one section (`§1.4.1`), a list (`§1.3, §1.7`, `§3.1/3.2`) and a range
on one page (`§5.2-5.5`); every number in them must be a heading of the page named."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path



def _root() -> Path:
    """The checkout: the first folder above this file that has both docs/ and oss_mlx/."""
    for p in Path(__file__).resolve().parents:
        if (p / "docs").is_dir() and (p / "oss_mlx").is_dir():
            return p
    raise RuntimeError("no checkout with docs/ and oss_mlx/ above this test")


ROOT = _root()
DOCS = ROOT / "docs"
SCANNED = ("oss_mlx", "convert", "benchmarks", "tests", "docs")
SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt"}
# The first section number of each numbered page and its last (one numbering across pages).
NUMBERED = {"model": (1, 1), "checkpoint": (2, 4), "harmony": (5, 5), "traps": (6, 6)}

NUM = r"\d+(?:\.\d+)*"
HEADING = re.compile(rf"^(#{{2,4}})\s+({NUM})\.?\s+\S")
PAGE = r"docs/([A-Za-z0-9_-]+)\.md"
ONE = rf"{NUM}(?:\s*[-–]\s*§?\s*{NUM})?"  # a section, or a range on one page
CITATION = re.compile(PAGE + rf"((?:\s*§\s*{ONE})(?:\s*(?:,|/|and)\s*§?\s*{ONE})*)?")
LINK = re.compile(r"\]\(([A-Za-z0-9_-]+\.md)(#[^)\s]*)?\)")


def _files():
    for top in SCANNED:
        for f in sorted((ROOT / top).rglob("*")):
            if f.is_file() and f.suffix in SUFFIXES and ".venv" not in f.parts:
                yield f


def _headings(page: Path) -> list[tuple[int, str, str]]:
    """(level, number, heading text) of the numbered headings, outside code blocks."""
    out, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            out.append((len(m.group(1)), m.group(2), line.lstrip("#").strip()))
    return out


def _numbers(page: str) -> set[str]:
    path = DOCS / f"{page}.md"
    return {n for _, n, _ in _headings(path)} if path.is_file() else set()


def _citations():
    """(file, line number, page, [section numbers]) of every citation of a design page."""
    for f in _files():
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in CITATION.finditer(line):
                yield f, i, m.group(1), re.findall(NUM, m.group(2) or "")


def test_pages_number_their_headings_as_one_tree():
    seen: dict[str, str] = {}
    for page, (first, last) in NUMBERED.items():
        heads = _headings(DOCS / f"{page}.md")
        assert heads, f"docs/{page}.md has no numbered headings"
        for level, number, text in heads:
            parts = number.split(".")
            assert len(parts) == level - 1, f"docs/{page}.md: {text!r} is a level-{level} heading"
            assert first <= int(parts[0]) <= last, f"docs/{page}.md: {text!r} is outside §{first}-§{last}"
            assert number not in seen, f"§{number} is in docs/{page}.md and docs/{seen[number]}.md"
            seen[number] = page
            if len(parts) > 1:
                parent = ".".join(parts[:-1])
                assert seen.get(parent) == page, f"docs/{page}.md: §{number} has no §{parent} above it"
        tops = [int(n) for lv, n, _ in heads if lv == 2]
        assert tops == list(range(first, last + 1)), f"docs/{page}.md: top sections {tops}"


def test_every_citation_names_an_existing_page_and_section():
    found, bad = 0, []
    for f, i, page, numbers in _citations():
        where = f"{f.relative_to(ROOT)}:{i}"
        if not (DOCS / f"{page}.md").is_file():
            bad.append(f"{where}: docs/{page}.md does not exist")
            continue
        have = _numbers(page)
        for n in numbers:
            found += 1
            if n not in have:
                bad.append(f"{where}: docs/{page}.md has no heading §{n}")
    assert not bad, "\n".join(bad)
    assert found >= 50, f"only {found} section citations found: is the pattern still right?"


def _anchor(text: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    for page in sorted(DOCS.glob("*.md")):
        for m in LINK.finditer(page.read_text(encoding="utf-8")):
            target = DOCS / m.group(1)
            assert target.is_file(), f"{page.name}: link to missing {m.group(1)}"
            if m.group(2):
                anchors = {_anchor(line.lstrip("#").strip())
                           for line in target.read_text(encoding="utf-8").splitlines()
                           if line.startswith("#")}
                assert m.group(2)[1:] in anchors, f"{page.name}: no heading {m.group(0)}"


# ---- the old citations of an external document ----------------------------------------------

# "spec 5.7", "spec section 4", "Spec 1.5.6", "spec (1.5 step 6", "the spec's tables (sections 2",
# "spec 6 item 5", and the source tags of that document ("[HAR]", "[HF-conv]", ...).
STALE = re.compile(
    r"(?i)\bspec(?:'s)?(?:\s+[a-z]+){0,2}\s*\(?\s*(?:sections?\s*)?\d"
    r"|\[(?:HAR|OAI|HF|HF-conv|HF-main|MLX|MLXLM|EMP)\](?!\()")


def _prose(f: Path) -> str:
    """What a file says to a reader: a Python file's comments and strings, any other file whole."""
    text = f.read_text(encoding="utf-8", errors="replace")
    if f.suffix != ".py":
        return text
    keep = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING):
                keep.append(tok.string)
    except (tokenize.TokenError, SyntaxError):
        return text
    return "\n".join(keep)


def test_stale_pattern_catches_the_old_forms():
    for old in ("spec 5.7", "(spec section 2.2)", "Spec 1.5.6:", "spec (1.5 step 6: the sink",
                "the spec's tables (sections 2-5.1)", "spec 6 item 5", "[HAR] registry.rs",
                "[HF-conv] GptOssConverter", "the spec (section 1.8)"):
        assert STALE.search(old), old
    for fine in ("docs/harmony.md §5.7", "[MLX](https://github.com/ml-explore/mlx)",
                 "the spec bandwidth (table from", "importlib.util.find_spec(name)"):
        assert not STALE.search(fine), fine


def test_no_bare_spec_citations_remain():
    this = Path(__file__).resolve()
    stale = [f"{f.relative_to(ROOT)}: {m.group(0)!r}"
             for f in _files() if f.resolve() != this
             for m in STALE.finditer(_prose(f))]
    assert not stale, "\n".join(stale)
