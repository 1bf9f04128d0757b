"""--engine ray: corpus encodings through ray.data on a local Ray instance give a local run's vectors and files.

One Ray instance (2 CPUs, no dashboard) serves the module and is shut down after it. Blocks are cut
to 8 texts so that both actors get work from these small corpora.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_passages, passage_responder, write_corpus
from embedforge.embeddings import cluster
from embedforge import reindex as reindexing
from embedforge.embeddings.cluster import RaySettings
from embedforge.errors import EmbedforgeError
from fake_llm import FakeChatModel
from test_reindex import CountingEncoder, Killed, index_state

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield RaySettings(actors=2)
    ray.shutdown()


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(cluster, "BLOCK_TEXTS", 8)


@pytest.fixture
def ray_streams(monkeypatch):
    """Counts the texts that went through Ray, so a test can tell the engine really ran."""
    seen = []
    original = cluster.RayEncoder.stream

    def stream(self, texts, chunk_size, progress=None):
        seen.extend(texts)
        yield from original(self, texts, chunk_size, progress)

    monkeypatch.setattr(cluster.RayEncoder, "stream", stream)
    return seen


def test_corpus_embeddings_on_ray_equal_the_local_ones(tiny_model, tmp_path, local_ray, small_blocks, ray_streams):
    from embedforge.embeddings import corpus_embeddings, load_model

    passages = make_passages(40)
    model = load_model(tiny_model)
    local = corpus_embeddings(tiny_model, passages, tmp_path / "local", batch_size=4, model=model)
    encoder = cluster.make_encoder(model, tiny_model, 4, local_ray)
    on_ray = corpus_embeddings(tiny_model, passages, tmp_path / "ray", batch_size=4, model=model, encoder=encoder)
    assert len(ray_streams) == 40
    assert on_ray.key == local.key and on_ray.ids == local.ids
    assert np.abs(np.asarray(on_ray.vectors) - np.asarray(local.vectors)).max() <= 1e-5
    entry = lambda root: sorted(p.name for p in (root / "embeddings" / local.key).iterdir())  # noqa: E731
    assert entry(tmp_path / "ray") == entry(tmp_path / "local") == ["ids.json", "index-flat.faiss", "vectors.npy"]


def test_reindex_on_ray_resumes_and_stays_incremental(tiny_model, tmp_path, local_ray, small_blocks, monkeypatch):
    from embedforge.embeddings import load_model

    model = load_model(tiny_model)
    passages = make_passages(40)
    local = reindexing.ReindexSettings(shard_size=8, batch_size=4)
    on_ray = reindexing.ReindexSettings(shard_size=8, batch_size=4, engine=local_ray)
    reindexing.reindex(tiny_model, passages, tmp_path / "local", local, model=model)

    monkeypatch.setattr(reindexing, "make_encoder", CountingEncoder(fail_after=2))
    with pytest.raises(Killed):
        reindexing.reindex(tiny_model, passages, tmp_path / "ray", on_ray, model=model)
    assert len(list((tmp_path / "ray" / "shards").glob("*.json"))) == 2
    counter = CountingEncoder()
    monkeypatch.setattr(reindexing, "make_encoder", counter)
    resumed = reindexing.reindex(tiny_model, passages, tmp_path / "ray", on_ray, model=model)
    assert isinstance(counter.inner, cluster.RayEncoder)
    assert (resumed.encoded, resumed.reused, len(counter.texts)) == (24, 16, 24)
    local_ids, local_vectors = index_state(tmp_path / "local")
    ray_ids, ray_vectors = index_state(tmp_path / "ray")
    assert ray_ids == local_ids
    assert np.abs(ray_vectors - local_vectors).max() <= 1e-5

    edited = [dict(p) for p in passages]
    for passage in edited[:3]:
        passage["text"] += " and its history"
    counter = CountingEncoder()
    monkeypatch.setattr(reindexing, "make_encoder", counter)
    stats = reindexing.reindex(tiny_model, edited, tmp_path / "ray", on_ray, model=model)
    assert (stats.encoded, stats.reused) == (3, 37)
    assert sorted(counter.texts) == sorted(reindexing.passage_text(p) for p in edited[:3])
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text())["count"] == 40


def test_a_local_run_continues_on_ray_with_the_same_results(tiny_model, tmp_path, local_ray, small_blocks, ray_streams):
    from embedforge import runs
    from embedforge.config import load_config
    from embedforge.files import read_json

    corpus = write_corpus(tmp_path / "corpus.jsonl", make_passages())
    llm = FakeChatModel(lambda messages, call: passage_responder({"messages": messages}))
    values = dict(corpus=corpus, run=tmp_path / "run", cache=tmp_path / "cache", base_model=tiny_model, min_pairs=15, round_trip_k=0, dev_fraction=0.2,
                  test_fraction=0.2, batch_size=4, bootstrap_resamples=100, num_negatives=2, min_steps=0, encode_backend="torch")
    runs.run(load_config(None, values), llm_factory=lambda config, seed: llm, echo=lambda line: None)
    local = read_json(tmp_path / "run" / runs.RESULTS)

    # Another cache: every corpus encoding of the evaluation happens again, on Ray.
    on_ray = load_config(None, {**values, "cache": tmp_path / "cache-ray", "engine": "ray", "ray_actors": 2})
    assert runs.status(on_ray) == {stage: "up to date" for stage in runs.STAGES}  # the engine is a runtime setting
    lines = []
    runs.run(on_ray, llm_factory=lambda config, seed: llm, echo=lines.append, force=("evaluate",))
    assert [line.split(":")[0] for line in lines if ": running" in line] == ["evaluate"]
    assert len(ray_streams) == 2 * len(make_passages())  # base and fine-tuned, each over the corpus of the synthetic test set
    ray_results = read_json(tmp_path / "run" / runs.RESULTS)
    for name, entry in local["eval_sets"].items():
        for label, model_entry in entry["models"].items():
            for metric, value in model_entry["scores"].items():
                assert ray_results["eval_sets"][name]["models"][label]["scores"][metric] == pytest.approx(value, abs=1e-4), (name, label, metric)


def test_more_actors_than_the_cluster_holds_is_an_error_not_a_wait(local_ray):
    with pytest.raises(EmbedforgeError, match="8 actors want 8 CPUs; the Ray cluster has 2") as error:
        cluster.connect(RaySettings(actors=8))
    assert "--ray-actors" in error.value.where
    with pytest.raises(EmbedforgeError, match="GPUs"):
        cluster.connect(RaySettings(actors=1, gpus_per_actor=1))


def test_an_unreachable_ray_address_fails_before_any_work(tmp_path, tiny_model):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_passages())
    command = [sys.executable, "-m", "embedforge", "run", "--corpus", str(corpus), "--run", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"),
               "--base-model", tiny_model, "--base-url", "http://127.0.0.1:9/v1", "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "OPENAI_API_KEY": "unused"})
    assert done.returncode != 0
    assert f"No Ray cluster answers at 127.0.0.1:{port}" in done.stderr and "--ray-address" in done.stderr and "ray start --head" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "corpus.jsonl").exists() and not (tmp_path / "run" / "generate").exists()


def test_gpu_actors_refuse_a_backend_whose_vectors_they_cannot_make(tiny_model):
    from embedforge.embeddings import load_model

    model = load_model(tiny_model)
    model.encode_backend = "onnx-int8"  # what the driver would have attached
    encoder = cluster.RayEncoder(RaySettings(actors=1, gpus_per_actor=1), model, tiny_model, 4)
    with pytest.raises(EmbedforgeError, match="GPU actors encode with torch"):
        next(encoder.stream(["a text"], 8))


def test_a_node_that_cannot_see_the_model_folder_encodes_from_the_shipped_copy(tiny_model, tmp_path, local_ray, monkeypatch):
    import ray

    from embedforge.embeddings import encode_texts, load_model, model_identity

    monkeypatch.setattr(cluster.tempfile, "tempdir", str(tmp_path))  # this node's temporary folder
    identity = model_identity(tiny_model)
    packed = [ray.put(cluster._pack(Path(tiny_model)))]
    texts = np.array([p["text"] for p in make_passages(5)])
    actor = cluster._EncodeActor(str(tmp_path / "elsewhere" / "model"), identity, packed, 64, {}, "torch", None, 4, 1)
    vectors = actor({"position": np.arange(5), "text": texts})["vector"]
    np.testing.assert_allclose(vectors, encode_texts(load_model(tiny_model), list(texts), 4, kind="document"), atol=1e-6)
    copies = list((tmp_path / "embedforge-models").iterdir())
    assert len(copies) == 1 and model_identity(str(copies[0])) == identity
    cluster._EncodeActor(str(tmp_path / "elsewhere" / "model"), identity, packed, 64, {}, "torch", None, 4, 1)
    assert list((tmp_path / "embedforge-models").iterdir()) == copies  # one copy per model on a node
