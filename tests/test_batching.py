"""The batch sampler that keeps an anchor's known positives out of its in-batch negatives."""

import pytest
from datasets import Dataset

from embedforge.batching import KnownPositivesBatchSampler, known_positive_texts


def rows_of_topics(topics: int, per_topic: int) -> list[dict]:
    """Queries in topics: every passage of a topic is relevant to every query of it (as nfcorpus's
    topics are), each row trains on its own passage."""
    return [{"anchor": f"query {t}.{q}", "positive": f"passage {t}.{q}", "positive_id": f"p{t}.{q}",
             "known_positive_ids": [f"p{t}.{other}" for other in range(per_topic)]}
            for t in range(topics) for q in range(per_topic)]


def sampler_for(rows, batch_size=8, drop_last=False, seed=0, known=None):
    import torch

    dataset = Dataset.from_list([{"anchor": r["anchor"], "positive": r["positive"]} for r in rows])
    known = known_positive_texts(rows, passages_of(rows)) if known is None else known
    return KnownPositivesBatchSampler(dataset, batch_size=batch_size, drop_last=drop_last, generator=torch.Generator(), seed=seed, known_positives=known), dataset


def passages_of(rows: list[dict]) -> list[dict]:
    return [{"_id": r["positive_id"], "title": "", "text": r["positive"]} for r in rows]


def topic(text: str) -> str:
    return text.split()[1].split(".")[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_batch_holds_a_known_positive_of_another_anchor_and_every_row_comes_once(seed):
    rows = rows_of_topics(topics=12, per_topic=3)
    sampler, dataset = sampler_for(rows, seed=seed)
    batches = list(sampler)
    assert sorted(index for batch in batches for index in batch) == list(range(len(rows)))
    for batch in batches:
        topics = [topic(dataset[index]["anchor"]) for index in batch]
        assert len(topics) == len(set(topics)), f"two queries of one topic in a batch: {topics}"
    assert len(batches[0]) == 8  # 12 topics: the first batches fill up


def test_a_plain_random_batch_would_hold_them():
    """The rule has something to do: the same rows in shuffled batches of 8 put two queries of a topic together."""
    import random

    rows = rows_of_topics(topics=12, per_topic=3)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    batches = [order[start:start + 8] for start in range(0, len(order), 8)]
    assert any(len({topic(rows[i]["anchor"]) for i in batch}) < len(batch) for batch in batches)


def test_without_extra_known_positives_nothing_is_forbidden_and_batches_stay_full():
    rows = rows_of_topics(topics=24, per_topic=1)
    assert known_positive_texts(rows, passages_of(rows)) == {}
    sampler, _ = sampler_for(rows, known={})
    assert [len(batch) for batch in sampler] == [8, 8, 8] and len(sampler) == 3


def test_duplicate_texts_never_share_a_batch_and_drop_last_drops_the_short_tail():
    rows = [{"anchor": "same query", "positive": f"passage {i}", "positive_id": f"p{i}", "known_positive_ids": [f"p{i}"]} for i in range(3)]
    rows += [{"anchor": f"query {i}", "positive": f"other {i}", "positive_id": f"o{i}", "known_positive_ids": [f"o{i}"]} for i in range(5)]
    sampler, dataset = sampler_for(rows, batch_size=4, drop_last=True)
    batches = list(sampler)
    # Three rows of one query in 8: the second batch can hold only 3 others, so it is the short tail.
    assert len(sampler) == len(batches) == 1 and all(len(batch) == 4 for batch in batches)
    for batch in batches:
        assert sum(dataset[index]["anchor"] == "same query" for index in batch) <= 1


def test_each_epoch_draws_other_batches_and_the_same_seed_the_same_ones():
    rows = rows_of_topics(topics=12, per_topic=3)
    sampler, _ = sampler_for(rows)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_under_torchrun_each_process_takes_its_share_of_the_batches():
    """accelerate shards a batch sampler across processes (as the Trainer does under torchrun);
    between them the two shards hold every row, and each shard's batches keep the rule."""
    from accelerate.data_loader import BatchSamplerShard

    rows = rows_of_topics(topics=12, per_topic=3)
    sampler, dataset = sampler_for(rows)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank, even_batches=False)) for rank in (0, 1)]
    assert sorted(index for shard in shards for batch in shard for index in batch) == list(range(len(rows)))
    for batch in (batch for shard in shards for batch in shard):
        topics = [topic(dataset[index]["anchor"]) for index in batch]
        assert len(topics) == len(set(topics))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_trainer_draws_every_row_even_when_conflicts_make_extra_batches(seed):
    """The trainer's multi-dataset sampler takes len() batches from each sampler: with four topics
    of six queries, batches of 8 hold at most one query of a topic, so they need six batches of
    four, and a length of rows / batch_size (3) left half the rows of every epoch untrained."""
    import torch
    from sentence_transformers.base.sampler import ProportionalBatchSampler
    from torch.utils.data import ConcatDataset

    crowded, other = rows_of_topics(topics=4, per_topic=6), rows_of_topics(topics=24, per_topic=1)
    samplers, datasets = zip(*(sampler_for(rows, seed=seed) for rows in (crowded, other)))
    assert len(list(samplers[0])) > -(-len(crowded) // 8)  # the case: more batches than rows / batch_size
    assert len(samplers[0]) == len(list(samplers[0]))
    combined = ProportionalBatchSampler(ConcatDataset(datasets), list(samplers), generator=torch.Generator(), seed=seed)
    drawn = [index for batch in combined for index in batch]
    assert sorted(drawn) == list(range(len(crowded) + len(other)))


def test_a_row_alone_with_nothing_to_compare_is_left_out_unless_it_brings_negatives():
    """Five queries of one topic and two others, batches of 8: the first batch takes one query of the
    topic and the two others; the topic's other four could only be alone in a batch, where an
    in-batch loss has nothing to compare a positive with (a step of zero loss)."""
    import torch

    rows = rows_of_topics(topics=1, per_topic=5)
    rows += [{"anchor": f"lone {i}", "positive": f"lone passage {i}", "positive_id": f"l{i}", "known_positive_ids": [f"l{i}"]} for i in range(2)]
    sampler, dataset = sampler_for(rows)
    assert [len(batch) for batch in sampler] == [3] and len(sampler) == 1
    assert sorted(dataset[index]["anchor"].split()[0] for index in next(iter(sampler))) == ["lone", "lone", "query"]

    with_negatives = Dataset.from_list([{"anchor": r["anchor"], "positive": r["positive"], "negative": f"negative {i}"} for i, r in enumerate(rows)])
    known = known_positive_texts(rows, passages_of(rows))
    kept = KnownPositivesBatchSampler(with_negatives, batch_size=8, drop_last=False, generator=torch.Generator(), seed=0, known_positives=known)
    assert sorted(len(batch) for batch in kept) == [1, 1, 1, 1, 3] and len(kept) == 5
