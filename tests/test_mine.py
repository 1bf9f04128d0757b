"""Mining rules on hand-built scores and on a small planted index."""

import random

import numpy as np

from embedforge.config import MineConfig
from embedforge.embeddings import CorpusEmbeddings, build_index
from embedforge.files import read_jsonl
from embedforge.mine import mine, select_negatives


def test_relative_margin_on_hand_built_scores():
    config = MineConfig(num_negatives=3, relative_margin=0.1, range_max=10)
    ids = ["a", "b", "c", "d", "e"]
    scores = [0.95, 0.85, 0.80, 0.5, 0.4]  # positive scores 0.9: the cap is 0.81
    negatives, dropped = select_negatives(ids, scores, 0.9, {}, set(), config, random.Random(0))
    assert [n for n, _ in negatives] == ["c", "d", "e"]
    assert dropped["relative_margin"] == 2


def test_exclusions_window_and_shortfall():
    config = MineConfig(num_negatives=3, relative_margin=None, range_min=1, range_max=5)
    ids = ["top", "pos", "other_pos", "test", "dup", "ok", "beyond"]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    excluded = {"pos": "positive", "other_pos": "known_positive", "test": "test_split"}
    negatives, dropped = select_negatives(ids, scores, 0.8, excluded, {"dup"}, config, random.Random(0))
    assert negatives == []  # rank 0 is outside the window, rank 5+ too; everything between is excluded
    assert dropped == {"positive": 1, "known_positive": 1, "test_split": 1, "duplicate_cosine": 1}


def test_random_sampling_keeps_count():
    config = MineConfig(num_negatives=2, relative_margin=None, sampling="random")
    ids = [f"n{i}" for i in range(10)]
    negatives, _ = select_negatives(ids, [0.1] * 10, 0.9, {}, set(), config, random.Random(3))
    assert len(negatives) == 2 and len({n for n, _ in negatives}) == 2


def _unit(vector):
    vector = np.asarray(vector, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_mine_never_returns_positive_duplicates_or_test(tmp_path):
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=16))
    passages, vectors = [], []
    for index in range(30):
        vectors.append(_unit(base + 0.5 * rng.normal(size=16)))
        passages.append({"_id": f"p{index}", "title": "", "text": f"passage number {index}"})
    vectors[1] = vectors[0].copy()  # p1: embedding duplicate of the positive p0
    passages[2]["text"] = "Passage number 0!"  # p2: same normalized text as p0
    matrix = np.stack(vectors)
    embeddings = CorpusEmbeddings(ids=[p["_id"] for p in passages], vectors=matrix, index=build_index(matrix), key="test")
    queries = [
        {"_id": "q0", "text": "find zero", "passage_id": "p0", "split": "train"},
        {"_id": "q1", "text": "find zero", "passage_id": "p3", "split": "train"},  # same text: p3 is a known positive of q0
    ]
    query_vectors = np.stack([matrix[0], matrix[3]])
    stats = mine(passages, queries, embeddings, query_vectors, tmp_path, MineConfig(num_negatives=5, relative_margin=None, range_max=30), {"p4", "p5"}, seed=0)
    rows = read_jsonl(tmp_path / "train.jsonl")
    negatives = set(rows[0]["negative_ids"])
    assert not negatives & {"p0", "p1", "p2", "p3", "p4", "p5"}
    assert len(rows[0]["negative_ids"]) == 5 and rows[0]["negative_1"]
    assert stats["dropped"]["duplicate_cosine"] >= 1 and stats["dropped"]["duplicate_text"] >= 1
    assert stats["dropped"]["test_split"] == 4  # p4, p5 for both queries


def test_shortfall_is_counted_not_padded(tmp_path):
    passages = [{"_id": f"p{i}", "title": "", "text": f"text {i}"} for i in range(4)]
    matrix = np.eye(4, dtype=np.float32)
    embeddings = CorpusEmbeddings(ids=[p["_id"] for p in passages], vectors=matrix, index=build_index(matrix), key="k")
    queries = [{"_id": "q", "text": "q", "passage_id": "p0", "split": "train"}]
    stats = mine(passages, queries, embeddings, matrix[:1], tmp_path, MineConfig(num_negatives=5, relative_margin=None), set(), seed=0)
    row = read_jsonl(tmp_path / "train.jsonl")[0]
    assert len(row["negative_ids"]) == 3 and "negative_4" not in row
    assert stats["shortfalls"] == 1
