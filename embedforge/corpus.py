"""Read a corpus in any supported layout and normalize it to BEIR passages.

Reads:  a BEIR folder (corpus.jsonl; its qrels with `read_qrels`); a JSONL, CSV, Parquet or Arrow
        file or a `datasets.save_to_disk` folder, with configurable fields; a folder (or one
        file) of .txt/.md/.pdf/.html documents (see embedforge.documents); or, when no corpus is
        given, the docstrings of the Python standard library installed on this machine (parsed
        with `ast`, never imported).
Writes: nothing itself; the run writes the result to `runs/<name>/corpus.jsonl` and the report
        (documents per kind, records cut, files skipped, lengths in tokens) to its manifest.
Keeps:  stable passage ids: a record's own id (a document's path relative to the folder, a
        Markdown section's `<path>#<heading path>`) when it fits the encoder, `<id>#<n>` for the
        passages of a record cut by tokens, so splits, caches and ledgers stay valid as a corpus
        grows.
"""

from __future__ import annotations

import ast
import bisect
import csv
import hashlib
import inspect
import re
import sysconfig
from pathlib import Path

from embedforge.chunking import token_spans, word_windows
from embedforge.config import CorpusConfig
from embedforge.documents import READERS_BY_SUFFIX, BadFile, pages_of, read_document
from embedforge.errors import EmbedforgeError
from embedforge.files import iter_jsonl
from embedforge.progress import progress_bar
from embedforge.text import passage_text

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


def load_corpus(config: CorpusConfig, tokenizer=None, max_seq_length: int | None = None, document_prompt: str = "") -> list[dict]:
    """Passages `{"_id", "title", "text"}` in a stable order; raises on empty or duplicate ids."""
    return read_corpus(config, tokenizer, max_seq_length, document_prompt)[0]


def read_corpus(config: CorpusConfig, tokenizer=None, max_seq_length: int | None = None, document_prompt: str = "") -> tuple[list[dict], dict]:
    """(passages, report). With a tokenizer (the base model's), records longer than the encoder
    reads are cut by its tokens (see `chunk_records`); the report counts documents read per kind,
    records cut, files skipped by reason and passage lengths in tokens."""
    report = {"documents": {}, "skipped": {}}
    source = config.corpus
    cut_records = True
    if source is None:
        records = stdlib_records()
        report["documents"]["docstring"] = len(records)
        where = "the Python standard library"
    else:
        source = Path(source)
        where = str(source)
        check_source(source)
        records = _source_records(source, config, report)
        # A BEIR corpus is a retrieval corpus already: its qrels name its ids, so it is cut only when asked.
        cut_records = not _is_beir(source) or bool(config.chunk_tokens)
    if cut_records:
        passages = chunk_records(records, config, tokenizer, max_seq_length, document_prompt, report)
    else:
        passages = [_passage(record) for record in records]
        report.update(records_cut=0, chunking="off: a BEIR corpus is kept as it is (pass --chunk-tokens N to cut it)")
    _check_unique(passages, where)
    if not passages:
        raise EmbedforgeError("The corpus has no passages with text", where=where, fix="point --corpus at files that contain text")
    limit = config.max_passages or (STDLIB_MAX_PASSAGES if source is None else None)
    if limit is not None and len(passages) > limit:
        # Keep a hash-chosen subset, so the same passages are kept whatever the file order.
        kept = set(sorted((unit_hash("keep:" + p["_id"]), p["_id"]) for p in passages)[:limit])
        kept_ids = {identifier for _, identifier in kept}
        passages = [p for p in passages if p["_id"] in kept_ids]
    report["passages"] = len(passages)
    lengths = report.pop("_token_lengths", {})
    if tokenizer is not None:
        report["tokens"] = _length_summary([lengths.get(p["_id"]) or passage_tokens(tokenizer, p, document_prompt) for p in passages], max_seq_length)
    return passages, report


CORPUS_KINDS = "a BEIR folder, a .jsonl/.csv/.parquet/.arrow file, a saved `datasets` folder, a document file or a folder of .txt/.md/.pdf/.html files"


def check_source(source: Path | None) -> None:
    """That the corpus path exists: checked before any model is loaded for its tokenizer."""
    if source is not None and not Path(source).exists():
        raise EmbedforgeError("Corpus path does not exist", where=str(source), fix=f"pass --corpus with {CORPUS_KINDS}")


def _is_beir(source: Path) -> bool:
    return source.is_dir() and (source / "corpus.jsonl").is_file()


def _is_saved_dataset(source: Path) -> bool:
    return source.is_dir() and any((source / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _source_records(source: Path, config: CorpusConfig, report: dict) -> list[dict]:
    fields = (config.id_field, config.text_field, config.title_field)
    suffix = source.suffix.lower()
    if _is_beir(source):
        kind, records = "beir record", _records(iter_jsonl(source / "corpus.jsonl"), source / "corpus.jsonl", "_id", "text", "title")
    elif _is_saved_dataset(source) or suffix in (".parquet", ".arrow"):
        kind, records = "dataset record", _records(_dataset_rows(source, fields), source, *fields)
    elif source.is_dir():
        return folder_records(source, config, report)
    elif suffix in READERS_BY_SUFFIX:
        return _document_records([source], source.parent, config, report)
    elif suffix == ".csv":
        kind, records = "csv record", _records(_iter_csv(source), source, *fields)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        kind, records = "jsonl record", _records(iter_jsonl(source), source, *fields)
    else:
        raise EmbedforgeError(f"Unknown corpus file type {source.suffix or '(no extension)'!r}", where=str(source), fix=f"pass --corpus with {CORPUS_KINDS}")
    report["documents"][kind] = len(records)
    return records


def _dataset_rows(source: Path, fields: tuple[str, str, str]):
    """Rows of a Parquet or Arrow file or a `datasets.save_to_disk` folder, columns checked first."""
    import datasets

    try:
        if source.suffix.lower() == ".parquet":
            import pyarrow.parquet

            table = pyarrow.parquet.read_table(source)
            columns = table.column_names
            select = lambda names: table.select(names).to_pylist()  # noqa: E731
        else:
            dataset = datasets.Dataset.from_file(str(source)) if source.is_file() else datasets.load_from_disk(str(source))
            if isinstance(dataset, datasets.DatasetDict):
                splits = list(dataset)
                if len(splits) != 1 and "train" not in splits:
                    raise EmbedforgeError(f"The saved dataset has several splits ({', '.join(splits)})", where=str(source),
                                          fix="save the split that holds the corpus on its own (`dataset[split].save_to_disk(...)`)")
                dataset = dataset["train" if "train" in splits else splits[0]]
            columns = dataset.column_names
            select = lambda names: dataset.select_columns(names).to_list()  # noqa: E731
    except EmbedforgeError:
        raise
    except Exception as error:  # pyarrow and datasets raise many kinds on a damaged file
        raise EmbedforgeError(f"Cannot read the corpus as a dataset ({type(error).__name__}: {str(error)[:200]})", where=str(source),
                              fix="check that the file is a complete Parquet / Arrow file or a folder written by `save_to_disk`") from error
    missing = [name for name in fields[:2] if name not in columns]
    if missing:
        flags = {fields[0]: "--id-field", fields[1]: "--text-field"}
        raise EmbedforgeError(f"The dataset has no column {', '.join(repr(name) for name in missing)} (it has {', '.join(repr(c) for c in columns)})",
                              where=str(source), fix=f"set {' / '.join(flags[name] for name in missing)} to the column names it uses")
    return select([name for name in dict.fromkeys(fields) if name in columns])


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


def folder_records(folder: Path, config: CorpusConfig, report: dict) -> list[dict]:
    """Records of every .txt/.md/.pdf/.html file under `folder`; other files are counted as skipped."""
    files = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            _skip(report, "hidden file", relative.as_posix())
        elif file.suffix.lower() in READERS_BY_SUFFIX:
            files.append(file)
        else:
            _skip(report, f"unsupported extension {file.suffix.lower() or '(none)'}", relative.as_posix())
    return _document_records(files, folder, config, report)


def _document_records(files: list[Path], folder: Path, config: CorpusConfig, report: dict) -> list[dict]:
    records = []
    for file in progress_bar(files, desc="reading documents", unit="file", show=len(files) > 50):
        relative = file.relative_to(folder).as_posix()
        try:
            kind, found = read_document(file, relative)
        except BadFile as problem:
            if not config.skip_bad_files:
                raise EmbedforgeError(f"Cannot take text from this file: {problem}", where=str(file), fix=problem.fix) from problem
            _skip(report, problem.reason, relative)
            continue
        report["documents"][kind] = report["documents"].get(kind, 0) + 1
        records.extend(found)
    return records


def _skip(report: dict, reason: str, relative: str) -> None:
    entry = report["skipped"].setdefault(reason, {"count": 0, "files": []})
    entry["count"] += 1
    if len(entry["files"]) < 20:  # enough to find them; the count says how many
        entry["files"].append(relative)


def chunk_records(records: list[dict], config: CorpusConfig, tokenizer, max_seq_length: int | None, document_prompt: str, report: dict) -> list[dict]:
    """Passages from records: a record that fits the encoder stays whole under its own id; a longer
    one is cut into `<id>#0`, `<id>#1`, ... by the tokenizer's tokens (or, with the deprecated
    --chunk-words, into word windows). Without a tokenizer, records stay whole."""
    return [passage for pieces in cut_records(records, config, tokenizer, max_seq_length, document_prompt, report) for passage in pieces]


def cut_records(records: list[dict], config: CorpusConfig, tokenizer, max_seq_length: int | None, document_prompt: str, report: dict) -> list[list[dict]]:
    """`chunk_records`, record by record: the passages each record became."""

    def named(record: dict, pieces: list[dict]) -> list[dict]:
        if len(pieces) == 1:
            return [{**pieces[0], "_id": record["_id"]}]
        return [{**piece, "_id": f"{record['_id']}#{n}"} for n, piece in enumerate(pieces)]

    if config.chunk_words:
        cut = [named(record, [_passage(record, text=window) for window in word_windows(record["text"], config.chunk_words)]) for record in records]
        report.update(records_cut=sum(len(pieces) > 1 for pieces in cut), chunking=f"{config.chunk_words} words (deprecated --chunk-words)")
        return cut
    if tokenizer is None or config.chunk_tokens == 0:
        report.update(records_cut=0, chunking="off" if config.chunk_tokens == 0 else "off: no tokenizer")
        return [[_passage(record)] for record in records]
    if not getattr(tokenizer, "is_fast", False):
        raise EmbedforgeError("The base model's tokenizer gives no token offsets (it is not a 'fast' tokenizer), so passages cannot be cut by tokens",
                              where=str(getattr(tokenizer, "name_or_path", "")), fix="pass --chunk-tokens 0 (no cutting) or --chunk-words N")
    room = tokenizer.num_special_tokens_to_add(False) + (len(tokenizer(document_prompt, add_special_tokens=False)["input_ids"]) if document_prompt else 0)
    cut, batch, lengths = [], 256, report.setdefault("_token_lengths", {})
    for start in progress_bar(range(0, len(records), batch), desc="cutting passages by tokens", unit="batch", show=len(records) > 5000):
        group = records[start : start + batch]
        encoded = tokenizer([r["text"] for r in group], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        titles = tokenizer([r["title"] for r in group], add_special_tokens=False, verbose=False)["input_ids"]
        for record, offsets, title in zip(group, encoded["offset_mapping"], titles):
            budget = config.chunk_tokens or max_seq_length or 512  # tokens as the encoder reads the passage
            limit = max(8, budget // 4, budget - room - len(title))
            spans = token_spans(record["text"], offsets, limit, min(config.chunk_overlap_tokens, limit // 2))
            pieces = named(record, [_passage(record, a, b) for a, b in spans])
            starts = [start for start, _ in offsets]
            for piece, (a, b) in zip(pieces, spans):
                # Counted from the offsets, so the report costs no second tokenization.
                lengths[piece["_id"]] = bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a) + len(title) + room
            cut.append(pieces)
    report.update(records_cut=sum(len(pieces) > 1 for pieces in cut),
                  chunking={"chunk_tokens": config.chunk_tokens or max_seq_length, "room": f"title + {room}",
                            "chunk_overlap_tokens": config.chunk_overlap_tokens, "tokenizer": str(getattr(tokenizer, "name_or_path", ""))})
    return cut


def _passage(record: dict, start: int = 0, end: int | None = None, text: str | None = None) -> dict:
    passage = {"_id": record["_id"], "title": record["title"], "text": (text if text is not None else record["text"][start:end]).strip()}
    if record.get("page_starts"):
        end = len(record["text"]) if end is None else end
        passage["metadata"] = {"pages": pages_of(record["page_starts"], start, end) if text is None else [n for _, n in record["page_starts"]]}
    return passage


def _check_unique(passages: list[dict], where: str) -> None:
    seen = set()
    for passage in passages:
        if passage["_id"] in seen:
            raise EmbedforgeError(f"Two passages have the id {passage['_id']!r} (a record cut into chunks is named <id>#<n>; another record has that id)",
                                  where=where, fix="make record ids unique, choose another --id-field, or pass --chunk-tokens 0")
        seen.add(passage["_id"])


def passage_tokens(tokenizer, passage: dict, document_prompt: str = "") -> int:
    """How many tokens the encoder gets for a passage (prompt, title, text, special tokens)."""
    return len(tokenizer(document_prompt + passage_text(passage), verbose=False)["input_ids"])


def _length_summary(lengths: list[int], max_seq_length: int | None) -> dict:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    summary = {"min": ordered[0], "median": ordered[len(ordered) // 2], "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1]}
    if max_seq_length:
        summary.update(max_seq_length=max_seq_length, over_max_seq_length=sum(length > max_seq_length for length in lengths))
    return summary


_NOUNS = {"pdf": "PDF file", "html": "HTML page", "markdown": "Markdown file", "text": "text file"}


def describe(report: dict) -> list[str]:
    """The report as lines for the screen."""
    documents = ", ".join(f"{count} {_NOUNS.get(kind, kind)}{'s' if count != 1 else ''}" for kind, count in report["documents"].items()) or "no document"
    lines = [f"read {documents}; {report['passages']} passages ({report.get('records_cut', 0)} records cut)"]
    for reason, entry in report["skipped"].items():
        shown = ", ".join(entry["files"][:3]) + (", ..." if entry["count"] > 3 else "")
        lines.append(f"skipped {entry['count']} file{'s' if entry['count'] != 1 else ''}: {reason} ({shown})")
    tokens = report.get("tokens")
    if tokens:
        over = f"; {tokens['over_max_seq_length']} over max_seq_length {tokens['max_seq_length']}, cut by the encoder" if tokens.get("over_max_seq_length") else ""
        lines.append(f"passage length in tokens: median {tokens['median']}, 90th percentile {tokens['p90']}, max {tokens['max']}{over}")
    return lines


def stdlib_records() -> list[dict]:
    """Module, class and function docstrings of the installed standard library, by parsing only."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & _STDLIB_SKIP) and not p.name.startswith("test_")
    )
    records, seen = [], set()
    for file in progress_bar(files, desc="reading stdlib docs", unit="file"):
        module = ".".join(file.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if any(part.startswith("_") and part != "__init__" for part in module.split(".")):
            continue  # private modules document implementation details
        try:
            tree = ast.parse(file.read_bytes(), filename=str(file))
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are deliberately invalid (test data)
        for qualified_name, docstring in _docstrings(tree, module):
            text = re.sub(r"\s+", " ", inspect.cleandoc(docstring)).strip()
            if len(text.split()) < _MIN_DOCSTRING_WORDS or qualified_name in seen:
                continue  # short ones say little; a name defined twice (per platform) keeps its first
            seen.add(qualified_name)
            records.append({"_id": qualified_name, "title": qualified_name, "text": text})
    return records


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
