"""The browser tool over a folder of test documents: search, open a result, find in it, the
citation format, and the errors, in the text formats of OpenAI's reference browser."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from oss_mlx.tools import Browser, HttpJson, LocalFolder, web_backend

TRIP = """# Trip to Lisbon

We stayed at the Hotel Avenida near the river. The tram 28 goes up to the castle.

## Food

Pastel de nata at Manteigaria was the best. Dinner at a small tasca in Alfama.
"""
GARDEN = """<html><head><title>Garden notes</title><script>var x = 1;</script></head><body>
<h1>Tomatoes</h1><p>Plant tomatoes in <b>May</b>, after the frost.
See <a href="../trip.md">the trip</a> and <a href="https://example.org/x">a site</a>.</p>
<ul><li>Water daily</li><li>Stake them</li></ul></body></html>"""


@pytest.fixture
def folder():
    # A short path: the page's "URL: file://..." line stays one line, as the expected texts say.
    tmp_path = Path(tempfile.mkdtemp(prefix="b"))
    root = tmp_path / "notes"
    (root / "garden").mkdir(parents=True)
    (root / "trip.md").write_text(TRIP)
    (root / "garden" / "page.html").write_text(GARDEN)
    (root / "compilers.txt").write_text("Parsers and compilers; nothing about travel.\n")
    (root / "image.png").write_bytes(b"\x89PNG")  # not a document: not indexed
    (tmp_path / "secret.md").write_text("# Secret\nThe tram password.\n")  # outside the folder
    yield root
    shutil.rmtree(tmp_path)


@pytest.fixture
def browser(folder, encoding):
    return Browser(LocalFolder(folder), encoding=encoding)


def test_search_open_find_and_cite(browser, folder):
    trip = (folder / "trip.md").resolve().as_uri()
    shown = browser.call("search", json.dumps({"query": "tram Lisbon"}))
    assert shown.startswith("[0] tram Lisbon\n**viewing lines [0 - ")
    lines = shown.split("\n\n", 1)[1].split("\n")
    assert lines[:4] == ["L0: ", "L1: URL: ", "L2: # Search Results", "L3: "]
    assert lines[4].startswith("L4:   * 【0†Trip to Lisbon†trip.md】 # Trip to Lisbon We stayed")
    assert "secret" not in shown.lower()  # a file outside the folder is never searched

    shown = browser.call("open", json.dumps({"id": 0}))
    head, body = shown.split("\n\n", 1)
    assert head == f"[1] Trip to Lisbon ({trip})\n**viewing lines [2 - 10] of 10**"
    assert body.split("\n")[:3] == ["L2: # Trip to Lisbon", "L3: ",
                                    "L4: We stayed at the Hotel Avenida near the river. The tram 28 goes up to the "]
    assert "L5: castle." in body  # wrapped at 80 columns, as the reference wraps

    shown = browser.call("find", json.dumps({"pattern": "NATA"}))
    assert shown == (
        f"[2] Find results for text: `nata` in `Trip to Lisbon` ({trip}/find?pattern=nata)\n"
        "**viewing lines [0 - 2] of 2**\n\n"
        "L0: # 【0†match at L9】\n"
        "L1: Pastel de nata at Manteigaria was the best. Dinner at a small tasca in Alfama.\n"
        "L2: "
    )
    text, notes = browser.cite("Hotel Avenida 【1†L4-L5】, nata 【2†L1】.")
    assert text == f"Hotel Avenida  ([trip.md]({trip})) , nata  ([trip.md]({trip})) ."
    assert notes[0] == {"type": "url_citation", "start_index": 14, "end_index": 14 + len(f" ([trip.md]({trip})) "),
                        "title": "trip.md", "url": trip}


def test_html_pages_and_their_links(browser, folder):
    shown = browser.call("search", json.dumps({"query": "tomatoes frost"}))
    assert ("L4:   * 【0†Garden notes†page.html】 # Tomatoes Plant tomatoes in May, after the \n"
            "L5: frost. See the trip and a site. * Water daily * Stake them") in shown
    shown = browser.call("open", json.dumps({"id": 0, "loc": 0}))
    assert shown.startswith(f"[1] Garden notes ({(folder / 'garden' / 'page.html').resolve().as_uri()})")
    assert "var x" not in shown  # scripts are not text
    assert "See 【0†the trip】 and 【1†a \nL5: site†example.org】.\nL6: \nL7:   * Water daily\nL8:   * Stake them" in shown
    shown = browser.call("open", json.dumps({"id": 0}))  # follow the link to the other file
    assert shown.startswith("[2] Trip to Lisbon (")
    shown = browser.call("open", json.dumps({"id": 1, "cursor": 1}))  # a web link: not opened
    assert shown == ("Error fetching URL `https://example.org/x`: the local folder backend opens "
                     "files of its folder only")


def test_cursors_scrolling_and_errors(browser, folder):
    assert browser.call("open", "{}") == "No pages to access!"
    browser.call("search", json.dumps({"query": "tram"}))
    browser.call("search", json.dumps({"query": "compilers"}))
    assert browser.call("open", json.dumps({"cursor": 0})).startswith("[2] tram\n")  # cursor 0 kept
    shown = browser.call("open", json.dumps({"id": 0, "cursor": 0, "loc": 7, "num_lines": 2}))
    assert shown.endswith("**viewing lines [7 - 8] of 10**\n\nL7: ## Food\nL8: ")
    assert browser.call("open", json.dumps({"cursor": 99})) == (
        "Cursor `99` is out of range. Available cursor indices: [0 - 3].")
    assert browser.call("open", json.dumps({"id": 7, "cursor": 0})) == "Invalid link id `7`."
    assert browser.call("open", json.dumps({"loc": 500})) == (
        "Invalid location parameter: `500`. Cannot exceed page maximum of 10.")
    assert browser.call("find", json.dumps({"pattern": "x", "cursor": 0})) == (
        "Cannot run `find` on search results page or find results page")
    outside = (folder.parent / "secret.md").resolve().as_uri()
    assert browser.call("open", json.dumps({"id": outside})) == (
        f"Error fetching URL `{outside}`: not a document in the folder")
    assert browser.call("open", json.dumps({"id": "../secret.md"})).endswith("not a document in the folder")
    assert browser.call("open", "not json") == '{"error": "Invalid function arguments"}'
    assert browser.call("open", '{"bogus": 1}') == '{"error": "Invalid function arguments"}'
    assert browser.call("click", "{}") == '{"error": "Unknown function: click"}'
    assert browser.call("find", json.dumps({"pattern": "zebra", "cursor": 3})).endswith(
        "L0: No `find` results for pattern: `zebra`")


def test_a_long_page_is_shown_a_view_at_a_time(tmp_path, encoding):
    (tmp_path / "long.txt").write_text("".join(f"line number {i} of a long document\n" for i in range(400)))
    b = Browser(LocalFolder(tmp_path), encoding=encoding)
    b.call("search", json.dumps({"query": "long document"}))
    shown = b.call("open", json.dumps({"id": 0, "loc": 0}))
    head = shown.split("\n")[1]
    last = int(head.split(" - ")[1].split("]")[0])
    assert 20 < last < 399  # about 1024 tokens' worth, not the whole page
    body = shown.split("\n\n", 1)[1]
    assert len(encoding.encode(body, disallowed_special=())) <= 1024 + 40


def _minimal_pdf(text: str) -> bytes:
    stream = f"BT /F1 24 Tf 72 700 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def test_pdf_documents_are_searched_with_pypdf(tmp_path, encoding):
    pytest.importorskip("pypdf")  # an optional dependency: without it PDFs are skipped
    (tmp_path / "report.pdf").write_bytes(_minimal_pdf("Quarterly report: revenue grew nine percent"))
    b = Browser(LocalFolder(tmp_path), encoding=encoding)
    assert "【0†report†report.pdf】 Quarterly report: revenue grew nine percent" in b.call(
        "search", json.dumps({"query": "revenue"}))
    assert "revenue grew nine percent" in b.call("open", json.dumps({"id": 0}))


class _Endpoint(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlparse(self.path)
        q = parse_qs(url.query)
        if url.path == "/search":
            body = {"results": [{"title": "Lisbon trams", "url": "https://trams.example/28",
                                 "snippet": f"about {q['q'][0]} ({q['n'][0]} asked)"}]}
        else:
            body = {"title": "Tram 28", "html": "<p>Tram 28 climbs to the castle.</p>"}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_a_configured_web_search_endpoint(encoding):
    assert web_backend(None) is None and web_backend({}) is None  # nothing configured: no web
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        backend = web_backend({"search_url": base + "/search", "fetch_url": base + "/fetch"})
        assert isinstance(backend, HttpJson)
        b = Browser(backend, encoding=encoding)
        shown = b.call("search", json.dumps({"query": "tram 28", "topn": 3}))
        assert "L4:   * 【0†Lisbon trams†trams.example】 about tram 28 (3 asked)" in shown
        shown = b.call("open", json.dumps({"id": 0}))
        assert shown.startswith("[1] Tram 28 (https://trams.example/28)\n")
        assert "L1: URL: https://trams.example/28" in shown and "Tram 28 climbs to the castle." in shown
    finally:
        server.shutdown()
        server.server_close()  # the port refuses connections from now on
    dead = Browser(HttpJson(base + "/search"), encoding=encoding)
    assert dead.call("search", '{"query": "x"}').startswith("Error during search for `x`: ")
