"""Citations in a streamed answer: `【cursor†L12-L18】` becomes a link as the text streams.

    cites = CitationStream(browser)
    for piece in answer_deltas:
        shown = cites.feed(piece)        # the text to show now (a citation in progress is held)
        new = cites.take()               # url_citation annotations completed by this piece
    shown = cites.flush()                # whatever was held, at the end of the answer

Each finished citation is replaced as `Browser.cite` replaces it (" ([name](url)) ", the
reference's form); its annotation's start/end index the whole text shown so far, so the pieces
joined are the text the annotations describe (what the Responses API sends as output_text and
its url_citation annotations; docs/harmony.md §5.11). A citation naming no page the browser
showed, or text that only looks like the start of one, is passed through unchanged.
"""

from __future__ import annotations

import re

from oss_mlx.tools.browser import CITATION, Browser

# What may still become a citation: 【, digits, †, text, an optional second †.
_PARTIAL = re.compile(r"【\d*(?:†[^†】]*(?:†[^†】]*)?)?$")
MAX_HELD = 400  # characters held for one citation at most; longer is plain text


class CitationStream:
    def __init__(self, browser: Browser | None):
        self.browser = browser
        self.held = ""
        self.shown = 0  # characters emitted so far
        self.annotations: list[dict] = []
        self._taken = 0

    def feed(self, text: str) -> str:
        if self.browser is None:
            self.shown += len(text)
            return text
        out = []
        data = self.held + text
        self.held = ""
        while data:
            i = data.find("【")
            if i < 0:
                out.append(data)
                break
            out.append(data[:i])
            data = data[i:]
            m = CITATION.match(data)
            if m:
                out.append(self._link(m.group(0), sum(map(len, out))))
                data = data[m.end():]
            elif _PARTIAL.match(data) and len(data) < MAX_HELD:
                self.held = data  # may still become a citation
                break
            else:
                out.append("【")
                data = data[1:]
        shown = "".join(out)
        self.shown += len(shown)
        return shown

    def _link(self, citation: str, offset: int) -> str:
        text, notes = self.browser.cite(citation)
        for note in notes:
            start = self.shown + offset
            self.annotations.append({**note, "start_index": note["start_index"] + start,
                                     "end_index": note["end_index"] + start})
        return text

    def flush(self) -> str:
        held, self.held = self.held, ""
        self.shown += len(held)
        return held

    def take(self) -> list[dict]:
        """The annotations completed since the last call."""
        new = self.annotations[self._taken:]
        self._taken = len(self.annotations)
        return new
