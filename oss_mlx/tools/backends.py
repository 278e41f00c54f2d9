"""Where the browser tool searches and opens pages: a small interface and two backends.

    class Backend:  source: str;  search(query, topn) -> Page;  fetch(url) -> Page

  * LocalFolder(path): offline; searches the text, Markdown, HTML (and, with pypdf, PDF)
    files under a folder (BM25 over words), opens them by their file:// URL, and never reads
    outside the folder.
  * HttpJson(search_url, ...): a search endpoint the user configures, answering JSON
    {"results": [{"title", "url", "snippet"}]}; pages are fetched from `fetch_url` (JSON
    {"title", "html" | "text"}) when set, else directly over HTTP(S). Nothing is configured
    by default: with no endpoint there is no web backend (`web_backend(None)` is None).

Errors are BackendError, whose text the model reads (docs/harmony.md §5.11).
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from oss_mlx.tools import documents
from oss_mlx.tools.pages import Page, Snippet, clean_text, domain, html_page, with_url


class BackendError(Exception):
    pass


def maybe_truncate(text: str, n: int = 1024) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def results_page(query: str, results: list[tuple[str, str, str]], line_of=None) -> Page:
    """A search results page as the reference renders its backends' results: a list of
    `【id†title†domain】 snippet` items under "# Search Results", with an empty URL.
    results: (title, url, snippet); line_of(url): where open(id) should land in that page."""
    items, urls, snippets = [], {}, {}
    for i, (title, url, snippet) in enumerate(results):
        title = clean_text(" ".join(title.split())).replace("†", "‡") or url
        snippet = clean_text(" ".join(snippet.split()))
        items.append(f"  * 【{i}†{title}†{_site(url)}】 {snippet}".rstrip())
        urls[str(i)] = url
        snippets[str(i)] = Snippet(url, snippet, title, line_of(url) if line_of else None)
    text = with_url("", "# Search Results\n\n" + "\n".join(items))
    return Page(url="", title=query, text=text, urls=urls, snippets=snippets)


def _site(url: str) -> str:
    if url.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return domain(url)


# ---- the local folder -----------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


@dataclass
class _Entry:
    doc: documents.Document
    url: str
    body: str  # the text searched (HTML as the browser renders it)
    page_text: str  # the text `fetch` shows: the body under the URL line
    counts: Counter = field(default_factory=Counter)
    length: int = 0


class LocalFolder:
    """Search over the documents under `root` (read once, at the first search or open)."""

    def __init__(self, root, source: str = "local files"):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise BackendError(f"not a folder: {self.root}")
        self.source = source
        self._entries: list[_Entry] | None = None

    def _index(self) -> list[_Entry]:
        if self._entries is None:
            entries = []
            allowed = documents.suffixes()
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    path = Path(dirpath, name)
                    if path.suffix.lower() not in allowed or not self._inside(path):
                        continue
                    doc = documents.read(path)
                    if doc is not None:
                        entries.append(self._entry(doc))
            self._entries = entries
        return self._entries

    def _entry(self, doc: documents.Document) -> _Entry:
        url = doc.path.resolve().as_uri()
        if doc.html:
            page_text = html_page(doc.text, url, doc.title, self._resolve).text
            body = page_text.split("\n", 2)[-1]
        else:
            body = clean_text(doc.text)
            page_text = with_url(url, body)
        words = _words(body + " " + doc.title)
        return _Entry(doc, url, body, page_text, Counter(words), len(words))

    def _inside(self, path: Path) -> bool:
        real = path.resolve()
        return real == self.root or self.root in real.parents

    def _resolve(self, href: str, base: str) -> str | None:
        """A link in an HTML document: a file in the folder, or a web URL (shown, not opened)."""
        url = urllib.parse.urljoin(base, href)
        if url.startswith("file://"):
            path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
            return path.resolve().as_uri() if self._inside(path) else None
        return url

    def search(self, query: str, topn: int) -> Page:
        entries = self._index()
        terms = _words(query)
        if not terms:
            raise BackendError("empty query")
        scored = [(s, e) for e in entries if (s := _bm25(terms, e, entries)) > 0]
        scored.sort(key=lambda x: -x[0])
        hits = [e for _, e in scored[:topn]]
        lines = {e.url: _best_line(e.page_text, terms) for e in hits}
        return results_page(query, [(e.doc.title, e.url, _snippet(e.body, terms)) for e in hits],
                            line_of=lambda url: lines.get(url))

    def fetch(self, url: str) -> Page:
        path = self._path_of(url)
        for e in self._index():
            if e.doc.path.resolve() == path:
                break
        else:
            raise BackendError("not a document in the folder")
        if e.doc.html:
            return html_page(e.doc.text, e.url, e.doc.title, self._resolve)
        return Page(url=e.url, title=e.doc.title, text=e.page_text)

    def _path_of(self, url: str) -> Path:
        """file:///abs/path, or a path relative to the folder; never one outside it."""
        if url.startswith("file://"):
            path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        elif "://" in url:
            raise BackendError("the local folder backend opens files of its folder only")
        else:
            path = self.root / url
        if not self._inside(path):
            raise BackendError("not a document in the folder")
        return path.resolve()


def _bm25(terms, e: _Entry, entries, k1: float = 1.2, b: float = 0.75) -> float:
    n = len(entries)
    avg = sum(x.length for x in entries) / max(n, 1)
    score = 0.0
    for t in set(terms):
        tf = e.counts.get(t, 0)
        if not tf:
            continue
        df = sum(1 for x in entries if t in x.counts)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * e.length / max(avg, 1)))
    return score


def _best_line(text: str, terms) -> int:
    """The wrapped line (as the browser numbers them) with the most query words."""
    from oss_mlx.tools.pages import wrap_lines

    lines = wrap_lines(text)
    want = set(terms)
    best = max(range(len(lines)), key=lambda i: (len(want & set(_words(lines[i]))), -i))
    return best


_LINK = re.compile(r"【\d+†([^†】]+)(?:†[^†】]+)?】")


def _snippet(text: str, terms, width: int = 240) -> str:
    flat = " ".join(_LINK.sub(r"\1", text).split())  # a link's text, not its reference
    low = flat.lower()
    pos = [low.find(t) for t in terms if low.find(t) >= 0]
    start = max(0, min(pos) - width // 4) if pos else 0
    return ("..." if start else "") + flat[start:start + width] + ("..." if start + width < len(flat) else "")


# ---- a configured web search ----------------------------------------------------------------


class HttpJson:
    """A search endpoint the user runs or subscribes to. search_url gets ?q=QUERY&n=TOPN;
    headers (e.g. an API key) are sent with every request."""

    def __init__(self, search_url: str, fetch_url: str | None = None, headers: dict | None = None,
                 source: str = "web", timeout_s: float = 20.0):
        self.search_url, self.fetch_url = search_url, fetch_url
        self.headers = dict(headers or {})
        self.source, self.timeout_s = source, timeout_s

    def _get(self, url: str, params: dict | None = None) -> tuple[bytes, str]:
        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, headers={"user-agent": "oss-mlx", **self.headers})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.read(16 << 20), resp.headers.get_content_type()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise BackendError(str(getattr(e, "reason", e))) from None

    def search(self, query: str, topn: int) -> Page:
        body, _ = self._get(self.search_url, {"q": query, "n": topn})
        try:
            results = json.loads(body)["results"]
            rows = [(r.get("title", ""), r["url"], r.get("snippet", "")) for r in results[:topn]]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BackendError("the search endpoint did not answer {\"results\": [...]}") from None
        return results_page(query, rows)

    def fetch(self, url: str) -> Page:
        if self.fetch_url:
            body, _ = self._get(self.fetch_url, {"url": url})
            try:
                data = json.loads(body)
            except ValueError:
                raise BackendError("the fetch endpoint did not answer JSON") from None
            if data.get("html"):
                return html_page(data["html"], url, data.get("title"))
            return Page(url, data.get("title") or domain(url), with_url(url, clean_text(data.get("text", ""))))
        if not url.startswith(("http://", "https://")):
            raise BackendError("only http(s) URLs can be opened")
        body, ctype = self._get(url)
        text = body.decode("utf-8", "replace")
        if ctype == "text/html" or "<html" in text[:2000].lower():
            return html_page(text, url)
        return Page(url, domain(url), with_url(url, clean_text(text)))


def web_backend(config: dict | None):
    """An HttpJson from a configuration dict ({"search_url", "fetch_url", "headers"}), or
    None when no search endpoint is configured: then the web browser is not offered."""
    if not config or not config.get("search_url"):
        return None
    return HttpJson(config["search_url"], config.get("fetch_url"), config.get("headers"),
                    config.get("source", "web"))
