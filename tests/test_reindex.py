"""reindex + search: resume after a kill, incremental updates, model changes, dry run, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedforge import reindex as reindexing
from embedforge.errors import EmbedforgeError
from embedforge.reindex import ReindexSettings

from conftest import make_passages, write_corpus

SETTINGS = ReindexSettings(shard_size=8, batch_size=4)
MAKE_ENCODER = reindexing.make_encoder
PLANTED = {"_id": "planted", "title": "", "text": "what about volcano glacier history"}


@pytest.fixture(scope="module")
def model(tiny_model):
    from embedforge.embeddings import load_model

    return load_model(tiny_model, device="cpu")


class Killed(Exception):
    pass


class CountingEncoder:
    """Stands in for make_encoder: counts the texts encoded, and raises after `fail_after` chunks (a kill)."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after
        self.calls = 0
        self.texts: list[str] = []

    def __call__(self, *args, **kwargs):
        self.inner = MAKE_ENCODER(*args, **kwargs)
        return self

    def stream(self, texts, chunk_size, progress=None):
        for rows, vectors in self.inner.stream(texts, chunk_size, progress):
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise Killed("killed")
            self.calls += 1
            self.texts.extend(texts[row] for row in rows)
            yield rows, vectors


def index_state(folder: Path) -> tuple[list[str], np.ndarray]:
    import faiss

    manifest = json.loads((folder / "manifest.json").read_text())
    index = faiss.read_index(str(folder / manifest["index"]["file"]))
    ids = json.loads((folder / manifest["index"]["ids"]).read_text())
    return ids, index.reconstruct_n(0, index.ntotal)


def test_killed_reindex_resumes_to_the_same_index(tiny_model, model, tmp_path, monkeypatch):
    passages = make_passages(40)
    reference = reindexing.reindex(tiny_model, passages, tmp_path / "reference", SETTINGS, model=model)
    assert reference.encoded == 40 and reference.shards_written == 5

    killer = CountingEncoder(fail_after=2)  # one chunk per shard: dies with the third shard encoded, not written
    monkeypatch.setattr(reindexing, "make_encoder", killer)
    with pytest.raises(Killed):
        reindexing.reindex(tiny_model, passages, tmp_path / "killed", SETTINGS, model=model)
    shards = tmp_path / "killed" / "shards"
    assert sorted(p.name for p in shards.glob("*.json")) == ["shard-000000.json", "shard-000001.json"]
    assert not (tmp_path / "killed" / "manifest.json").exists()
    (shards / "shard-000002.npy").write_bytes(b"torn write of a killed run")  # vectors without their marker
    with pytest.raises(EmbedforgeError, match="No finished index"):
        reindexing.search(tmp_path / "killed", "volcano", model=model)

    counter = CountingEncoder()
    monkeypatch.setattr(reindexing, "make_encoder", counter)
    resumed = reindexing.reindex(tiny_model, passages, tmp_path / "killed", SETTINGS, model=model)
    assert (resumed.encoded, resumed.reused) == (24, 16)
    assert len(counter.texts) == 24
    reference_ids, reference_vectors = index_state(tmp_path / "reference")
    resumed_ids, resumed_vectors = index_state(tmp_path / "killed")
    assert resumed_ids == reference_ids == [p["_id"] for p in passages]
    np.testing.assert_array_equal(resumed_vectors, reference_vectors)
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert manifest["passages"] == json.loads((tmp_path / "reference" / "manifest.json").read_text())["passages"]
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        f"shard-{n:06d}{suffix}" for n in range(5) for suffix in (".npy", ".json", ".texts.jsonl")
    )


def test_incremental_reindex_encodes_only_changed_and_new(tiny_model, model, tmp_path, monkeypatch):
    passages = make_passages(40)
    folder = tmp_path / "index"
    reindexing.reindex(tiny_model, passages, folder, SETTINGS, model=model)

    edited = [dict(p) for p in passages if p["_id"] not in {"doc005", "doc006", "doc007", "doc008"}]  # 4 removed
    for passage in edited[:3]:
        passage["text"] += " and its history"  # 3 changed
    edited += [PLANTED, {"_id": "new001", "title": "river", "text": "the river and the harbor"}]  # 2 added
    counter = CountingEncoder()
    monkeypatch.setattr(reindexing, "make_encoder", counter)
    stats = reindexing.reindex(tiny_model, edited, folder, SETTINGS, model=model)
    assert sorted(counter.texts) == sorted(reindexing.passage_text(p) for p in edited[:3] + edited[-2:])
    assert (stats.total, stats.encoded, stats.reused, stats.dropped) == (38, 5, 33, 4)

    ids, vectors = index_state(folder)
    assert ids == [p["_id"] for p in edited]
    fresh = reindexing.reindex(tiny_model, edited, tmp_path / "fresh", SETTINGS, model=model)
    assert fresh.encoded == 38
    fresh_ids, fresh_vectors = index_state(tmp_path / "fresh")
    assert fresh_ids == ids
    np.testing.assert_allclose(vectors, fresh_vectors, atol=1e-5)  # batches differ, texts do not
    hits = reindexing.search(folder, PLANTED["text"], k=3, model=model)
    assert hits[0].id == "planted" and hits[0].text == PLANTED["text"]

    again = reindexing.reindex(tiny_model, edited, folder, SETTINGS, model=model)
    assert again.encoded == 0 and any("Up to date" in note for note in again.notes)
    # Shards whose every row was removed or changed are gone; the manifest names only live ones.
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {p.name.split(".")[0] for p in (folder / "shards").iterdir()} == set(manifest["shards"])


def test_other_model_or_dtype_rebuilds_everything(tiny_model, model, tmp_path):
    passages = make_passages(20)
    folder = tmp_path / "index"
    reindexing.reindex(tiny_model, passages, folder, SETTINGS, model=model)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    (other / "README.md").write_text("a different model folder\n")  # another content hash
    stats = reindexing.reindex(str(other), passages, folder, SETTINGS, model=model)
    assert stats.encoded == 20 and any("full rebuild" in note for note in stats.notes)
    half = ReindexSettings(shard_size=8, batch_size=4, dtype="float16", index="ivfpq")
    stats = reindexing.reindex(str(other), passages + [PLANTED], folder, half, model=model)
    assert stats.encoded == 21 and stats.index_kind == "ivfpq" and any("dtype" in note for note in stats.notes)
    assert np.load(next((folder / "shards").glob("*.npy"))).dtype == np.float16
    assert len(reindexing.search(folder, PLANTED["text"], k=5, model=model)) >= 1


def test_dry_run_writes_nothing(tiny_model, model, tmp_path, capsys):
    passages = make_passages(40)
    estimate = reindexing.estimate(tiny_model, passages, tmp_path / "new", SETTINGS, model=model)
    assert not (tmp_path / "new").exists()
    assert estimate.to_encode == 40 and estimate.sample_size == 40 and estimate.seconds > 0
    assert "Nothing was written" in estimate.render()

    folder = tmp_path / "index"
    reindexing.reindex(tiny_model, passages, folder, SETTINGS, model=model)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    estimate = reindexing.estimate(tiny_model, passages + [PLANTED], folder, SETTINGS, model=model)
    assert estimate.to_encode == 1
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_errors_say_what_where_and_fix(tiny_model, model, tmp_path):
    with pytest.raises(EmbedforgeError, match="does not exist") as missing:
        reindexing.search(tmp_path / "nowhere", "query", model=model)
    assert missing.value.where and "reindex" in missing.value.fix
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(EmbedforgeError, match="other files"):
        reindexing.reindex(tiny_model, make_passages(4), tmp_path / "busy", SETTINGS, model=model)
    with pytest.raises(EmbedforgeError, match="dtype"):
        reindexing.reindex(tiny_model, make_passages(4), tmp_path / "x", ReindexSettings(dtype="int8"), model=model)

    folder = tmp_path / "index"
    reindexing.reindex(tiny_model, make_passages(4), folder, SETTINGS, model=model)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model_identity"] = "sha256:" + "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(EmbedforgeError, match="not the one this index was built with"):
        reindexing.search(folder, "query")


def test_several_cpu_processes_match_one(tiny_model, model, tmp_path):
    passages = make_passages(24)
    reindexing.reindex(tiny_model, passages, tmp_path / "one", SETTINGS, model=model)
    pooled = ReindexSettings(shard_size=12, batch_size=4, devices=("cpu", "cpu"))
    stats = reindexing.reindex(tiny_model, passages, tmp_path / "two", pooled)
    assert stats.encoded == 24
    one_ids, one_vectors = index_state(tmp_path / "one")
    two_ids, two_vectors = index_state(tmp_path / "two")
    assert one_ids == two_ids
    np.testing.assert_allclose(one_vectors, two_vectors, atol=1e-5)


def test_cli_reindex_then_search_finds_the_planted_passage(tiny_model, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_passages(40) + [PLANTED])
    folder = tmp_path / "index"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = (
        "import sys\nfrom embedforge.cli import main\n"
        f"sys.argv = ['embedforge', 'reindex', '--model', {tiny_model!r}, '--corpus', {str(corpus)!r}, '--out', {str(folder)!r}, '--shard-size', '16', '--encode-backend', 'torch']\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    assert not stop.code, stop.code\n"
        f"sys.argv = ['embedforge', 'search', '--index', {str(folder)!r}, {PLANTED['text']!r}, '-k', '3']\n"
        "main()\n"
    )
    # One process for both commands: importing torch twice would double this test's time.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)  # its cache/ there
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "41 passages: 41 encoded" in result.stdout
    hits = [line.split() for line in lines[-3:]]
    assert hits[0][:2] == ["1", "planted"] and " ".join(hits[0][3:]) == PLANTED["text"]
    assert [hit[0] for hit in hits] == ["1", "2", "3"]


def test_an_fp32_backend_reuses_torch_shards_while_int8_reencodes_and_search_follows_it(tiny_model, tmp_path):
    from dataclasses import replace

    passages = make_passages(20) + [PLANTED]
    folder = tmp_path / "index"
    settings = replace(SETTINGS, encode_backend="torch", cache=tmp_path / "cache")
    first = reindexing.reindex(tiny_model, passages, folder, settings)
    assert first.encoded > 0
    assert reindexing.reindex(tiny_model, passages, folder, replace(settings, encode_backend="onnx")).encoded == 0
    quantized = reindexing.reindex(tiny_model, passages, folder, replace(settings, encode_backend="onnx-int8"))
    assert quantized.encoded == first.encoded and any("full rebuild" in note for note in quantized.notes)
    assert json.loads((folder / "manifest.json").read_text())["encode_backend"] == "onnx-int8"
    hits = reindexing.search(folder, PLANTED["text"], k=1, cache_dir=tmp_path / "cache")
    assert hits[0].id == "planted"
    # A rerun with nothing to encode (a passage removed) never opens the model; the index stays searchable.
    assert reindexing.reindex(tiny_model, passages[1:], folder, replace(settings, encode_backend="onnx-int8")).encoded == 0
    assert json.loads((folder / "manifest.json").read_text())["encode_backend"] == "onnx-int8"
    assert reindexing.search(folder, PLANTED["text"], k=1, cache_dir=tmp_path / "cache")[0].id == "planted"
    with pytest.raises(EmbedforgeError, match="encodes in one process"):
        reindexing.reindex(tiny_model, passages, folder, replace(settings, encode_backend="onnx-int8", devices=("cpu", "cpu")))
