"""Training on the tiny model: it saves and reloads, every loss trains, resume, and the guard."""

from contextlib import contextmanager

import pytest

from conftest import make_passages
from embedforge.config import TrainConfig
from embedforge.embeddings import passage_text
from embedforge.merging import merged_state
from embedforge.train import MERGE_GRID, epochs_for, masked_per_anchor, resolve_loss, train


def rows_for(passages, shuffle=False):
    rows = []
    for index, passage in enumerate(passages):
        target = passages[(index + 7) % len(passages)] if shuffle else passage
        # Harmful on purpose: with shuffled positives, the true passage is the hard negative.
        negative = passage if shuffle else passages[(index + 1) % len(passages)]
        rows.append({"anchor": f"what about {passage['title']} history", "positive": target["text"], "negative_1": negative["text"],
                     "negative_ids": [negative["_id"]], "positive_id": target["_id"]})
    rows.append({"anchor": "a query whose miner found nothing", "positive": passages[0]["text"], "negative_ids": [], "positive_id": passages[0]["_id"]})
    # Mining keeps up to num_negatives (3 by default): every loss must take more than one.
    rows += [{"anchor": f"how is {passage['title']} made", "positive": passage["text"], "negative_1": passages[index + 1]["text"],
              "negative_2": passages[index + 2]["text"], "negative_ids": [passages[index + 1]["_id"], passages[index + 2]["_id"]], "positive_id": passage["_id"]}
             for index, passage in enumerate(passages[:8])]
    return rows


@contextmanager
def killed_at_training_step(step: int):
    """The process "killed" (KeyboardInterrupt) as the trainer starts its `step`-th step."""
    from sentence_transformers.sentence_transformer import SentenceTransformerTrainer

    original = SentenceTransformerTrainer.training_step
    calls = {"count": 0}

    def dies(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == step:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    SentenceTransformerTrainer.training_step = dies
    try:
        yield
    finally:
        SentenceTransformerTrainer.training_step = original


def dev_set(passages):
    dev = passages[:12]
    return {f"d{i}": f"what about {p['title']}" for i, p in enumerate(dev)}, {f"d{i}": {p["_id"]} for i, p in enumerate(dev)}


@pytest.mark.parametrize(
    "options, loss",
    [({"loss": "mnrl"}, "mnrl"), ({"loss": "mnrl", "mini_batch_size": 2}, "mnrl"), ({"loss": "gist"}, "gist"), ({"matryoshka_dims": (32, 16)}, "mnrl")],
    ids=["mnrl", "cached-mnrl", "gist", "auto-matryoshka"],
)
def test_each_loss_trains_and_the_model_reloads(tmp_path, tiny_model, options, loss):
    from sentence_transformers import SentenceTransformer

    passages = make_passages()
    queries, qrels = dev_set(passages)
    stats = train(rows_for(passages), passages, queries, qrels, tiny_model, tmp_path, TrainConfig(batch_size=8, max_seq_length=64, min_steps=0, **options), seed=0)
    assert stats["steps"] >= 5 and stats["pairs"] == 49 and stats["loss"] == loss
    model = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert model.encode(["what about apple"]).shape == (1, 32)
    card = (tmp_path / "model" / "README.md").read_text()
    assert "embedforge" in card and "base model" in card and "improved_on_dev" in card


def test_guard_fires_when_training_is_harmful(tmp_path, tiny_model):
    passages = make_passages()
    queries, qrels = dev_set(passages)
    config = TrainConfig(batch_size=8, max_seq_length=64, min_steps=0, learning_rate=5e-3, epochs=5, warmup_ratio=0.0)
    stats = train(rows_for(passages, shuffle=True), passages, queries, qrels, tiny_model, tmp_path, config, seed=0)
    assert stats["improved_on_dev"] is False
    assert stats["tuned_dev_ndcg@10"] <= stats["base_dev_ndcg@10"]


def test_resume_after_interruption_continues_from_the_checkpoint(tmp_path, tiny_model):
    passages = make_passages()
    queries, qrels = dev_set(passages)
    config = TrainConfig(batch_size=8, max_seq_length=64, min_steps=0, epochs=2)
    with pytest.raises(KeyboardInterrupt), killed_at_training_step(9):  # an epoch is 7 steps: the epoch-1 checkpoint exists by now
        train(rows_for(passages), passages, queries, qrels, tiny_model, tmp_path, config, seed=0)
    assert not (tmp_path / "model").exists()
    stats = train(rows_for(passages), passages, queries, qrels, tiny_model, tmp_path, config, seed=0)
    assert stats["resumed_from"] == "checkpoint-7"
    assert stats["steps"] == 14


def test_auto_loss_is_gist_only_when_the_base_model_ranks_other_positives_above_a_querys_own():
    # others_above_positive 0.0031 at batch 32: 0.0961 per anchor (LegalSummarization's LLM pairs).
    sparse = [{"others_above_positive": 0.0031, "known_positives": 1}] * 10
    assert masked_per_anchor(sparse, 32) == pytest.approx(0.0961)
    assert resolve_loss("auto", sparse, 32) == "mnrl"
    # A dense corpus makes false in-batch negatives whoever wrote the queries (one known positive each).
    dense = [{"others_above_positive": 0.05, "known_positives": 1}] * 10  # 1.55 per anchor at batch 32
    assert resolve_loss("auto", dense, 32) == "gist"
    assert resolve_loss("auto", dense, 16) == "mnrl"  # 0.75 per anchor: a smaller batch holds fewer
    # Known positives alone no longer decide: the measurement does.
    assert resolve_loss("auto", [{"others_above_positive": 0.0, "known_positives": 43}] * 10, 32) == "mnrl"
    assert resolve_loss("gist", sparse, 32) == "gist" and resolve_loss("mnrl", dense, 32) == "mnrl"
    assert resolve_loss("auto", [], 32) == "mnrl"


def test_small_data_trains_at_least_min_steps():
    assert epochs_for(TrainConfig(batch_size=32, min_steps=32), rows=329) == 3  # 11 steps an epoch
    assert epochs_for(TrainConfig(batch_size=32, min_steps=32), rows=1026) == 1
    assert epochs_for(TrainConfig(batch_size=32, min_steps=32, epochs=2), rows=5000) == 2
    assert epochs_for(TrainConfig(batch_size=32, min_steps=0), rows=10) == 1


def test_merging_at_alpha_0_gives_the_base_models_vectors_and_at_1_the_fine_tuned_ones(tiny_model):
    import torch
    from sentence_transformers import SentenceTransformer

    base = SentenceTransformer(tiny_model, device="cpu")
    tuned = SentenceTransformer(tiny_model, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    texts = ["what about apple history", "how is bread made"]
    base_state, tuned_state = base.state_dict(), {name: value.clone() for name, value in tuned.state_dict().items()}
    wanted = {0.0: base.encode(texts), 1.0: tuned.encode(texts)}
    merged = SentenceTransformer(tiny_model, device="cpu")
    for alpha, vectors in wanted.items():
        merged.load_state_dict(merged_state(base_state, tuned_state, alpha))
        assert (merged.encode(texts) == vectors).all(), alpha
    merged.load_state_dict(merged_state(base_state, tuned_state, 0.5))
    halfway = merged.encode(texts)
    assert not (halfway == wanted[0.0]).all() and not (halfway == wanted[1.0]).all()
    weight = next(name for name in base_state if name.endswith("word_embeddings.weight"))
    assert torch.allclose(merged.state_dict()[weight], (base_state[weight] + tuned_state[weight]) / 2)


def test_merge_alpha_auto_keeps_the_best_alpha_on_dev_and_the_unmerged_model(tmp_path, tiny_model):
    from sentence_transformers import SentenceTransformer

    passages = make_passages()
    queries, qrels = dev_set(passages)
    config = TrainConfig(batch_size=8, max_seq_length=64, min_steps=0, merge_alpha="auto")
    stats = train(rows_for(passages), passages, queries, qrels, tiny_model, tmp_path, config, seed=0)
    sweep = {float(alpha): score for alpha, score in stats["merge_dev_sweep"].items()}
    assert sorted(sweep) == list(MERGE_GRID) and sweep[0.0] == stats["base_dev_ndcg@10"] and sweep[1.0] == stats["tuned_dev_ndcg@10"]
    assert stats["merged_dev_ndcg@10"] == max(sweep.values()) == sweep[stats["merge_alpha"]]
    assert stats["improved_on_dev"] == (stats["merged_dev_ndcg@10"] > stats["base_dev_ndcg@10"])
    # The saved model is the merge of the unmerged one with the base model at the chosen alpha.
    base, unmerged = SentenceTransformer(tiny_model, device="cpu"), SentenceTransformer(str(tmp_path / "model-unmerged"), device="cpu")
    expected = SentenceTransformer(tiny_model, device="cpu")
    expected.load_state_dict(merged_state(base.state_dict(), unmerged.state_dict(), stats["merge_alpha"]))
    saved = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    texts = ["what about apple history"]
    assert abs(saved.encode(texts) - expected.encode(texts)).max() < 1e-6
    assert saved.max_seq_length == unmerged.max_seq_length == base.max_seq_length  # both keep the base model's inference limit
    # Without merging, an older run's unmerged model does not stay next to a model it is not.
    train(rows_for(passages), passages, queries, qrels, tiny_model, tmp_path, TrainConfig(batch_size=8, max_seq_length=64, min_steps=0), seed=0)
    assert not (tmp_path / "model-unmerged").exists()


def test_imported_queries_with_several_known_positives_train_without_them_in_each_others_batches(tmp_path, tiny_model, monkeypatch):
    from embedforge.batching import KnownPositivesBatchSampler

    passages = make_passages()
    queries, qrels = dev_set(passages)
    # Topics of three passages: each query knows all three relevant and trains on one of them.
    rows = [{"anchor": f"what about {p['title']} and its kin", "positive": passage_text(p), "negative_ids": [], "positive_id": p["_id"],
             "known_positive_ids": [q["_id"] for q in passages[index - index % 3:index - index % 3 + 3]]}
            for index, p in enumerate(passages[:24])]
    batches = []
    plain_iter = KnownPositivesBatchSampler.__iter__

    def recording_iter(self):
        for batch in plain_iter(self):
            batches.append([self.texts[i] for i in batch])
            yield batch

    monkeypatch.setattr(KnownPositivesBatchSampler, "__iter__", recording_iter)
    stats = train(rows, passages, queries, qrels, tiny_model, tmp_path, TrainConfig(batch_size=8, max_seq_length=64, min_steps=0), seed=0)
    assert stats["batch_sampler"] == "known-positives" and batches
    topic_of = {passage_text(p): index // 3 for index, p in enumerate(passages[:24])}
    for batch in batches:
        topics = [topic_of[text] for texts in batch for text in texts if text in topic_of]
        assert len(topics) == len(set(topics)), "a known positive of one anchor was another anchor's in-batch negative"


def test_generated_queries_keep_the_plain_no_duplicates_batches(tmp_path, tiny_model):
    passages = make_passages()
    queries, qrels = dev_set(passages)
    rows = [dict(row, known_positive_ids=[row["positive_id"]]) for row in rows_for(passages)]
    stats = train(rows, passages, queries, qrels, tiny_model, tmp_path, TrainConfig(batch_size=8, max_seq_length=64, min_steps=0), seed=0)
    assert stats["batch_sampler"] == "no-duplicates"


def topic_rows(passages):
    """One topic of five passages, each query knowing all five, and two unrelated queries: a batch
    takes one query of the topic and the two others; the topic's four others could only be alone."""
    topic = [p["_id"] for p in passages[:5]]
    return [{"anchor": f"what about {p['title']} and its kin", "positive": passage_text(p), "negative_ids": [], "positive_id": p["_id"],
             "known_positive_ids": topic if p["_id"] in topic else [p["_id"]]} for p in passages[:7]]


def test_the_train_stats_count_the_rows_left_out_alone_in_each_epoch(tmp_path, tiny_model):
    passages = make_passages()
    queries, qrels = dev_set(passages)
    config = TrainConfig(batch_size=8, max_seq_length=64, min_steps=3)
    stats = train(topic_rows(passages), passages, queries, qrels, tiny_model, tmp_path, config, seed=0)
    assert stats["batch_sampler"] == "known-positives"
    assert stats["epochs"] == stats["steps"] == 3 and stats["rows_left_out_by_epoch"] == [4, 4, 4]


def test_a_resumed_training_counts_the_rows_left_out_in_the_epochs_before_it_too(tmp_path, tiny_model):
    passages = make_passages()
    queries, qrels = dev_set(passages)
    config = TrainConfig(batch_size=8, max_seq_length=64, min_steps=3)
    with pytest.raises(KeyboardInterrupt), killed_at_training_step(3):  # an epoch is 1 step: the epoch-2 checkpoint exists by now
        train(topic_rows(passages), passages, queries, qrels, tiny_model, tmp_path, config, seed=0)
    stats = train(topic_rows(passages), passages, queries, qrels, tiny_model, tmp_path, config, seed=0)
    assert stats["resumed_from"] == "checkpoint-2" and stats["steps"] == 3
    assert stats["rows_left_out_by_epoch"] == [4, 4, 4]


def test_a_log_file_shows_the_training_steps_as_lines_not_one_rewritten_bar(tmp_path, tiny_model, caplog, capsys, monkeypatch):
    # A nightly job's stderr is a file: the Trainer's own tqdm bar wrote every step into one line
    # with '\r' (13 minutes of the demo on a single line), and its metric dicts went to stdout.
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    monkeypatch.setattr("embedforge.progress.LOG_INTERVAL", 0.0)
    caplog.set_level("INFO", logger="embedforge.progress")
    passages = make_passages()
    queries, qrels = dev_set(passages)
    stats = train(rows_for(passages), passages, queries, qrels, tiny_model, tmp_path, TrainConfig(batch_size=8, max_seq_length=64, min_steps=12), seed=0)
    lines = [record.getMessage() for record in caplog.records if record.name == "embedforge.progress" and record.getMessage().startswith("train: ")]
    steps = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert stats["steps"] >= 12 and steps[0] == 0 and steps[-1] == stats["steps"] and steps == sorted(steps) and len(set(steps)) > 2, lines
    assert all(line.split("/")[1].startswith(f"{stats['steps']} step") for line in lines)
    captured = capsys.readouterr()
    # (Loading the model draws bars of its own here; the CLI turns those off in a log file.)
    assert f"| {stats['steps']}/{stats['steps']} [" not in captured.err and "'loss'" not in captured.out and "train_runtime" not in captured.out


def test_rows_that_could_each_only_be_alone_stop_with_an_error_that_says_why(tmp_path, tiny_model):
    # Every query knows every passage and mining found no negatives: no batch of two can be made,
    # and each lone row is left out, so the trainer had nothing to run and failed on max_steps.
    from embedforge.errors import EmbedforgeError

    passages = make_passages()
    queries, qrels = dev_set(passages)
    topic = [p["_id"] for p in passages[:5]]
    rows = [{"anchor": f"what about {p['title']}", "positive": passage_text(p), "negative_ids": [], "positive_id": p["_id"], "known_positive_ids": topic}
            for p in passages[:5]]
    with pytest.raises(EmbedforgeError, match="No training batch can be made from these 5 rows") as error:
        train(rows, passages, queries, qrels, tiny_model, tmp_path, TrainConfig(batch_size=8, max_seq_length=64, min_steps=3), seed=0)
    assert "--num-negatives" in error.value.message and not (tmp_path / "model").exists()
