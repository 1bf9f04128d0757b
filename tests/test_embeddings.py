"""Encoding on a CPU: batch sizes follow the texts' length, and the vectors stay those of one plain call."""

import numpy as np

from embedforge.embeddings import CPU_TOKENS_PER_BATCH, TEXTS_PER_CALL, batch_plan, encode_texts, load_model


def test_batch_plan_gives_long_texts_small_batches_and_short_ones_big():
    lengths = [40] * 700 + [5000] * 30 + [400] * 50  # short, truncated-long, medium; shuffled below
    order = np.random.default_rng(0).permutation(len(lengths))
    shuffled = [lengths[i] for i in order]
    calls = batch_plan(shuffled, batch_size=64, max_seq_length=256)

    positions = np.concatenate([positions for positions, _ in calls])
    assert sorted(positions.tolist()) == list(range(len(shuffled)))  # every text exactly once
    seen = [shuffled[p] for p in positions]
    assert seen == sorted(seen, reverse=True)  # longest first
    assert {shuffled[p]: size for positions, size in calls for p in positions} == {5000: 8, 400: 16, 40: 64}
    assert 8 * 256 <= CPU_TOKENS_PER_BATCH < 16 * 256  # 5000 characters count as max_seq_length tokens
    assert all(len(positions) <= TEXTS_PER_CALL for positions, _ in calls)
    assert all(len(set(shuffled[p] for p in positions)) == 1 for positions, _ in calls)  # one length class per call


def test_batch_plan_never_exceeds_the_given_batch_size():
    calls = batch_plan([10] * 20, batch_size=4, max_seq_length=None)
    assert {size for _, size in calls} == {4}
    assert batch_plan([], batch_size=32, max_seq_length=128) == []


class Bar:
    def __init__(self):
        self.n = 0

    def update(self, count):
        self.n += count


def test_encode_texts_keeps_input_order_and_the_plain_vectors(tiny_model):
    model = load_model(tiny_model, device="cpu")
    words = "apple river engine violin glacier tax protein satellite bakery volcano".split()
    texts = [" ".join(words[: 1 + i % 10] * (1 + i % 7)) for i in range(60)]
    bar = Bar()
    vectors = encode_texts(model, texts, 32, kind="document", progress=bar)
    plain = model.encode_document(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    assert vectors.dtype == np.float32 and vectors.shape == plain.shape
    np.testing.assert_allclose(vectors, plain, atol=1e-5)
    assert bar.n == len(texts)
    assert encode_texts(model, [], 32, kind="query").shape[0] == 0
