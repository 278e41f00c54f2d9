"""Reading the documents of a local folder for the browser: text, Markdown, HTML, and PDF.

PDF is read with pypdf (pure Python, no dependencies, maintained) when it is installed; without
it PDFs are skipped, and `pdf_support()` says so. Everything else is the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".org"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
MAX_BYTES = 32 << 20  # larger files are left out of the index


@dataclass
class Document:
    path: Path
    title: str
    text: str  # plain text (HTML: the raw markup; see `html`)
    html: bool = False


def pdf_support() -> tuple[bool, str]:
    try:
        import pypdf  # noqa: F401
    except ImportError:
        return False, "PDFs are skipped: pip install pypdf to read them"
    return True, "PDFs are read with pypdf"


def suffixes() -> set[str]:
    return TEXT_SUFFIXES | HTML_SUFFIXES | (PDF_SUFFIXES if pdf_support()[0] else set())


def _title_from_text(text: str, path: Path) -> str:
    for line in text.splitlines()[:40]:
        m = re.match(r"\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", line)  # a Markdown heading
        if m:
            return m.group(1)
    return path.stem


def _pdf_text(path: Path) -> tuple[str, str]:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    pages = [(p.extract_text() or "").strip() for p in reader.pages]
    title = ""
    if reader.metadata is not None and reader.metadata.title:
        title = str(reader.metadata.title)
    return "\n\n".join(p for p in pages if p), title


def read(path: Path) -> Document | None:
    """The document at `path`, or None when it is not one the browser reads."""
    suffix = path.suffix.lower()
    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        if suffix in TEXT_SUFFIXES:
            text = path.read_text("utf-8", errors="replace")
            return Document(path, _title_from_text(text, path), text)
        if suffix in HTML_SUFFIXES:
            html = path.read_text("utf-8", errors="replace")
            m = re.search(r"<title[^>]*>(.*?)</title>", html, re.I | re.S)
            title = " ".join(m.group(1).split()) if m else path.stem
            return Document(path, title or path.stem, html, html=True)
        if suffix in PDF_SUFFIXES and pdf_support()[0]:
            text, title = _pdf_text(path)
            return Document(path, title or path.stem, text)
    except (OSError, ValueError):
        return None
    except Exception:  # noqa: BLE001 - a broken PDF must not stop the index
        return None
    return None
