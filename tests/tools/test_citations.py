"""Citations turned into links as an answer streams: whatever the pieces, the text shown and
its annotations are those Browser.cite gives for the whole answer at once (the oracle)."""

from __future__ import annotations

import pytest

from oss_mlx.tools import Browser, LocalFolder
from oss_mlx.tools.citations import CitationStream
from support.tooluse import write_notes

ANSWER = ("Take the tram 28 【1†L4-L5】, then walk 【2†L0】. Not a citation: 【 or "
          "【x†y】 or 【9†L1】 (no such page), and a bracket at the very end 【1†L2")


@pytest.fixture
def browser(tmp_path, encoding):
    b = Browser(LocalFolder(write_notes(tmp_path)), encoding=encoding)
    b.call("search", '{"query": "tram"}')
    b.call("open", '{"id": 0}')
    b.call("find", '{"pattern": "tram"}')
    return b


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(ANSWER)])
def test_streamed_citations_match_cite(browser, size):
    cites = CitationStream(browser)
    shown, notes = "", []
    for i in range(0, len(ANSWER), size):
        shown += cites.feed(ANSWER[i:i + size])
        notes += cites.take()
    shown += cites.flush()
    expected, expected_notes = browser.cite(ANSWER)
    assert shown == expected and notes == expected_notes
    assert len(notes) == 2 and all(shown[n["start_index"]:n["end_index"]].startswith(" ([trip.md](")
                                   for n in notes)
    assert shown.endswith("【9†L1】 (no such page), and a bracket at the very end 【1†L2")


def test_no_browser_passes_text_through():
    cites = CitationStream(None)
    assert cites.feed("a 【1†L2】 b") == "a 【1†L2】 b"
    assert cites.flush() == "" and cites.take() == []
