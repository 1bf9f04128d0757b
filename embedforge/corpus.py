"""Read a corpus in any supported layout and normalize it to BEIR passages.

Reads:  a BEIR folder (corpus.jsonl; its qrels with `read_qrels`), a JSONL or CSV file with configurable fields, a folder of
        .txt/.md files, or, when no corpus is given, the docstrings of the Python standard
        library installed on this machine (parsed with `ast`, never imported).
Writes: nothing itself; the run writes the result to `runs/<name>/corpus.jsonl`.
Keeps:  stable passage ids (`<relative path>#<n>` for chunked files), so splits, caches and
        ledgers stay valid as a corpus grows.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import inspect
import re
import sysconfig
from pathlib import Path

from tqdm.auto import tqdm

from embedforge.config import CorpusConfig
from embedforge.errors import EmbedforgeError
from embedforge.files import iter_jsonl

STDLIB_MAX_PASSAGES = 2500
_MIN_DOCSTRING_WORDS = 12
# Skipped stdlib folders: tests and vendored tools are not documentation.
_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__", "ensurepip", "pydoc_data"}


def unit_hash(text: str) -> float:
    """A number in [0, 1) from the text's sha256: stable across machines and corpus growth."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(passage_id: str, dev_fraction: float, test_fraction: float) -> str:
    value = unit_hash("split:" + passage_id)
    if value < test_fraction:
        return "test"
    if value < test_fraction + dev_fraction:
        return "dev"
    return "train"


def chunk_words(text: str, size: int) -> list[str]:
    words = text.split()
    return [" ".join(words[start : start + size]) for start in range(0, len(words), size)]


def load_corpus(config: CorpusConfig) -> list[dict]:
    """Passages `{"_id", "title", "text"}` in a stable order; raises on empty or duplicate ids."""
    source = config.corpus
    if source is None:
        passages = stdlib_passages(config.chunk_words)
        limit = config.max_passages or STDLIB_MAX_PASSAGES
        where = "the Python standard library"
    else:
        source = Path(source)
        where = str(source)
        if not source.exists():
            raise EmbedforgeError("Corpus path does not exist", where=where, fix="pass --corpus with a BEIR folder, a .jsonl/.csv file or a folder of .txt/.md files")
        if source.is_dir() and (source / "corpus.jsonl").is_file():
            passages = _records(iter_jsonl(source / "corpus.jsonl"), source / "corpus.jsonl", "_id", "text", "title")
        elif source.is_dir():
            passages = folder_passages(source, config.chunk_words)
        elif source.suffix.lower() == ".csv":
            passages = _records(_iter_csv(source), source, config.id_field, config.text_field, config.title_field)
        else:
            passages = _records(iter_jsonl(source), source, config.id_field, config.text_field, config.title_field)
        limit = config.max_passages
    if not passages:
        raise EmbedforgeError("The corpus has no passages with text", where=where, fix="point --corpus at files that contain text")
    if limit is not None and len(passages) > limit:
        # Keep a hash-chosen subset, so the same passages are kept whatever the file order.
        kept = set(sorted((unit_hash("keep:" + p["_id"]), p["_id"]) for p in passages)[:limit])
        kept_ids = {identifier for _, identifier in kept}
        passages = [p for p in passages if p["_id"] in kept_ids]
    return passages


def _records(rows, path: Path, id_field: str, text_field: str, title_field: str) -> list[dict]:
    passages, seen = [], {}
    for line_number, row in enumerate(rows, start=1):
        if id_field not in row or text_field not in row:
            missing = [name for name in (id_field, text_field) if name not in row]
            raise EmbedforgeError(
                f"Record {line_number} has no field {', '.join(repr(m) for m in missing)} (it has {', '.join(repr(k) for k in row)})",
                where=f"{path}, record {line_number}",
                fix="set --id-field / --text-field to the names your file uses",
            )
        identifier = str(row[id_field])
        if identifier in seen:
            raise EmbedforgeError(
                f"Duplicate passage id {identifier!r} (first at record {seen[identifier]})",
                where=f"{path}, record {line_number}",
                fix="make ids unique, or choose another --id-field",
            )
        seen[identifier] = line_number
        text = str(row[text_field] or "").strip()
        if text:
            passages.append({"_id": identifier, "title": str(row.get(title_field) or "").strip(), "text": text})
    return passages


def _iter_csv(path: Path):
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            yield from csv.DictReader(handle)
    except UnicodeDecodeError as error:
        raise EmbedforgeError("The file is not UTF-8 text", where=str(path), fix="re-encode the file as UTF-8") from error


def folder_passages(folder: Path, size: int) -> list[dict]:
    passages = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in {".txt", ".md"}):
        relative = file.relative_to(folder).as_posix()
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise EmbedforgeError("The file is not UTF-8 text", where=str(file), fix="re-encode it as UTF-8 or remove it from the folder") from error
        for index, chunk in enumerate(chunk_words(text, size)):
            passages.append({"_id": f"{relative}#{index}", "title": file.stem, "text": chunk})
    return passages


def stdlib_passages(size: int) -> list[dict]:
    """Module, class and function docstrings of the installed standard library, by parsing only."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & _STDLIB_SKIP) and not p.name.startswith("test_")
    )
    passages = []
    for file in tqdm(files, desc="reading stdlib docs", unit="file", disable=None):
        module = ".".join(file.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if any(part.startswith("_") and part != "__init__" for part in module.split(".")):
            continue  # private modules document implementation details
        try:
            tree = ast.parse(file.read_bytes(), filename=str(file))
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are deliberately invalid (test data)
        for qualified_name, docstring in _docstrings(tree, module):
            text = re.sub(r"\s+", " ", inspect.cleandoc(docstring)).strip()
            if len(text.split()) < _MIN_DOCSTRING_WORDS:
                continue
            for index, chunk in enumerate(chunk_words(text, size)):
                passages.append({"_id": f"{qualified_name}#{index}", "title": qualified_name, "text": chunk})
    return passages


def _docstrings(tree: ast.Module, module: str):
    docstring = ast.get_docstring(tree, clean=False)
    if docstring:
        yield module, docstring
    stack = [(node, module) for node in tree.body]
    while stack:
        node, prefix = stack.pop(0)
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            name = f"{prefix}.{node.name}"
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                yield name, docstring
            if isinstance(node, ast.ClassDef):
                stack.extend((child, name) for child in node.body)


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise EmbedforgeError("Qrels file not found", where=str(path), fix="an eval set needs qrels/test.tsv (query-id, corpus-id, score)") from error
    for number, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if not line.strip() or (number == 1 and not fields[-1].strip().lstrip("-").isdigit()):
            continue  # blank lines and the header
        if len(fields) != 3 or not fields[2].strip().lstrip("-").isdigit():
            raise EmbedforgeError("Qrels lines need three tab-separated fields: query-id, corpus-id, integer score", where=f"{path}, line {number}", fix="fix that line")
        qrels.setdefault(fields[0], {})[fields[1]] = int(fields[2])
    return qrels
