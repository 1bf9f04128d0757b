"""Corpus reading speed: folders of PDF and HTML files, and a JSONL corpus cut by tokens.

Three corpora, each read by embedforge's corpus reader (what `embedforge run` does before any
stage) and by a plain reference in the same run, alternating over --rounds:
  pdf    200 generated PDFs of 3 pages (tests/pdf_writer.py); reference: `pypdf.PdfReader` +
         `extract_text` per page;
  html   2,000 generated HTML pages (menu, article, footer); reference: `trafilatura.extract`
         per page;
  jsonl  ../shared/data/nfcorpus/corpus.jsonl (3,633 passages; else 2,000 synthetic ones);
         reference: reading the file.
Ours cuts every record by all-MiniLM-L6-v2's tokens (nfcorpus with --chunk-tokens 256); each
reference then runs the same tokenizer over its texts (offsets on), which any token-aware
cutting needs: the ratio is what our reader adds to the libraries' work.
The page texts are nfcorpus abstracts when present, else synthetic sentences.
Default size: 200 PDFs, 2,000 HTML pages, nfcorpus whole, 2 rounds.
Ends with `RESULT pdf_per_second=<documents/s> pdf_ratio=<ours/reference time> html_per_second=...
html_ratio=... jsonl_passages_per_second=<passages made/s> jsonl_ratio=...`; goal: every ratio <= 1.2
(reading is the libraries' work; ours adds little).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT.parent / "shared" / "data" / "nfcorpus" / "corpus.jsonl"

from pdf_writer import write_pdf  # noqa: E402

from embedforge.config import CorpusConfig  # noqa: E402
from embedforge.corpus import read_corpus  # noqa: E402
from embedforge.files import iter_jsonl  # noqa: E402

PAGE = """<html><head><title>{title}</title><script>var page = {number};</script></head><body>
<nav><a href="/">Home</a> <a href="/docs">Documentation</a> <a href="/blog">Blog</a></nav>
<main><h1>{title}</h1>{paragraphs}</main><footer>Copyright 2026, all rights reserved.</footer></body></html>"""


def texts(count: int) -> list[dict]:
    if DATA.exists():
        rows = [row for row in iter_jsonl(DATA) if row.get("text")]
        return [rows[i % len(rows)] for i in range(count)]
    generator = random.Random(0)
    words = "protein cell cancer diet risk study vitamin blood heart trial dose effect patients women fiber".split()
    return [{"_id": f"s{i}", "title": f"study {i}", "text": ". ".join(" ".join(generator.choices(words, k=12)) for _ in range(10)) + "."} for i in range(count)]


def build(folder: Path, pdfs: int, pages: int) -> tuple[Path, Path]:
    pdf_folder, html_folder = folder / "pdf", folder / "html"
    pdf_folder.mkdir(), html_folder.mkdir()
    rows = texts(max(pdfs * 3, pages))
    for number in range(pdfs):
        write_pdf(pdf_folder / f"doc{number:04d}.pdf", [rows[3 * number + page]["text"] for page in range(3)], title=rows[3 * number]["title"])
    for number in range(pages):
        row = rows[number]
        sentences = row["text"].split(". ")
        paragraphs = "".join(f"<p>{'. '.join(sentences[i:i + 3])}</p>" for i in range(0, len(sentences), 3))
        (html_folder / f"page{number:05d}.html").write_text(PAGE.format(title=row["title"], number=number, paragraphs=paragraphs), encoding="utf-8")
    return pdf_folder, html_folder


def reference_pdf(folder: Path) -> list[str]:
    import pypdf

    return ["\n\n".join(page.extract_text() for page in pypdf.PdfReader(path).pages) for path in sorted(folder.glob("*.pdf"))]


def reference_html(folder: Path) -> list[str]:
    import trafilatura

    return [trafilatura.extract(path.read_bytes(), include_tables=True) or "" for path in sorted(folder.glob("*.html"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdfs", type=int, default=200)
    parser.add_argument("--pages", type=int, default=2000, help="HTML pages")
    parser.add_argument("--rounds", type=int, default=2)
    arguments = parser.parse_args()
    from embedforge.embeddings import load_model

    model = load_model("all-MiniLM-L6-v2")
    tokenizer, max_seq_length = model.tokenizer, model.max_seq_length
    with tempfile.TemporaryDirectory() as temporary:
        pdf_folder, html_folder = build(Path(temporary), arguments.pdfs, arguments.pages)
        if DATA.exists():
            jsonl = DATA.parent
        else:
            jsonl = Path(temporary) / "synthetic.jsonl"
            jsonl.write_text("".join(json.dumps(row) + "\n" for row in texts(2000)), encoding="utf-8")
        jsonl_texts = [row["title"] + " " + row["text"] for row in iter_jsonl(jsonl / "corpus.jsonl" if jsonl.is_dir() else jsonl)]

        def ours(kind: str) -> int:
            if kind == "pdf":
                return len(read_corpus(CorpusConfig(corpus=pdf_folder), tokenizer, max_seq_length)[0])
            if kind == "html":
                return len(read_corpus(CorpusConfig(corpus=html_folder), tokenizer, max_seq_length)[0])
            return len(read_corpus(CorpusConfig(corpus=jsonl, chunk_tokens=256), tokenizer, max_seq_length)[0])

        def reference(kind: str) -> int:
            found = reference_pdf(pdf_folder) if kind == "pdf" else reference_html(html_folder) if kind == "html" else jsonl_texts
            for start in range(0, len(found), 256):  # what any token-aware cutting needs
                tokenizer(found[start : start + 256], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            return len(found)

        for kind in ("pdf", "html", "jsonl"):  # imports and first-call costs, outside every timing
            ours(kind), reference(kind)
        seconds = {(kind, side): [] for kind in ("pdf", "html", "jsonl") for side in ("ours", "reference")}
        made = {}
        for round_number in range(arguments.rounds):
            for kind in ("pdf", "html", "jsonl"):
                order = ("ours", "reference") if round_number % 2 == 0 else ("reference", "ours")
                for side in order:
                    started = time.perf_counter()
                    count = ours(kind) if side == "ours" else reference(kind)
                    seconds[kind, side].append(time.perf_counter() - started)
                    if side == "ours":
                        made[kind] = count
                print(f"round {round_number + 1} {kind:5}: ours {seconds[kind, 'ours'][-1]:.2f}s ({made[kind]} passages), reference {seconds[kind, 'reference'][-1]:.2f}s")
    documents = {"pdf": arguments.pdfs, "html": arguments.pages, "jsonl": len(jsonl_texts)}
    figures = {}
    for kind in ("pdf", "html", "jsonl"):
        ours_seconds, reference_seconds = statistics.median(seconds[kind, "ours"]), statistics.median(seconds[kind, "reference"])
        print(f"{kind}: {documents[kind]} documents -> {made[kind]} passages; ours {documents[kind] / ours_seconds:.1f} documents/s "
              f"({made[kind] / ours_seconds:.1f} passages/s), reference {documents[kind] / reference_seconds:.1f} documents/s")
        figures[kind] = (documents[kind] / ours_seconds, made[kind] / ours_seconds, ours_seconds / reference_seconds)
    print(f"RESULT pdf_per_second={figures['pdf'][0]:.1f} pdf_ratio={figures['pdf'][2]:.2f} html_per_second={figures['html'][0]:.1f} "
          f"html_ratio={figures['html'][2]:.2f} jsonl_passages_per_second={figures['jsonl'][1]:.1f} jsonl_ratio={figures['jsonl'][2]:.2f}")


if __name__ == "__main__":
    main()
