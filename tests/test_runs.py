"""The rerun matrix: each run redoes exactly what changed, and `status` says so."""

import shutil

import pytest

from conftest import make_passages, passage_responder, write_corpus
from embedforge import runs
from embedforge.config import DEFAULT_PROMPT, load_config
from embedforge.errors import EmbedforgeError
from fake_llm import FakeChatModel


def _prompt_sensitive(messages, call):
    # Like a real model, the answer depends on the prompt: an edited prompt gives other queries.
    suffix = " care" if "please" in messages[0]["content"] else ""
    return passage_responder({"messages": messages}) + suffix


COUNTING = FakeChatModel(_prompt_sensitive, name="counting")


def factory(config, seed):
    return COUNTING


@pytest.fixture
def run_config(tmp_path, tiny_model):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_passages())
    prompt = tmp_path / "prompt.toml"
    shutil.copyfile(DEFAULT_PROMPT, prompt)

    def make(**changes):
        values = dict(corpus=corpus, prompt=prompt, run=tmp_path / "run", cache=tmp_path / "cache", base_model=tiny_model, min_pairs=15,
                      round_trip_k=0, dev_fraction=0.2, test_fraction=0.2, batch_size=4, bootstrap_resamples=200, num_negatives=2, min_steps=0, encode_backend="torch")
        values.update(changes)
        return load_config(None, values)

    return make


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ran(config, **options):
    lines = []
    runs.run(config, llm_factory=factory, echo=lines.append, **options)
    return [line.split(":")[0] for line in lines if ": running" in line]


def test_rerun_matrix(run_config, monkeypatch):
    assert runs.status(run_config()) == {stage: "never run" for stage in runs.STAGES}
    assert ran(run_config()) == ["generate", "mine", "train", "evaluate"]
    assert runs.status(run_config()) == {stage: "up to date" for stage in runs.STAGES}

    COUNTING.calls = 0
    encodes = []
    import embedforge.embeddings as embeddings

    original = embeddings.encode_texts
    monkeypatch.setattr(embeddings, "encode_texts", lambda *a, **k: encodes.append(k.get("kind", a[3] if len(a) > 3 else None)) or original(*a, **k))
    assert ran(run_config()) == []
    assert COUNTING.calls == 0 and encodes == []

    assert ran(run_config(concurrency=3, encode_batch_size=7)) == []

    # epochs: train and evaluate; the base model's results on the unchanged eval set come from the cache.
    assert runs.status(run_config(epochs=2))["train"].startswith("stale (changed: setting epochs")
    assert ran(run_config(epochs=2)) == ["train", "evaluate"]
    assert COUNTING.calls == 0
    # A changed model is evaluated again; the base model's results come from the cache.
    # (epochs=2 may keep the epoch-1 state as best, an identical model, so change the rate too.)
    encodes.clear()
    assert ran(run_config(epochs=2, learning_rate=1e-4)) == ["train", "evaluate"]
    assert encodes == ["document", "query"]
    assert ran(run_config(epochs=2)) == ["train", "evaluate"]

    # a deleted output reruns its stage; identical outputs leave the later stages alone
    (run_config().run / "mine" / "stats.json").unlink()
    assert runs.status(run_config(epochs=2))["mine"] == "stale (output missing: mine/stats.json)"
    assert ran(run_config(epochs=2)) == ["mine"]

    # editing the prompt reruns generate and everything downstream
    prompt = run_config().generate.prompt[0]
    prompt.write_text(prompt.read_text().replace("Use your own words.", "Use your own words, please."))
    assert runs.status(run_config(epochs=2))["generate"].startswith("stale (changed: input")
    assert ran(run_config(epochs=2)) == ["generate", "mine", "train", "evaluate"]
    assert COUNTING.calls > 0

    # --force, --from, --to and --dry-run
    assert ran(run_config(epochs=2), force=("mine",)) == ["mine"]
    assert ran(run_config(epochs=2), from_stage="train", to_stage="train") == ["train"]
    lines = []
    runs.run(run_config(epochs=3), llm_factory=factory, echo=lines.append, dry_run=True)
    assert "train: would run (changed: setting epochs)" in lines and "evaluate: would run (after train)" in lines
    assert runs.status(run_config(epochs=3))["train"].startswith("stale")


def test_failed_stage_is_recorded_and_leaves_no_partial_output(run_config):
    def unreachable(messages, call):
        raise EmbedforgeError("The endpoint is unreachable", where="test", fix="start it")

    config = run_config()
    with pytest.raises(EmbedforgeError):
        runs.run(config, llm_factory=lambda c, s: FakeChatModel(unreachable, name="broken"), echo=lambda line: None)
    assert runs.status(config)["generate"] == "failed last time"
    assert not (config.run / "generate" / "queries.jsonl").exists()
    assert not list(config.run.rglob("*.tmp"))


def torchrun(config_file, nodes: int) -> list[list[str]]:
    """The README's commands: one node of 2 processes, or 2 nodes of one process each meeting at a
    c10d rendezvous endpoint (on a cluster, each node runs its line with the head's address)."""
    import sys

    train = ["-m", "embedforge", "train", "--config", str(config_file)]
    if nodes == 1:
        return [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), *train]]
    endpoint = f"127.0.0.1:{free_port()}"
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
             "--rdzv_endpoint", endpoint, "--rdzv_id", "embedforge-test", *train] for _ in range(nodes)]


@pytest.mark.parametrize("nodes", [1, 2], ids=["one node, 2 processes", "2 nodes, 1 process each"])
def test_two_process_ddp_training_on_cpu(run_config, tmp_path, nodes):
    """torchrun -m embedforge train: DDP through the Trainer (gloo on CPU); only rank 0 writes."""
    import json
    import os
    import subprocess

    config = run_config()
    runs.run(config, llm_factory=factory, echo=lambda line: None, to_stage="mine")
    manifest_before = json.loads((config.run / "manifest.json").read_text())
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # torchrun's own parser would take --run for its --run-path: settings go in a config file.
    from embedforge.runs import config_toml

    config_file = tmp_path / "embedforge.toml"
    config_file.write_text(config_toml(config))
    # Output to files: a node blocked on a full pipe would stall the other one's collectives.
    logs = [tmp_path / f"node-{number}.log" for number in range(nodes)]
    processes = []
    try:
        for command, log in zip(torchrun(config_file, nodes), logs):
            with log.open("w") as handle:  # the child holds its own copy of the handle
                processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle, env=environment))
        for process, log in zip(processes, logs):
            process.wait(timeout=600)
            assert process.returncode == 0, log.read_text()[-3000:]
    finally:
        for process in processes:  # a node whose partner failed would wait for it
            if process.poll() is None:
                process.kill()
    manifest = json.loads((config.run / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "done"
    # Two ranks share the batches: well under the single-process step count (7 here).
    assert manifest["stages"]["train"]["stats"]["steps"] <= 5
    assert manifest["stages"]["mine"] == manifest_before["stages"]["mine"]
    assert (config.run / "train" / "model" / "modules.json").exists()
    assert not list(config.run.rglob("*.tmp"))


def test_dev_guard_note_defers_to_a_human_labelled_eval_set():
    from embedforge.runs import dev_guard_note

    assert dev_guard_note(True, labelled_sets=0) is None and dev_guard_note(None, labelled_sets=1) is None
    assert dev_guard_note(False, labelled_sets=0).endswith("keep the base model.")
    with_labels = dev_guard_note(False, labelled_sets=1)
    assert "NOT better" in with_labels and "human-labelled eval set decides" in with_labels


def test_an_fp32_encode_backend_reruns_nothing_and_int8_reruns_every_stage(run_config):
    assert ran(run_config(encode_backend="onnx")) == ["generate", "mine", "train", "evaluate"]
    model = run_config().run / "train" / "model"
    # The fine-tuned model ships its checked export, and evaluation used it: the cache holds only the base model's.
    assert (model / "onnx" / "model.onnx").exists() and (model / "onnx" / "check.json").exists()
    assert len(list((run_config().cache / "backends").glob("*/onnx/model.onnx"))) == 1
    assert "ONNX export: `onnx/model.onnx`" in (model / "README.md").read_text()
    assert ran(run_config(encode_backend="torch")) == []
    assert ran(run_config(encode_backend="auto")) == []
    assert runs.status(run_config(encode_backend="onnx-int8"))["generate"].startswith("stale (changed: setting encode_backend")
    assert ran(run_config(encode_backend="onnx-int8")) == ["generate", "mine", "train", "evaluate"]


def test_adding_a_regression_set_reruns_only_evaluate_and_reports_it(run_config, tmp_path):
    from embedforge.files import read_json
    from test_evaluate import write_beir

    assert ran(run_config()) == ["generate", "mine", "train", "evaluate"]
    other = write_beir(tmp_path / "other")
    assert ran(run_config(regression_set=[other])) == ["evaluate"]
    entry = read_json(tmp_path / "run" / runs.RESULTS)["eval_sets"]["regression:other"]
    assert entry["role"] == "regression" and entry["models"]["fine-tuned"]["regression"] in {"forgets", "holds", "gains"}
    assert "regression" not in entry["models"]["bm25"]
    (other / "qrels" / "test.tsv").unlink()
    with pytest.raises(EmbedforgeError, match="lacks qrels/test.tsv"):
        ran(run_config(regression_set=[other]))


def test_merging_reruns_train_and_evaluate_and_the_report_says_which_model_it_scored(run_config, tmp_path):
    assert ran(run_config()) == ["generate", "mine", "train", "evaluate"]
    assert ran(run_config(merge_alpha=0.5)) == ["train", "evaluate"]
    report = (tmp_path / "run" / runs.REPORT).read_text()
    assert "0.5 x the fine-tuned model + 0.5 x the base model" in report and "train/model-unmerged" in report
    assert (tmp_path / "run" / "train" / "model-unmerged" / "config.json").exists()
    assert ran(run_config(merge_alpha=0.5)) == []


def test_no_synthetic_test_split_evaluates_on_the_human_labelled_set_alone(run_config, tmp_path):
    # With a human-labelled --eval-set a user may give the synthetic test passages to training
    # (test_fraction 0); evaluate then scores the labelled set and does not ask for a synthetic one.
    from embedforge.files import read_json
    from test_evaluate import write_beir

    with pytest.raises(EmbedforgeError, match="test_fraction 0 leaves nothing to evaluate"):
        run_config(test_fraction=0)
    labelled = write_beir(tmp_path / "labelled")
    assert ran(run_config(test_fraction=0, eval_set=[labelled])) == ["generate", "mine", "train", "evaluate"]
    results = read_json(tmp_path / "run" / runs.RESULTS)
    assert set(results["eval_sets"]) == {"labelled"}
    assert set(results["eval_sets"]["labelled"]["models"]) >= {"base", "fine-tuned"}
    assert "synthetic-test uses LLM-written queries" not in (tmp_path / "run" / runs.REPORT).read_text()


def test_a_checkout_in_another_place_reruns_nothing_and_an_edited_file_is_named(run_config, tmp_path):
    # A nightly job often runs in a fresh workspace: the same prompt and eval set files, elsewhere.
    from test_evaluate import write_beir

    first = tmp_path / "checkout-1"
    first.mkdir()
    prompt = shutil.copyfile(run_config().generate.prompt[0], first / "prompt.toml")
    labelled, other = write_beir(first / "labelled"), write_beir(first / "other")
    assert ran(run_config(prompt=prompt, eval_set=[labelled], regression_set=[other])) == ["generate", "mine", "train", "evaluate"]

    second = shutil.copytree(first, tmp_path / "checkout-2")
    shutil.rmtree(first)
    moved = dict(prompt=second / "prompt.toml", eval_set=[second / "labelled"], regression_set=[second / "other"])
    assert runs.status(run_config(**moved)) == {stage: "up to date" for stage in runs.STAGES}
    assert ran(run_config(**moved)) == []

    # What changed is named by the setting that gave the file.
    with (second / "other" / "queries.jsonl").open("a") as queries:
        queries.write('{"_id": "unjudged", "text": "a query nobody judged"}\n')
    assert runs.status(run_config(**moved))["evaluate"] == "stale (changed: input regression_set[0] other/queries.jsonl)"
    (second / "prompt.toml").write_text((second / "prompt.toml").read_text().replace("Use your own words.", "Use your own words, please."))
    assert runs.status(run_config(**moved))["generate"] == "stale (changed: input prompt[0])"
