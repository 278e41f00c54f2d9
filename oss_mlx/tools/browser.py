"""The `browser` tool: harmony's browser.search / browser.open / browser.find over a Backend.

    tool = Browser(LocalFolder("~/notes"), encoding=enc)   # one per conversation
    text = tool.call("search", '{"query": "lisbon trip"}')  # the tool message's text
    text = tool.call("open", '{"id": 0}')
    text = tool.call("find", '{"pattern": "hotel"}')
    shown, links = tool.cite(answer)                       # 【3†L12-L18】 -> a link, for chat

Every display is a page pushed on a stack; its index is the cursor the model cites. The texts
(the header "[cursor] title (url)", "**viewing lines [a - b] of n**", "L{n}: " lines, the
find results, the error messages) are those of OpenAI's reference browser, which the model
was trained on (docs/harmony.md §5.11). Errors are returned as the tool's text, never raised.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from oss_mlx.tools.backends import BackendError, maybe_truncate
from oss_mlx.tools.pages import Page, Snippet, join_lines, wrap_lines

FUNCTIONS = ("search", "open", "find")
VIEW_TOKENS = 1024  # how much of a page one display shows, in tokens
MAX_RESULTS = 20
CITATION = re.compile(r"【(?P<cursor>\d+)†(?P<content>[^†】]+)(?:†[^†】]+)?】")


class ToolUsageError(Exception):
    pass


@dataclass
class BrowserState:
    pages: dict = field(default_factory=dict)  # url -> Page: links already fetched
    # Pages in display order; index = cursor. Pages, not URLs as in the reference, whose
    # search pages all have the URL "" (there, cursor 0 would show the latest search).
    stack: list = field(default_factory=list)

    @property
    def cursor(self) -> int:
        return len(self.stack) - 1

    def add(self, page: Page):
        if page.url:
            self.pages[page.url] = page
        self.stack.append(page)

    def get(self, cursor: int = -1) -> Page:
        if self.cursor < 0:
            raise ToolUsageError("No pages to access!")
        if cursor == -1 or cursor == self.cursor:
            return self.stack[-1]
        if not isinstance(cursor, int) or isinstance(cursor, bool):
            raise ToolUsageError(f"`cursor` should be an integer, not `{type(cursor).__name__}`")
        if not 0 <= cursor <= self.cursor:
            raise ToolUsageError(f"Cursor `{cursor}` is out of range. "
                                 f"Available cursor indices: [0 - {self.cursor}].")
        return self.stack[cursor]


class Browser:
    """The browser of one conversation. encoding: a harmony/tiktoken encoding (encode, decode)
    used to size a display to VIEW_TOKENS tokens; without one, 4 characters count as a token."""

    def __init__(self, backend, encoding=None, view_tokens: int = VIEW_TOKENS,
                 max_results: int = MAX_RESULTS):
        self.backend = backend
        self.encoding = encoding
        self.view_tokens = view_tokens
        self.max_results = max_results
        self.state = BrowserState()

    # ---- the model's calls ----

    def call(self, function: str, arguments: str) -> str:
        """The text of the tool's answer to `browser.{function}` with JSON `arguments`."""
        if function not in FUNCTIONS:
            return json.dumps({"error": f"Unknown function: {function}"})
        args = _arguments(arguments)
        if args is None:
            return json.dumps({"error": "Invalid function arguments"})
        try:
            return getattr(self, function)(**args)
        except (TypeError, ValueError):
            return json.dumps({"error": "Invalid function arguments"})
        except (ToolUsageError, BackendError) as e:
            return str(e)

    def search(self, query: str, topn: int = 10, top_n: int = 10, source: str | None = None) -> str:
        n = min(int(topn if topn != 10 else top_n), self.max_results)
        try:
            page = self.backend.search(str(query), max(n, 1))
        except BackendError as e:
            raise BackendError(f"Error during search for `{query}`: {maybe_truncate(str(e))}") from None
        self.state.add(page)
        return self._show_safely(0, -1)

    def open(self, id: int | str = -1, cursor: int = -1, loc: int = -1, num_lines: int = -1,
             view_source: bool = False, source: str | None = None) -> str:
        snippet = None
        if isinstance(id, str):
            page = self._fetch(id)
        else:
            current = self.state.get(cursor)
            if id >= 0:  # follow a link of that page
                url = current.urls.get(str(id))
                if url is None:
                    raise ToolUsageError(f"Invalid link id `{id}`.")
                snippet = (current.snippets or {}).get(str(id))
                page = self.state.pages.get(url) or self._fetch(url)
            else:  # scroll the page at `cursor`
                page = current
        # view_source: the page is shown as the backend gave it (local files have no other form)
        self.state.add(page)
        if loc < 0:
            loc = 0
            if isinstance(snippet, Snippet) and snippet.line_idx is not None:
                loc = max(snippet.line_idx - 4, 0) if snippet.line_idx > 4 else snippet.line_idx
        return self._show_safely(int(loc), int(num_lines))

    def find(self, pattern: str, cursor: int = -1) -> str:
        page = self.state.get(cursor)
        if page.snippets is not None:
            raise ToolUsageError("Cannot run `find` on search results page or find results page")
        self.state.add(find_in_page(str(pattern).lower(), page))
        return self._show_safely(0, -1)

    # ---- displays ----

    def _fetch(self, url: str) -> Page:
        try:
            return self.backend.fetch(url)
        except BackendError as e:
            raise BackendError(f"Error fetching URL `{maybe_truncate(url)}`: "
                               f"{maybe_truncate(str(e))}") from None

    def _show_safely(self, loc: int, num_lines: int) -> str:
        try:
            return self._show(loc, num_lines)
        except ToolUsageError:
            self.state.stack.pop()  # a display that failed is not a cursor
            raise

    def _show(self, loc: int, num_lines: int) -> str:
        page, cursor = self.state.get(), self.state.cursor
        lines = wrap_lines(page.text)
        total = len(lines)
        if loc >= total:
            raise ToolUsageError(f"Invalid location parameter: `{loc}`. "
                                 f"Cannot exceed page maximum of {total - 1}.")
        end = self._end_line(loc, num_lines, lines)
        body = join_lines(lines[loc:end], numbered=True, offset=loc)
        header = page.title
        where = maybe_truncate(unquote(page.url))
        if where:
            header += f" ({where})"
        header += f"\n**viewing lines [{loc} - {end - 1}] of {total - 1}**\n\n"
        return f"[{cursor}] {header}{body}"

    def _end_line(self, loc: int, num_lines: int, lines: list[str]) -> int:
        """One past the last line to show: num_lines if given, else VIEW_TOKENS' worth."""
        total = len(lines)
        if num_lines > 0:
            return min(loc + num_lines, total)
        text = join_lines(lines[loc:], numbered=True, offset=loc)
        if len(text) <= self.view_tokens:  # at least a character per token: all of it fits
            return total
        if self.encoding is not None:
            tokens = self.encoding.encode(text[: (self.view_tokens + 1) * 128], disallowed_special=())
            if len(tokens) <= self.view_tokens:
                return total
            shown = len(self.encoding.decode(tokens[: self.view_tokens]))
        else:
            shown = self.view_tokens * 4
            if shown >= len(text):
                return total
        return min(loc + text[:shown].count("\n") + 1, total)

    # ---- citations, for a UI ----

    def cite(self, text: str) -> tuple[str, list[dict]]:
        """`text` with each 【cursor†...】 citation replaced by " ([name](url)) ", and the
        url_citation annotations (start/end in the new text), as the reference does."""
        out, notes, last = [], [], 0
        for m in CITATION.finditer(text):
            out.append(text[last:m.start()])
            last = m.end()
            cursor = int(m.group("cursor"))
            url = self.state.stack[cursor].url if cursor < len(self.state.stack) else ""
            url = url.split("/find?pattern=")[0]  # a find page cites the page it searched
            if not url:
                out.append(m.group(0))
                continue
            name = _display_name(url)
            link = f" ([{name}]({url})) "
            start = sum(len(s) for s in out)
            notes.append({"type": "url_citation", "start_index": start,
                          "end_index": start + len(link), "title": name, "url": url})
            out.append(link)
        out.append(text[last:])
        return "".join(out), notes


def _display_name(url: str) -> str:
    if url.startswith("file://"):
        return unquote(url.rsplit("/", 1)[-1])
    try:
        return unquote(url).split("/")[2]
    except IndexError:
        return url


def _arguments(text: str) -> dict | None:
    """The call's JSON object ({} for an empty message); None when it is not one."""
    if not text.strip():
        return {}
    try:
        args = json.loads(text)
    except ValueError:
        return None
    return args if isinstance(args, dict) else None


def find_in_page(pattern: str, page: Page, max_results: int = 50, show_lines: int = 4) -> Page:
    """The reference's find: case-insensitive matches, each shown with the next lines under a
    `# 【{i}†match at L{n}】` heading, links stripped to their text."""
    lines = _strip_links("\n".join(wrap_lines(page.text))).split("\n")
    chunks, snippets = [], {}
    i = 0
    while i < len(lines):
        if pattern not in lines[i].lower():
            i += 1
            continue
        n = len(chunks)
        snippet = "\n".join(lines[i:i + show_lines])
        chunks.append(f"# 【{n}†match at L{i}】\n{snippet}")
        snippets[str(n)] = Snippet(page.url, snippet, f"#{n}", i)
        if len(chunks) == max_results:
            break
        i += show_lines
    text = "\n\n".join(chunks) if chunks else f"No `find` results for pattern: `{pattern}`"
    return Page(url=f"{page.url}/find?pattern={quote(pattern)}",
                title=f"Find results for text: `{pattern}` in `{page.title}`", text=text,
                urls={str(k): page.url for k in range(len(chunks))}, snippets=snippets)


_LINK = re.compile(r"【\d+†(?P<content>[^†】]+)(?:†[^†】]+)?】")
_PARTIAL_START = re.compile(r"^[^【】]*】")
_PARTIAL_END = re.compile(r"【\d*(?:†(?P<content>[^†】]*)(?:†[^†】]*)?)?$")


def _strip_links(text: str) -> str:
    text = _PARTIAL_START.sub("", text)
    text = _PARTIAL_END.sub(lambda m: m.group("content") or "", text)
    return _LINK.sub(lambda m: m.group("content"), text)
