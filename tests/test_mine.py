"""Mining rules on hand-built scores and on a small planted index."""

import random

import numpy as np

from embedforge.config import MineConfig
import pytest

from embedforge.embeddings import CorpusEmbeddings, IndexSpec, build_index, configure_index
from embedforge.files import read_jsonl
from embedforge.mine import dropped_by_rule, exclusion_codes, margin_codes, mine, others_above_positive, weakest_record_score, window


def test_relative_margin_on_hand_built_scores():
    config = MineConfig(num_negatives=3, relative_margin=0.1, range_max=10)
    scores = np.array([0.95, 0.85, 0.80, 0.5, 0.4])  # the positive scores 0.9: the cap is 0.9 - 0.09 = 0.81
    codes = margin_codes(scores, np.zeros(5, dtype=np.int8), 0.9, config)
    assert window(codes, config, random.Random(0)) == [2, 3, 4]
    assert dropped_by_rule(codes) == {"relative_margin": 2}


def test_absolute_margin_and_max_score_on_hand_built_scores():
    config = MineConfig(num_negatives=5, relative_margin=None, absolute_margin=0.1, max_score=0.7)
    scores = np.array([0.85, 0.75, 0.72, 0.6])  # positive 0.9: absolute drops > 0.8, max_score drops > 0.7
    codes = margin_codes(scores, np.zeros(4, dtype=np.int8), 0.9, config)
    assert window(codes, config, random.Random(0)) == [3]
    assert dropped_by_rule(codes) == {"absolute_margin": 1, "max_score": 2}


def test_exclusions_and_window_over_survivors():
    config = MineConfig(num_negatives=3, relative_margin=None, range_min=1, range_max=3)
    # corpus positions 0..7 ranked in this order; 1 is the positive, 2 another known positive,
    # 3 a test passage, 4 has the positive's text, 5..7 are fine, 0 is fine too
    candidates = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    text_group = np.array([0, 1, 2, 3, 1, 5, 6, 7])
    in_test = np.array([False, False, False, True, False, False, False, False])
    codes = exclusion_codes(candidates, positive=1, known=np.array([1, 2]), text_group=text_group, in_test=in_test)
    # survivors: 0, 5, 6, 7; the window 1..3 of them skips 0 and stops before 7
    assert window(codes, config, random.Random(0)) == [5, 6]
    assert dropped_by_rule(codes) == {"positive": 1, "known_positive": 1, "test_split": 1, "duplicate_text": 1}


def test_other_passages_of_the_positives_record_are_not_negatives():
    # positions 0..3: doc#0 (the positive), doc#1 and doc#2 (cut from the same record), other
    record_group = np.array([0, 0, 0, 1])
    codes = exclusion_codes(np.array([0, 1, 2, 3]), positive=0, known=np.array([0]), text_group=np.arange(4), in_test=np.zeros(4, dtype=bool),
                            record_group=record_group)
    assert dropped_by_rule(codes) == {"positive": 1, "same_record": 2}
    assert window(codes, MineConfig(num_negatives=3, relative_margin=None), random.Random(0)) == [3]


def test_random_sampling_keeps_count_and_order():
    config = MineConfig(num_negatives=2, relative_margin=None, sampling="random")
    chosen = window(np.zeros(10, dtype=np.int8), config, random.Random(3))
    assert len(chosen) == 2 and len(set(chosen)) == 2 and chosen == sorted(chosen)


def _unit(vector):
    vector = np.asarray(vector, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_mine_never_returns_positive_duplicates_or_test(tmp_path):
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=16))
    passages, vectors = [], []
    for index in range(30):
        vectors.append(_unit(base + 0.5 * rng.normal(size=16)))
        passages.append({"_id": f"p{index}", "title": f"title{index}", "text": f"passage number {index}"})
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
    assert len(rows[0]["negative_ids"]) == 5
    # Training texts are what the models encode: title + text.
    assert rows[0]["positive"] == "title0 passage number 0"
    negative = rows[0]["negative_ids"][0]
    assert rows[0]["negative_1"] == f"title{negative[1:]} passage number {negative[1:]}"
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


def test_known_only_positives_get_no_row_and_are_never_negatives(tmp_path):
    passages = [{"_id": f"p{i}", "title": "", "text": f"text {i}"} for i in range(6)]
    matrix = np.eye(6, dtype=np.float32)
    embeddings = CorpusEmbeddings(ids=[p["_id"] for p in passages], vectors=matrix, index=build_index(matrix), key="k")
    queries = [
        {"_id": "q-a", "text": "real query", "passage_id": "p0", "split": "train"},
        {"_id": "q-b", "text": "real query", "passage_id": "p1", "split": "train", "known_only": True},
        {"_id": "q-c", "text": "real query", "passage_id": "p2", "split": "train", "known_only": True},
    ]
    stats = mine(passages, queries, embeddings, matrix[:1], tmp_path, MineConfig(num_negatives=5, relative_margin=None), set(), seed=0)
    rows = read_jsonl(tmp_path / "train.jsonl")
    assert [row["query_id"] for row in rows] == ["q-a"] and stats["rows"] == 1
    assert set(rows[0]["negative_ids"]) == {"p3", "p4", "p5"}
    assert stats["dropped"]["known_positive"] == 2
    assert rows[0]["known_positives"] == 3  # the trained one and the two known only: what the auto loss reads
    assert rows[0]["known_positive_ids"] == ["p0", "p1", "p2"]  # what train keeps out of other anchors' batches


class JudgeEverythingAbout:
    """A stand-in cross-encoder: judges relevant any passage whose text contains a word."""

    def __init__(self, word):
        self.word = word
        self.pairs = 0

    def predict(self, pairs, show_progress_bar=False):
        self.pairs += len(pairs)
        return np.array([1.0 if self.word in passage else 0.0 for _, passage in pairs])


def test_cross_encoder_drops_candidates_it_judges_relevant(tmp_path):
    rng = np.random.default_rng(1)
    passages = [{"_id": f"p{i}", "title": "", "text": f"text {i}" + (" relevant" if i in (3, 4) else "")} for i in range(12)]
    matrix = np.stack([_unit(rng.normal(size=8)) for _ in passages])
    embeddings = CorpusEmbeddings(ids=[p["_id"] for p in passages], vectors=matrix, index=build_index(matrix), key="k")
    queries = [{"_id": "q", "text": "q", "passage_id": "p0", "split": "train"}]
    judge = JudgeEverythingAbout("relevant")
    stats = mine(passages, queries, embeddings, matrix[:1], tmp_path, MineConfig(num_negatives=20, relative_margin=None), set(), 0, cross_encoder=judge)
    row = read_jsonl(tmp_path / "train.jsonl")[0]
    assert not {"p3", "p4"} & set(row["negative_ids"]) and len(row["negative_ids"]) == 9
    assert stats["dropped"]["cross_encoder"] == 2 and judge.pairs == 11


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_true_neighbours(kind):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32))
    vectors = np.stack([_unit(centers[i % 20] + 0.3 * rng.normal(size=32)) for i in range(4000)])
    spec = IndexSpec(kind=kind, nprobe=8)
    index = configure_index(build_index(vectors, spec), spec)
    exact = build_index(vectors, IndexSpec(kind="flat"))
    queries = vectors[:50]
    _, approximate_ids = index.search(queries, 10)
    _, exact_ids = exact.search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate_ids, exact_ids)])
    assert recall > 0.9
    assert IndexSpec(exact_max=100).resolve(4000) == "ivf" and IndexSpec().resolve(4000) == "flat"


def test_corpus_embeddings_are_encoded_once(tmp_path, tiny_model):
    from embedforge.embeddings import corpus_embeddings, load_model

    passages = [{"_id": f"p{i}", "title": "", "text": f"the apple river {i}"} for i in range(20)]
    first = corpus_embeddings(tiny_model, passages, tmp_path, model=load_model(tiny_model))

    class NoEncoding:
        device, max_seq_length = "cpu", 64

        def encode_document(self, *args, **kwargs):
            raise AssertionError("encoded again")

    second = corpus_embeddings(tiny_model, passages, tmp_path, model=NoEncoding())
    assert np.allclose(np.asarray(first.vectors), np.asarray(second.vectors)) and second.ids == first.ids
    changed = passages[:-1] + [{"_id": "p19", "title": "", "text": "changed"}]
    with pytest.raises(AssertionError, match="encoded again"):
        corpus_embeddings(tiny_model, changed, tmp_path, model=NoEncoding())


def test_margins_count_from_a_known_records_best_passage_not_its_weakest(tmp_path):
    # Record "a" is cut in two: a#0 scores 0.9 for the query, its tail a#1 only 0.1. Record "b"
    # (another known positive) scores 0.8. Negatives p0..p3 score 0.2 to 0.5: below 0.95 x 0.8,
    # so none is a likely false negative; a margin from a#1 (0.1) would have dropped them all.
    assert weakest_record_score(np.array([0.9, 0.1, 0.8]), np.array([4, 4, 7])) == 0.8
    ids = ["a#0", "a#1", "b", "p0", "p1", "p2", "p3"]
    scores = [0.9, 0.1, 0.8, 0.5, 0.4, 0.3, 0.2]
    query = np.zeros(8, dtype=np.float32)
    query[0] = 1.0
    matrix = np.stack([_unit([score, np.sqrt(1 - score**2)] + [0] * 6) for score in scores])  # query . passage = score
    passages = [{"_id": identifier, "title": "", "text": f"text {identifier}"} for identifier in ids]
    embeddings = CorpusEmbeddings(ids=ids, vectors=matrix, index=build_index(matrix), key="k")
    queries = [{"_id": "q", "text": "the query", "passage_id": "a#0", "split": "train"},
               {"_id": "q-1", "text": "the query", "passage_id": "a#1", "split": "train", "known_only": True},
               {"_id": "q-2", "text": "the query", "passage_id": "b", "split": "train", "known_only": True}]
    stats = mine(passages, queries, embeddings, query[None, :], tmp_path, MineConfig(num_negatives=3, relative_margin=0.05), set(), seed=0)
    assert read_jsonl(tmp_path / "train.jsonl")[0]["negative_ids"] == ["p0", "p1", "p2"]
    assert stats["shortfalls"] == 0 and stats["dropped"]["relative_margin"] == 0


def test_others_above_positive_by_hand():
    corpus = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    queries = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 1.0]])
    positives = np.array([0, 3, 1, 3])  # distinct training positives: 0, 1, 3
    # q0: own 1.0; others 0.8 (p1), 0.0 (p3): none above. q1: own 0.8; p0 0.6, p1 0.96: one of two.
    # q2: own 0.6; p0 0.0, p3 1.0: one of two. q3: own 1.0 (p3 is its own, even though q1 shares it): none.
    assert others_above_positive(queries, corpus, positives, seed=0).tolist() == [0.0, 0.5, 0.5, 0.0]
    sampled = others_above_positive(queries, corpus, positives, seed=0, sample=2)  # two of the three positives
    assert set(sampled.tolist()) <= {0.0, 0.5, 1.0} and len(sampled) == 4
    assert others_above_positive(queries[:1], corpus, positives[:1], seed=0).tolist() == [0.0]  # no other positive


def test_mine_rows_and_stats_carry_others_above_positive(tmp_path):
    corpus = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    passages = [{"_id": f"p{i}", "title": "", "text": f"passage {i}"} for i in range(4)]
    embeddings = CorpusEmbeddings(ids=[p["_id"] for p in passages], vectors=corpus, index=build_index(corpus), key="test")
    queries = [{"_id": f"q{i}", "text": f"query {i}", "passage_id": p, "split": "train"} for i, p in enumerate(["p0", "p3", "p1"])]
    stats = mine(passages, queries, embeddings, np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), tmp_path, MineConfig(num_negatives=1, relative_margin=None), set(), seed=0)
    assert [row["others_above_positive"] for row in read_jsonl(tmp_path / "train.jsonl")] == [0.0, 0.5, 0.5]
    assert stats["others_above_positive"] == pytest.approx(1 / 3, abs=1e-6)
