"""Query/passage prompts of the base model (e.g. BGE's query instruction): applied, cached apart, trained with, saved, reported."""

import numpy as np

from conftest import make_passages
from embedforge.config import RunConfig, TrainConfig, encoder_prompts
from embedforge.embeddings import corpus_key, encode_texts, load_model
from embedforge.evaluate import EvalSet, evaluate
from embedforge.evaluate.retrieval import result_key
from embedforge.train import column_prompts, train

PROMPTS = {"query": "query about ", "document": "history "}


def test_config_maps_flags_to_sentence_transformers_prompt_names():
    assert encoder_prompts(RunConfig()) == {}
    config = RunConfig(query_prompt="query about ", passage_prompt="history ")
    assert encoder_prompts(config) == PROMPTS
    assert encoder_prompts(RunConfig(query_prompt="q: ")) == {"query": "q: "}


def test_prompts_are_put_before_queries_and_passages(tiny_model):
    plain = load_model(tiny_model)
    prompted = load_model(tiny_model, prompts=PROMPTS)
    query = encode_texts(prompted, ["apple pie"], 4, kind="query")
    passage = encode_texts(prompted, ["apple pie"], 4, kind="document")
    assert np.allclose(query, encode_texts(plain, ["query about apple pie"], 4, kind="query"), atol=1e-6)
    assert np.allclose(passage, encode_texts(plain, ["history apple pie"], 4, kind="document"), atol=1e-6)
    assert not np.allclose(query, encode_texts(plain, ["apple pie"], 4, kind="query"), atol=1e-4)


def test_cache_keys_count_the_prompts(tiny_model):
    passages = make_passages(5)
    assert corpus_key(tiny_model, passages, None) != corpus_key(tiny_model, passages, None, PROMPTS)
    # Only the passage prompt changes corpus vectors.
    assert corpus_key(tiny_model, passages, None, {"query": "q: "}) == corpus_key(tiny_model, passages, None)
    eval_set = EvalSet(name="toy", source="here", passages=passages, queries={"q": "apple"}, qrels={"q": {passages[0]["_id"]: 1}}, sha256="toy")
    assert result_key(tiny_model, eval_set) != result_key(tiny_model, eval_set, PROMPTS)


def test_training_uses_the_prompts_and_the_saved_model_keeps_them(tmp_path, tiny_model):
    from sentence_transformers import SentenceTransformer

    passages = make_passages()
    rows = [{"anchor": f"what about {p['title']}", "positive": p["text"], "negative_1": passages[(i + 1) % 40]["text"],
             "negative_ids": [passages[(i + 1) % 40]["_id"]], "positive_id": p["_id"]} for i, p in enumerate(passages)]
    queries = {f"d{i}": f"what about {p['title']}" for i, p in enumerate(passages[:8])}
    qrels = {f"d{i}": {p["_id"]} for i, p in enumerate(passages[:8])}
    train(rows, passages, queries, qrels, tiny_model, tmp_path, TrainConfig(batch_size=8, max_seq_length=64, min_steps=0), seed=0, prompts=PROMPTS)
    saved = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert saved.prompts["query"] == "query about " and saved.prompts["document"] == "history "


def test_column_prompts_put_the_query_prompt_on_anchors_only(tiny_model):
    from datasets import Dataset, DatasetDict

    datasets = DatasetDict({"negatives_1": Dataset.from_list([{"anchor": "a", "positive": "b", "negative_1": "c"}])})
    assert column_prompts(load_model(tiny_model), datasets) is None
    assert column_prompts(load_model(tiny_model, prompts=PROMPTS), datasets) == {"anchor": "query about ", "negative_1": "history ", "positive": "history "}


def test_the_report_records_the_prompts(tmp_path, tiny_model):
    passages = make_passages(12)
    queries = {f"q{i}": f"what about {p['title']} history" for i, p in enumerate(passages)}
    qrels = {f"q{i}": {p["_id"]: 1} for i, p in enumerate(passages)}
    eval_set = EvalSet(name="toy", source="here", passages=passages, queries=queries, qrels=qrels, sha256="toy12")
    models = [("plain", tiny_model), ("prompted", tiny_model + "/")]  # the same weights, two names
    import json

    evaluate([eval_set], models, tmp_path / "out", tmp_path / "cache", resamples=100, seed=0, bm25=False, prompts={tiny_model + "/": PROMPTS})
    entry = json.loads((tmp_path / "out" / "results.json").read_text())["eval_sets"]["toy"]["models"]
    assert "prompts" not in entry["plain"] and entry["prompted"]["prompts"] == PROMPTS
