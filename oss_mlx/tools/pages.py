"""Pages as the browser tool shows them: text with numbered links, wrapped into numbered lines.

The text formats are those of OpenAI's reference browser (gpt_oss/tools/simple_browser), which
the model was trained on (docs/harmony.md §5.11):
  * a link in a page is `【{id}†{text}】`, or `【{id}†{text}†{domain}】` when it leaves the
    page's own site; `browser.open(id=N)` follows it;
  * a fetched page's text starts with "\\nURL: {url}\\n";
  * lines are wrapped at 80 columns and shown as "L{n}: {line}".
HTML is turned into that text with the standard library's parser (headings as "#", list
items as "  * ", paragraphs split by a blank line), not with the reference's lxml+html2text.
"""

from __future__ import annotations

import itertools
import re
import textwrap
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse


@dataclass
class Snippet:
    """A search result or a find match: where `open(id=...)` should land."""

    url: str
    text: str
    title: str
    line_idx: int | None = None


@dataclass
class Page:
    url: str
    title: str
    text: str
    urls: dict = field(default_factory=dict)  # link id (str) -> url
    snippets: dict | None = None  # link id -> Snippet; set on search and find pages


def domain(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    return urlparse(url).netloc


def wrap_lines(text: str, width: int = 80) -> list[str]:
    """Lines as the reference browser numbers them: long lines wrapped, empty ones kept."""
    return list(itertools.chain.from_iterable(
        textwrap.wrap(line, width=width, replace_whitespace=False, drop_whitespace=False)
        if line else [""]
        for line in text.split("\n")
    ))


def join_lines(lines: list[str], numbered: bool = False, offset: int = 0) -> str:
    if numbered:
        return "\n".join(f"L{i + offset}: {line}" for i, line in enumerate(lines))
    return "\n".join(lines)


# The reference replaces the brackets it uses for links in page text, so a page cannot forge one.
_SPECIAL = {"【": "〖", "】": "〗", "\u200b": ""}


def clean_text(text: str) -> str:
    return re.sub("|".join(map(re.escape, _SPECIAL)), lambda m: _SPECIAL[m.group(0)], text)


_BLOCK = {"p", "div", "section", "article", "header", "footer", "main", "table", "tr", "br",
          "blockquote", "pre", "ul", "ol", "dl", "dt", "dd", "figure", "hr", "nav", "aside"}
_SKIP = {"script", "style", "head", "noscript", "template", "svg", "math"}


class _HtmlText(HTMLParser):
    """HTML -> the browser's text, collecting links as numbered references."""

    def __init__(self, base_url: str, resolve):
        super().__init__(convert_charrefs=True)
        self.base_url, self.resolve = base_url, resolve
        self.out: list[str] = []
        self.urls: dict[str, str] = {}
        self._by_url: dict[str, str] = {}
        self.title = ""
        self._skip = 0
        self._in_title = False
        self._link: list | None = None  # [url, text parts]

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in _SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif re.fullmatch(r"h[1-6]", tag):
            self.out.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag == "li":
            self.out.append("\n  * ")
        elif tag in _BLOCK:
            self.out.append("\n\n" if tag != "br" else "\n")
        elif tag == "a" and attrs.get("href") and self._link is None:
            self._link = [attrs["href"], []]
        elif tag == "img" and (attrs.get("alt") or attrs.get("title")):
            self.out.append(f"[Image: {attrs.get('alt') or attrs.get('title')}]")

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        elif re.fullmatch(r"h[1-6]", tag) or tag in _BLOCK:
            self.out.append("\n\n")
        elif tag == "a" and self._link is not None:
            href, parts = self._link
            self._link = None
            self.out.append(self._reference(href, " ".join("".join(parts).split())))

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif self._skip:
            return
        elif self._link is not None:
            self._link[1].append(data)
        else:
            self.out.append(re.sub(r"\s+", " ", data))

    def _reference(self, href: str, text: str) -> str:
        text = clean_text(text).replace("†", "‡")
        if not text or href.startswith(("mailto:", "javascript:", "#")):
            return text
        url = self.resolve(href, self.base_url)
        if url is None:
            return text
        if url not in self._by_url:
            self._by_url[url] = str(len(self.urls))
            self.urls[self._by_url[url]] = url
        link_id = self._by_url[url]
        here, there = domain(self.base_url), domain(url)
        return f"【{link_id}†{text}】" if there == here else f"【{link_id}†{text}†{there}】"


def _default_resolve(href: str, base: str) -> str | None:
    return urljoin(base, href)


def html_page(html: str, url: str, title: str | None = None, resolve=None) -> Page:
    """A Page from HTML; `resolve(href, base) -> url | None` decides what links point to
    (None: the link is shown as plain text)."""
    parser = _HtmlText(url, resolve or _default_resolve)
    parser.feed(clean_text(html))
    parser.close()
    text = "".join(parser.out)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n[ \t]+(?![ \t]|\* )", "\n", text)  # keep list items' "  * "
    text = re.sub(r"\n(\s*\n)+", "\n\n", text).strip()
    return Page(url=url, title=title or parser.title.strip() or domain(url), text=with_url(url, text),
                urls=parser.urls)


def with_url(url: str, text: str) -> str:
    """A fetched page's text, headed by its URL as the reference shows it."""
    return f"\nURL: {url}\n{text}"
