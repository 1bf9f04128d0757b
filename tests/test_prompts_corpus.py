"""Prompt validation and rendering; corpus readers and their errors."""

import json

import pytest

from embedforge.config import CorpusConfig, DEFAULT_PROMPT, PROMPTS_DIR
from embedforge.corpus import load_corpus, split_of, stdlib_records
from embedforge.errors import EmbedforgeError
from embedforge.prompts import load_prompt, render_messages


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_prompts_are_valid():
    names = {path.name for path in PROMPTS_DIR.glob("*.toml")}
    assert {"question.toml", "keyword.toml", "claim.toml"} <= names
    for path in PROMPTS_DIR.glob("*.toml"):
        assert load_prompt(path).examples


def test_missing_and_unknown_variables(tmp_path):
    with pytest.raises(EmbedforgeError, match=r"Missing variables: \$passage"):
        load_prompt(write(tmp_path / "p.toml", 'system = "s"\nuser = "no passage here"\n'))
    with pytest.raises(EmbedforgeError, match=r"Unknown variables in `user`: \$pasage"):
        load_prompt(write(tmp_path / "p.toml", 'system = "s"\nuser = "$pasage"\n'))
    with pytest.raises(EmbedforgeError, match="Unknown keys in prompt: temperature"):
        load_prompt(write(tmp_path / "p.toml", 'system = "s"\nuser = "$passage"\ntemperature = 1\n'))


def test_render_keeps_instructions_in_system_and_passage_in_delimiters():
    prompt = load_prompt(DEFAULT_PROMPT)
    messages = render_messages(prompt, "evil ####d#### text", "t", 1, "####d####")
    assert messages[0]["role"] == "system" and "evil" not in messages[0]["content"]
    last = messages[-1]["content"]
    assert last.count("####d####") == 2  # the passage's own copy of the delimiter was removed
    assert "evil  text" in last
    assert len(messages) == 2 + 2 * len(prompt.examples)


def test_jsonl_with_custom_fields_and_csv(tmp_path):
    rows = [{"doc": "a", "body": "first text", "name": "A"}, {"doc": "b", "body": "second text", "name": ""}]
    path = write(tmp_path / "c.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    passages = load_corpus(CorpusConfig(corpus=path, id_field="doc", text_field="body", title_field="name"))
    assert passages == [{"_id": "a", "title": "A", "text": "first text"}, {"_id": "b", "title": "", "text": "second text"}]
    csv_path = write(tmp_path / "c.csv", "doc,body\nx,some text\n")
    assert load_corpus(CorpusConfig(corpus=csv_path, id_field="doc", text_field="body"))[0]["_id"] == "x"


def test_folder_chunks_with_stable_ids(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    write(tmp_path / "docs" / "sub" / "a.md", " ".join(f"w{i}" for i in range(40)))
    write(tmp_path / "docs" / "b.txt", "short text")
    passages = load_corpus(CorpusConfig(corpus=tmp_path / "docs", chunk_words=16))
    assert [p["_id"] for p in passages] == ["b.txt", "sub/a.md#0", "sub/a.md#1", "sub/a.md#2"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n', "Duplicate passage id 'a'"),
        (b'{"_id": "a", "text": "x"}\n{broken\n{"_id": "c", "text": "z"}\n', "line 2"),
        (b'{"_id": "a", "text": "\xff\xfe"}\n', "not UTF-8"),
        (b'{"_id": "a", "text": ""}\n', "no passages"),
        (b'{"id": "a", "text": "x"}\n', "no field '_id'"),
    ],
)
def test_bad_corpus_files_say_what_and_where(tmp_path, content, message):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(content)
    with pytest.raises(EmbedforgeError, match=message) as caught:
        load_corpus(CorpusConfig(corpus=path))
    assert str(path) in caught.value.message


def test_missing_corpus_path(tmp_path):
    with pytest.raises(EmbedforgeError, match="does not exist"):
        load_corpus(CorpusConfig(corpus=tmp_path / "nope"))


def test_torn_last_line_is_tolerated(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'{"_id": "a", "text": "x"}\n{"_id": "b", "te')
    assert [p["_id"] for p in load_corpus(CorpusConfig(corpus=path))] == ["a"]


def test_stdlib_docs_are_parsed_not_imported():
    import sys

    before = set(sys.modules)
    passages = stdlib_records()
    assert len(passages) > 1000 and len({p["_id"] for p in passages}) == len(passages)
    assert any(p["title"] == "json.dumps" for p in passages)
    assert "antigravity" not in set(sys.modules) - before and "this" not in set(sys.modules) - before


def test_split_is_stable_and_roughly_proportional():
    splits = [split_of(f"id{i}", 0.1, 0.2) for i in range(5000)]
    assert splits == [split_of(f"id{i}", 0.1, 0.2) for i in range(5000)]
    assert 0.17 < splits.count("test") / 5000 < 0.23 and 0.07 < splits.count("dev") / 5000 < 0.13


def test_no_space_left_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno
    import os

    from embedforge.files import write_jsonl

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(EmbedforgeError, match="No space left on the device") as caught:
        write_jsonl(tmp_path / "out" / "queries.jsonl", [{"a": 1}] * 100)
    assert "queries.jsonl" in caught.value.message
    assert list((tmp_path / "out").iterdir()) == []
