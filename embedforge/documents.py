"""Read one document file into records `{"_id", "title", "text"}` (before chunking).

.txt is one record; .md one record per section (split on headings, found by markdown-it, so a `#`
inside a code block is not a heading), titled by its heading path; .pdf one record with the
offsets where its pages start (pypdf); .html/.htm the page's main text (trafilatura, which drops
navigation, menus, scripts and footers: an export of a documentation site repeats its menu on
every page, and those repeats would be near-duplicate passages that mining takes for negatives).
A file that cannot give text raises `BadFile`, which the corpus reader turns into an error, or
into a recorded skip with --skip-bad-files.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

READERS_BY_SUFFIX = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".pdf": "pdf", ".html": "html", ".htm": "html"}


class BadFile(Exception):
    """A document without usable text: `reason` names the kind of problem (the skip report groups
    by it), `fix` what the user can do."""

    def __init__(self, reason: str, fix: str, detail: str = "") -> None:
        super().__init__(reason + (f": {detail}" if detail else ""))
        self.reason, self.fix = reason, fix


def read_document(path: Path, identifier: str) -> tuple[str, list[dict]]:
    """(kind, records) for one file; `identifier` (its path relative to the corpus folder) is the
    record id, with `#<heading path>` for Markdown sections."""
    kind = READERS_BY_SUFFIX[path.suffix.lower()]
    if kind == "pdf":
        return kind, [read_pdf(path, identifier)]
    if kind == "html":
        return kind, [read_html(path, identifier)]
    text = _read_utf8(path)
    if kind == "markdown":
        return kind, markdown_sections(text, identifier, path.stem)
    return kind, [{"_id": identifier, "title": path.stem, "text": text.strip()}] if text.strip() else []


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BadFile("not UTF-8 text", "re-encode it as UTF-8, remove it from the folder, or pass --skip-bad-files", str(error)) from error


def markdown_sections(text: str, identifier: str, stem: str) -> list[dict]:
    """One record per heading's section (text before the first heading: the file's own record).
    Ids use the heading path (`guide.md#install/linux`), so a section keeps its id when others are
    added above it; a repeated path gets `-2`, `-3`."""
    from markdown_it import MarkdownIt

    lines = text.splitlines()
    tokens = MarkdownIt("commonmark").parse(text)
    headings = []  # (first line, line after the heading, level, heading text)
    for position, token in enumerate(tokens):
        if token.type == "heading_open" and token.map:
            headings.append((token.map[0], token.map[1], int(token.tag[1]), tokens[position + 1].content.strip()))
    records, seen, path = [], {}, []
    bounds = [(0, 0, None, None)] + headings
    for number, (first, body_start, level, heading) in enumerate(bounds):
        body_end = bounds[number + 1][0] if number + 1 < len(bounds) else len(lines)
        if level is not None:
            path = [entry for entry in path if entry[0] < level] + [(level, heading)]
        body = "\n".join(lines[body_start:body_end]).strip()
        if not body:
            continue  # a heading right above a subheading: its words are in the subsection's title
        if level is None:
            records.append({"_id": identifier, "title": stem, "text": body})
            continue
        slug = "/".join(_slug(entry[1]) for entry in path)
        seen[slug] = seen.get(slug, 0) + 1
        suffix = f"-{seen[slug]}" if seen[slug] > 1 else ""
        records.append({"_id": f"{identifier}#{slug}{suffix}", "title": " > ".join(entry[1] for entry in path), "text": body})
    return records


def _slug(heading: str) -> str:
    return "-".join(re.findall(r"\w+", heading.lower())) or "section"


def read_pdf(path: Path, identifier: str) -> dict:
    """The text of every page, pages separated by a blank line; `page_starts` holds the offset
    where each page's text begins, so each chunk can name its pages."""
    import pypdf

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # it warns per malformed object; the outcome is what counts
    try:
        reader = pypdf.PdfReader(path, strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise BadFile("encrypted PDF", "decrypt it first (e.g. `qpdf --decrypt in.pdf out.pdf`), or pass --skip-bad-files")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        title = str((reader.metadata or {}).get("/Title") or "").strip()
    except BadFile:
        raise
    except Exception as error:  # pypdf raises many kinds on a damaged file; the user needs its message, not its type
        raise BadFile("unreadable PDF", "re-export or repair the file (e.g. `qpdf in.pdf out.pdf`), or pass --skip-bad-files", f"{type(error).__name__}: {error}") from error
    text, page_starts = "", []
    for number, page in enumerate(pages, start=1):
        if page:
            text += "\n\n" if text else ""
            page_starts.append((len(text), number))
            text += re.sub(r"\n{3,}", "\n\n", page)
    if not text:
        raise BadFile("PDF without a text layer", "it holds only images (a scan?): run OCR first (e.g. `ocrmypdf in.pdf out.pdf`), or pass --skip-bad-files")
    return {"_id": identifier, "title": title or path.stem, "text": text, "page_starts": page_starts}


def pages_of(page_starts: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """The page numbers that the text span [start, end) covers."""
    pages = []
    for index, (offset, number) in enumerate(page_starts):
        following = page_starts[index + 1][0] if index + 1 < len(page_starts) else float("inf")
        if offset < end and following > start:
            pages.append(number)
    return pages


# Page furniture that HTML marks as such. Pruned before extraction: on a short page trafilatura
# falls back to taking the whole body, menus included.
_HTML_FURNITURE = ["//nav", "//header", "//footer", "//aside", "//*[@role='navigation']", "//*[@role='banner']", "//*[@role='contentinfo']"]


def read_html(path: Path, identifier: str) -> dict:
    import trafilatura

    logging.getLogger("trafilatura").setLevel(logging.ERROR)
    import lxml.html

    content = path.read_bytes()
    # favor_recall: a short documentation page is content, not boilerplate to be dropped. No
    # metadata: its date parsing took 3/4 of the time, and the title is read below.
    document = trafilatura.bare_extraction(content, favor_recall=True, include_tables=True, include_comments=False, with_metadata=False,
                                           prune_xpath=_HTML_FURNITURE)
    text = (document.text if document is not None else "") or ""
    if not text.strip():
        raise BadFile("HTML without text", "the page has no readable text (only scripts or navigation?): remove it, or pass --skip-bad-files")
    try:
        page = lxml.html.fromstring(content)
        # The page's own heading names it; <title> often adds the site's name.
        title = " ".join((page.findtext(".//h1") or page.findtext(".//title") or "").split())
    except (ValueError, lxml.etree.ParserError):
        title = ""
    return {"_id": identifier, "title": title or path.stem, "text": text.strip()}
