"""Raw corpora as users have them: PDF, HTML, Markdown sections, Parquet and saved datasets, cut by tokens.

Every document is built here (PDFs by tests/pdf_writer.py), nothing is downloaded.
"""

import shutil

import pytest

from conftest import make_passages
from embedforge.chunking import token_spans
from embedforge.config import CorpusConfig
from embedforge.corpus import describe, read_corpus
from embedforge.documents import markdown_sections
from embedforge.errors import EmbedforgeError
from pdf_writer import write_pdf


HTML = """<html><head><title>Widget guide</title><script>var tracking = "script words";</script></head><body>
<nav><a href="/">Home</a> <a href="/docs">Docs menu entry</a></nav>
<main><h1>Installing the widget</h1><p>{text}</p></main>
<footer>Copyright footer words</footer></body></html>"""


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_model, device="cpu")
    return model.tokenizer, model.max_seq_length


def test_a_folder_of_pdf_html_markdown_and_text(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    write_pdf(docs / "paper.pdf", ["First page about the apple orchard.", "", "Third page about the river harbor."], title="Orchard paper")
    (docs / "sub" / "page.html").write_text(HTML.format(text="Run the installer and follow the prompts."), encoding="utf-8")
    (docs / "guide.md").write_text("Intro before any heading.\n\n# Install\n\n## Linux\n\nUse apt.\n\n```\n# a comment, not a heading\n```\n\n## Linux\n\nOr snap.\n", encoding="utf-8")
    (docs / "notes.txt").write_text("plain notes", encoding="utf-8")
    (docs / "table.docx").write_bytes(b"PK")
    (docs / ".hidden.txt").write_text("hidden", encoding="utf-8")

    passages, report = read_corpus(CorpusConfig(corpus=docs))
    by_id = {p["_id"]: p for p in passages}
    assert sorted(by_id) == ["guide.md", "guide.md#install/linux", "guide.md#install/linux-2", "notes.txt", "paper.pdf", "sub/page.html"]
    pdf = by_id["paper.pdf"]
    assert pdf["title"] == "Orchard paper" and pdf["metadata"] == {"pages": [1, 3]}
    assert "apple orchard" in pdf["text"] and "river harbor" in pdf["text"]
    html = by_id["sub/page.html"]["text"]
    assert "Run the installer" in html and not any(noise in html for noise in ("script words", "menu entry", "footer words"))
    linux = by_id["guide.md#install/linux"]
    assert linux["title"] == "Install > Linux" and "# a comment, not a heading" in linux["text"]
    assert by_id["guide.md"] == {"_id": "guide.md", "title": "guide", "text": "Intro before any heading."}
    assert report["documents"] == {"markdown": 1, "text": 1, "pdf": 1, "html": 1}
    assert report["skipped"] == {"unsupported extension .docx": {"count": 1, "files": ["table.docx"]}, "hidden file": {"count": 1, "files": [".hidden.txt"]}}
    assert any("skipped 1 file: unsupported extension .docx (table.docx)" == line for line in describe(report))


def test_markdown_section_ids_stay_when_a_section_is_added_above():
    before = markdown_sections("# A\n\ntext a\n\n# B\n\ntext b\n", "f.md", "f")
    after = markdown_sections("# New\n\nnew text\n\n# A\n\ntext a\n\n# B\n\ntext b\n", "f.md", "f")
    assert [r["_id"] for r in before] == ["f.md#a", "f.md#b"]
    assert {r["_id"]: r["text"] for r in before}.items() <= {r["_id"]: r["text"] for r in after}.items()


def _bad_pdfs(folder):
    import pypdf

    write_pdf(folder / "scan.pdf", ["", ""])
    good = write_pdf(folder / "good.pdf", ["Readable text on the only page."])
    (folder / "truncated.pdf").write_bytes(good.read_bytes()[:60])
    writer = pypdf.PdfWriter(clone_from=good)
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    writer.write(folder / "locked.pdf")
    (folder / "empty.html").write_text("<html><head><script>var only = 1;</script></head><body></body></html>", encoding="utf-8")
    (folder / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))


@pytest.mark.parametrize("name, message, fix", [
    ("scan.pdf", "PDF without a text layer", "OCR"),
    ("truncated.pdf", "unreadable PDF", "repair"),
    ("locked.pdf", "encrypted PDF", "qpdf --decrypt"),
    ("empty.html", "HTML without text", "--skip-bad-files"),
    ("latin.txt", "not UTF-8 text", "UTF-8"),
])
def test_a_bad_document_is_an_error_naming_it_or_a_recorded_skip(tmp_path, name, message, fix):
    everything = tmp_path / "all"
    everything.mkdir()
    _bad_pdfs(everything)
    alone = tmp_path / "one"
    alone.mkdir()
    shutil.copy(everything / "good.pdf", alone)
    shutil.copy(everything / name, alone)
    with pytest.raises(EmbedforgeError, match=message) as caught:
        read_corpus(CorpusConfig(corpus=alone))
    assert caught.value.where == str(alone / name) and fix in caught.value.fix and "--skip-bad-files" in caught.value.fix
    passages, report = read_corpus(CorpusConfig(corpus=alone, skip_bad_files=True))
    assert [p["_id"] for p in passages] == ["good.pdf"]
    assert report["skipped"] == {message: {"count": 1, "files": [name]}}


def _write_table(path, rows):
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def test_parquet_arrow_and_saved_dataset_corpora(tmp_path):
    import datasets

    rows = [{"id": "a", "body": "first text", "name": "A", "extra": 1}, {"id": "b", "body": "second text", "name": "", "extra": 2}]
    expected = [{"_id": "a", "title": "A", "text": "first text"}, {"_id": "b", "title": "", "text": "second text"}]
    fields = dict(id_field="id", text_field="body", title_field="name")
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in (_write_table(tmp_path / "c.parquet", rows), tmp_path / "saved", tmp_path / "saved_dict", arrow):
        passages, report = read_corpus(CorpusConfig(corpus=source, **fields))
        assert passages == expected, source
        assert report["documents"] == {"dataset record": 2}
    with pytest.raises(EmbedforgeError, match=r"no column 'text' \(it has 'id', 'body', 'name', 'extra'\)") as caught:
        read_corpus(CorpusConfig(corpus=tmp_path / "c.parquet", id_field="id"))
    assert "--text-field" in caught.value.fix


def test_unknown_corpus_file_type_is_an_error(tmp_path):
    (tmp_path / "corpus.xlsx").write_bytes(b"x")
    with pytest.raises(EmbedforgeError, match="Unknown corpus file type '.xlsx'"):
        read_corpus(CorpusConfig(corpus=tmp_path / "corpus.xlsx"))


def _offsets(text):
    import re

    return [match.span() for match in re.finditer(r"\w+|[^\w\s]", text)]


def test_token_spans_cut_at_paragraph_then_sentence_then_word():
    text = "one two three. four five six\n\nseven eight nine ten eleven twelve"
    offsets = _offsets(text)  # 13 tokens, the paragraph break before token 7
    assert [text[a:b] for a, b in token_spans(text, offsets, 9)] == ["one two three. four five six", "seven eight nine ten eleven twelve"]
    text = "one two three. four five six seven eight nine ten"
    assert [text[a:b] for a, b in token_spans(text, _offsets(text), 8)][0] == "one two three."
    text = "one two three four five six seven eight nine ten"
    spans = token_spans(text, _offsets(text), 4)
    assert [text[a:b] for a, b in spans] == ["one two three four", "five six seven eight", "nine ten"]
    overlapping = [text[a:b] for a, b in token_spans(text, _offsets(text), 4, overlap=1)]
    assert overlapping[:2] == ["one two three four", "four five six seven"]
    assert token_spans("short", _offsets("short"), 4) == [(0, 5)]


def test_records_longer_than_the_encoder_are_cut_by_its_tokens(tmp_path, tiny_tokenizer):
    from embedforge.files import write_jsonl
    from embedforge.text import passage_text

    tokenizer, max_seq_length = tiny_tokenizer
    short, long = make_passages(2)
    long = {**long, "text": " ".join(f"{p['text']}." for p in make_passages(12))}  # ~400 tokens of sentences
    write_jsonl(tmp_path / "c.jsonl", [short, long])
    passages, report = read_corpus(CorpusConfig(corpus=tmp_path / "c.jsonl"), tokenizer, max_seq_length)
    pieces = [p for p in passages if p["_id"].startswith(long["_id"] + "#")]
    assert passages[0] == short and len(pieces) >= 6 and [p["_id"] for p in pieces] == [f"{long['_id']}#{n}" for n in range(len(pieces))]
    lengths = [len(tokenizer(passage_text(p))["input_ids"]) for p in pieces]
    assert max(lengths) <= max_seq_length and min(lengths[:-1]) > max_seq_length // 2
    assert all(p["text"].endswith(".") for p in pieces)  # cut at sentence ends
    assert " ".join(p["text"] for p in pieces) == long["text"]  # nothing lost, nothing repeated
    assert report["records_cut"] == 1 and report["tokens"]["max"] <= max_seq_length and report["tokens"]["over_max_seq_length"] == 0
    fixed, _ = read_corpus(CorpusConfig(corpus=tmp_path / "c.jsonl", chunk_tokens=20, chunk_overlap_tokens=5), tokenizer, max_seq_length)
    fixed_pieces = [p["text"] for p in fixed if p["_id"].startswith(long["_id"] + "#")]
    assert len(fixed_pieces) > len(pieces) and fixed_pieces[0].split()[-1] in fixed_pieces[1]  # the overlap repeats the end
    whole, _ = read_corpus(CorpusConfig(corpus=tmp_path / "c.jsonl", chunk_tokens=0), tokenizer, max_seq_length)
    assert whole == [short, long]


def test_a_beir_corpus_is_cut_only_when_asked(tmp_path, tiny_tokenizer):
    from embedforge.files import write_jsonl

    tokenizer, max_seq_length = tiny_tokenizer
    long = {"_id": "d1", "title": "t", "text": " ".join(f"{p['text']}." for p in make_passages(12))}
    write_jsonl(tmp_path / "beir" / "corpus.jsonl", [long])
    assert [p["_id"] for p in read_corpus(CorpusConfig(corpus=tmp_path / "beir"), tokenizer, max_seq_length)[0]] == ["d1"]
    assert len(read_corpus(CorpusConfig(corpus=tmp_path / "beir", chunk_tokens=40), tokenizer, max_seq_length)[0]) > 1


def _corpus_of_kind(kind, folder):
    import datasets

    passages = make_passages()
    if kind == "documents":
        folder.mkdir()
        for index, passage in enumerate(passages):
            name = f"{passage['_id']}"
            if index % 4 == 0:
                write_pdf(folder / f"{name}.pdf", [passage["text"]], title=passage["title"])
            elif index % 4 == 1:
                (folder / f"{name}.html").write_text(HTML.format(text=passage["text"]).replace("Installing the widget", passage["title"]), encoding="utf-8")
            elif index % 4 == 2:
                (folder / f"{name}.md").write_text(f"# {passage['title']}\n\n{passage['text']}\n", encoding="utf-8")
            else:
                (folder / f"{name}.txt").write_text(passage["text"], encoding="utf-8")
        return folder
    if kind == "parquet":
        return _write_table(folder.with_suffix(".parquet"), passages)
    datasets.Dataset.from_list(passages).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("kind", ["documents", "parquet", "saved dataset"])
def test_each_corpus_kind_runs_end_to_end(tmp_path, tiny_model, kind):
    from conftest import passage_responder
    from embedforge import runs
    from embedforge.config import load_config
    from embedforge.files import iter_jsonl, read_json
    from fake_llm import FakeChatModel

    corpus = _corpus_of_kind(kind, tmp_path / "corpus")
    config = load_config(None, dict(corpus=corpus, run=tmp_path / "run", cache=tmp_path / "cache", base_model=tiny_model, min_pairs=15, round_trip_k=0,
                                    dev_fraction=0.2, test_fraction=0.2, batch_size=4, bootstrap_resamples=100, num_negatives=2, min_steps=0, encode_backend="torch"))
    lines = []
    llm = FakeChatModel(lambda messages, call: passage_responder({"messages": messages}))
    runs.run(config, llm_factory=lambda generate_config, seed: llm, echo=lines.append)
    written = list(iter_jsonl(tmp_path / "run" / "corpus.jsonl"))
    assert len(written) == 40 and (tmp_path / "run" / runs.MODEL).is_dir() and (tmp_path / "run" / runs.RESULTS).is_file()
    report = read_json(tmp_path / "run" / "manifest.json")["corpus"]
    expected = {"pdf": 10, "html": 10, "markdown": 10, "text": 10} if kind == "documents" else {"dataset record": 40}
    assert report["documents"] == expected and report["passages"] == 40
    assert report["tokens"]["max"] <= report["tokens"]["max_seq_length"]
    assert any(line.startswith("corpus: read ") for line in lines) and any(line.startswith("corpus: passage length in tokens") for line in lines)


def test_a_cut_eval_set_ranks_each_document_at_its_best_passage(tmp_path):
    from embedforge.evaluate import EvalSet, bm25_retrieve, cut_documents, evaluate_model
    from embedforge.evaluate.retrieval import _depth

    documents = [
        {"_id": "A", "title": "", "text": "granite quarry stone. violin bow strings music"},
        {"_id": "B", "title": "", "text": "violin maker workshop"},
        {"_id": "C", "title": "", "text": "river delta mud"},
    ]
    eval_set = EvalSet(name="labelled", source="test", passages=documents, queries={"q": "violin bow strings"}, qrels={"q": {"A": 1}}, sha256="x")

    def halves(passages):  # cut A into its two sentences; keep the others whole
        return [[{**p, "_id": "A#0", "text": "granite quarry stone."}, {**p, "_id": "A#1", "text": "violin bow strings music"}] if p["_id"] == "A" else [p] for p in passages]

    cut = cut_documents(eval_set, halves)
    assert cut.documents == {"A#0": "A", "A#1": "A", "B": "B", "C": "C"} and cut.sha256 != eval_set.sha256 and _depth(cut) == 4  # all 4 passages (fewer than TOP_K x 2)
    assert cut_documents(eval_set, lambda passages: [[p] for p in passages]) is eval_set
    assert bm25_retrieve(cut)["q"] == ["A", "B"]  # A once, at its best passage's place; C shares no word
    result = evaluate_model("bm25", cut, tmp_path)
    assert result["binary"]["ndcg@10"]["q"] == 1.0 and result["binary"]["recall@100"]["q"] == 1.0


def test_imported_pairs_naming_a_cut_record_go_to_its_passages(tmp_path):
    import json
    from collections import Counter
    from types import SimpleNamespace

    from embedforge.config import GenerateConfig
    from embedforge.generate import import_pairs

    passages = [{"_id": "d#0", "title": "", "text": "granite quarry stone cutting"}, {"_id": "d#1", "title": "", "text": "violin bow strings and music"},
                {"_id": "e", "title": "", "text": "river delta mud"}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "how are violin strings made", "passage_id": "d"}) + "\n" + json.dumps({"query": "what is in a river delta", "passage_id": "nope"}) + "\n")
    accepted, rejects, stats = [], [], SimpleNamespace(rejected=Counter(), accepted=Counter())
    import_pairs(pairs, passages, GenerateConfig(max_positives_per_query=1, dev_fraction=0.0, test_fraction=0.0), set(), accepted, rejects, stats)
    assert [(row["passage_id"], row.get("known_only", False)) for row in accepted] == [("d#1", False), ("d#0", True)]
    assert [(row["passage_id"], row["reason"]) for row in rejects] == [("nope", "import_unknown_passage")]


def test_record_of_a_passage_id():
    from embedforge.text import record_of

    assert [record_of(i) for i in ("doc#3", "guide.md#install/linux#0", "guide.md#install/linux", "doc", "a#b")] == [
        "doc", "guide.md#install/linux", "guide.md#install/linux", "doc", "a#b"]
