"""Evaluate stage: BM25 row, contamination check, report files, biggest changes, decision helper, CLI.

Offline and small: a 40-passage toy corpus whose queries name their passage's topic word, so a
lexical match decides; tiny BERT models built on the fly.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_tiny_model, make_passages, write_corpus

from embedforge import evaluate as evaluate_stage
from embedforge.evaluate import (
    BM25_MODEL, METRICS, EvalSet, biggest_changes, bm25_retrieve, contamination, decide, decide_for_run, evaluate, evaluate_model, load_beir,
)
from embedforge.evaluate.leaks import contamination_line

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUERIES = 12


def write_beir(folder, count=QUERIES):
    """A BEIR folder: the toy corpus, one query per passage ("what about <topic> history"), graded qrels."""
    passages = make_passages()
    write_corpus(folder / "corpus.jsonl", passages)
    queries = [{"_id": f"q{i}", "text": f"what about {p['title']} history"} for i, p in enumerate(passages[:count])]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\t{p['_id']}\t{1 + i % 2}" for i, p in enumerate(passages[:count])]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def beir_folder(tmp_path):
    return write_beir(tmp_path / "toy")


@pytest.fixture(scope="module")
def other_tiny_model(tmp_path_factory):
    """A second tiny model that ranks differently from `tiny_model`.

    conftest's builder passes `vocab_file=` to BertTokenizerFast, which transformers 5 ignores, so
    `tiny_model` maps every word to [UNK]; this one gets a tokenizer that knows its words.
    """
    from transformers import BertTokenizerFast

    words = set(re.findall(r"[a-z]+", " ".join(p["text"] + " " + p["title"] for p in make_passages()).lower()))
    folder = tmp_path_factory.mktemp("tiny2")
    model = build_tiny_model(folder, sorted(words | {"what", "about", "history"}))
    BertTokenizerFast(vocab=str(folder / "raw" / "vocab.txt"), do_lower_case=True).save_pretrained(model)
    return str(model)


# --- contamination ------------------------------------------------------------------------------

def test_contamination_fires_on_planted_leak(beir_folder):
    eval_set = load_beir(beir_folder)
    clean_rows = [{"anchor": "how does a granite quarry work", "positive_id": "doc039"}]
    leaked_rows = clean_rows + [
        {"anchor": "  What about APPLE   history? ", "positive_id": "doc030"},  # q0's text, other case, spacing, punctuation
        {"anchor": "an unrelated question", "positive_id": "doc005"},  # q5's relevant passage
    ]
    check = contamination(leaked_rows, eval_set)
    assert check["shared_query_texts"] == 1 and check["shared_positives"] == 1
    assert not check["clean"]
    assert check["examples"] == {"query_texts": ["what about apple history"], "positive_ids": ["doc005"]}
    assert "CONTAMINATION" in contamination_line(check)

    clean = contamination(clean_rows, eval_set)
    assert clean["clean"] and clean["train_pairs"] == 1
    assert contamination_line(clean).startswith("contamination: 0 shared query texts, 0 shared positives")
    assert contamination_line(None) == "contamination: not checked (no training pairs given)"


# --- BM25 ---------------------------------------------------------------------------------------

def test_bm25_ranks_the_planted_passage_first(beir_folder, tmp_path):
    eval_set = load_beir(beir_folder)
    ranked = bm25_retrieve(eval_set)
    for query, relevant in eval_set.qrels.items():
        assert ranked[query][0] in relevant, query
    result = evaluate_model(BM25_MODEL, eval_set, tmp_path / "cache")
    assert np.mean(list(result["binary"]["recall@1"].values())) == 1.0
    assert np.mean(list(result["graded"]["ndcg@10"].values())) == pytest.approx(1.0)
    assert list((tmp_path / "cache" / "results").glob("*.json")), "BM25 results are cached like any model's"


def test_bm25_leaves_out_passages_without_a_shared_term():
    passages = [{"_id": "a", "title": "", "text": "apple orchard"}, {"_id": "b", "title": "", "text": "river engine"}]
    eval_set = EvalSet("t", "toy", passages, {"q1": "apple", "q2": "zebra"}, {"q1": {"a": 1}, "q2": {"b": 1}}, "sha")
    assert bm25_retrieve(eval_set) == {"q1": ["a"], "q2": []}


# --- biggest changes ----------------------------------------------------------------------------

def test_biggest_changes_orders_gains_and_losses():
    deltas = {"q1": 0.5, "q2": 0.1, "q3": -0.4, "q4": 0.0, "q5": 0.3, "q6": 0.2, "q7": 0.05, "q8": 0.6, "q9": -0.1}
    queries = {q: f"text of {q}" for q in deltas}
    eval_set = EvalSet("t", "toy", [], queries, {q: {"rel": 1} for q in deltas}, "sha")
    reference = {"binary": {"ndcg@10": {q: 0.3 for q in deltas}}, "ranked": {q: ["x", "rel", "y", "z"] for q in deltas}}
    model = {"binary": {"ndcg@10": {q: 0.3 + d for q, d in deltas.items()}}, "ranked": {q: ["rel", "x"] for q in deltas}}
    changes = biggest_changes(eval_set, reference, model)
    assert [row["query_id"] for row in changes["gained"]] == ["q8", "q1", "q5", "q6", "q2"]
    assert [row["query_id"] for row in changes["lost"]] == ["q3", "q9"]
    top = changes["gained"][0]
    assert top["query"] == "text of q8" and top["delta"] == pytest.approx(0.6)
    assert top["reference_top3"] == ["x", "rel", "y"] and top["model_top3"] == ["rel", "x"] and top["relevant_shown"] == ["rel"]


# --- the stage's files --------------------------------------------------------------------------

def test_evaluate_writes_results_report_and_chart(beir_folder, tmp_path, tiny_model, other_tiny_model, monkeypatch):
    eval_set = load_beir(beir_folder, name="toy", source="hand-written toy queries")
    out, cache = tmp_path / "out", tmp_path / "cache"
    train_rows = [{"anchor": "what about walnut history", "positive_id": "doc031"}]  # no test query or positive
    models = [("base", tiny_model), ("fine-tuned", other_tiny_model)]
    summary = evaluate([eval_set], models, out, cache, resamples=200, seed=0, batch_size=16, notes=["a caveat"], train_rows=train_rows)

    results = json.loads((out / "results.json").read_text())
    entry = results["eval_sets"]["toy"]
    assert list(entry["models"]) == ["base", "fine-tuned", "bm25"]
    for label, model in entry["models"].items():
        assert set(METRICS) | {"graded_ndcg@1", "graded_ndcg@5", "graded_ndcg@10"} <= set(model["scores"]), label
        assert set(model["per_query"]["ndcg@10"]) == set(eval_set.queries)
        low, high = model["ci95"]["ndcg@10"]
        assert low <= model["scores"]["ndcg@10"] <= high
    assert entry["models"]["bm25"]["scores"]["ndcg@10"] == pytest.approx(1.0)
    assert entry["models"]["bm25"]["versus_reference"]["ndcg@10"]["verdict"] in {"better", "no significant difference"}
    assert entry["contamination"]["clean"] and entry["graded_qrels"]
    changes = entry["models"]["fine-tuned"]["changes"]
    assert changes["gained"] or changes["lost"]
    assert all(row["delta"] > 0 for row in changes["gained"]) and all(row["delta"] < 0 for row in changes["lost"])
    assert "changes" not in entry["models"]["bm25"]
    assert summary["toy/bm25/ndcg@10"] == pytest.approx(1.0) and summary["toy/contamination/shared_positives"] == 0

    report = (out / "report.md").read_text()
    versus = entry["models"]["fine-tuned"]["versus_reference"]["ndcg@10"]
    assert f"- fine-tuned vs base: {versus['verdict']} (NDCG@10 Δ {versus['delta']:+.4f} [" in report
    assert "- bm25 vs base: " in report and "| bm25 |" in report and "| base |" in report
    assert "contamination: 0 shared query texts, 0 shared positives" in report
    assert "queries that gained most" in report and "queries that lost most" in report
    assert "hand-written toy queries" in report and "- a caveat" in report

    png = (out / "report.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(out / "report.png") as image:
        image.verify()
        assert image.size[0] > 300 and image.size[1] > 200
    import matplotlib.image

    assert matplotlib.image.imread(out / "report.png").ndim == 3

    # Everything the report needs, ranked lists included, comes back from the cache without a model.
    def no_model(*args, **kwargs):
        raise AssertionError("evaluated again instead of reading the cache")

    monkeypatch.setattr(evaluate_stage.retrieval, "retrieve", no_model)
    monkeypatch.setattr(evaluate_stage.retrieval, "bm25_retrieve", no_model)
    evaluate([eval_set], models, tmp_path / "again", cache, resamples=200, seed=0, batch_size=16, notes=["a caveat"], train_rows=train_rows)
    assert (tmp_path / "again" / "results.json").read_text() == (out / "results.json").read_text()
    assert (tmp_path / "again" / "report.md").read_text() == report


def test_evaluate_reports_contamination_loudly(beir_folder, tmp_path, tiny_model):
    eval_set = load_beir(beir_folder, name="toy")
    leaked = [{"anchor": "what about river history", "positive_id": "doc001"}]
    evaluate([eval_set], [("base", tiny_model)], tmp_path / "out", tmp_path / "cache", resamples=100, seed=0, bm25=False, train_rows=leaked)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["eval_sets"]["toy"]["models"]) == ["base"]
    assert results["eval_sets"]["toy"]["contamination"]["shared_query_texts"] == 1
    assert "⚠ CONTAMINATION: 1 of 12 test query texts" in (tmp_path / "out" / "report.md").read_text()


# --- decision helper ----------------------------------------------------------------------------

def choose(**changes):
    facts = dict(target=0.55, base_ndcg=0.40, finetuned_ndcg=0.50, delta_ci=(0.05, 0.12), bm25_ndcg=0.30, pairs=5000, corpus_size=100_000, throughput=200.0)
    facts.update(changes)
    return decide(**facts)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"base_ndcg": 0.56}, "off-the-shelf"),  # the base model is already good enough
        ({"pairs": 400}, "generate more data first"),
        ({"delta_ci": (-0.08, 0.12)}, "generate more data first"),  # 0.20 wide: cannot tell
        ({"delta_ci": (-0.02, 0.03)}, "off-the-shelf"),  # narrow and spans 0: fine-tuning did not help
        ({"delta_ci": (-0.06, -0.01), "finetuned_ndcg": 0.36}, "off-the-shelf"),  # worse: keep the base
        ({"finetuned_ndcg": 0.60, "delta_ci": (0.15, 0.24)}, "fine-tune"),  # better and reaches the target
        ({"bm25_ndcg": 0.47}, "fine-tune + hybrid retrieval"),  # better, under target, BM25 close
        ({}, "fine-tune"),  # better, under target, BM25 far behind
        ({"finetuned_ndcg": None, "delta_ci": None}, "generate more data first"),
    ],
)
def test_decide_rules(changes, expected):
    assert choose(**changes).recommendation == expected


def test_verdict_needs_the_p_value_to_agree():
    from embedforge.evaluate import verdict

    assert verdict(0.01, 0.2) == "better" and verdict(0.01, 0.2, p_value=0.01) == "better"
    assert verdict(0.01, 0.2, p_value=0.07) == "no significant difference"
    assert choose(p_value=0.07).recommendation == "off-the-shelf"  # the CI alone says better; the test does not


def test_decide_estimates_reindex_time_from_throughput():
    decision = choose(finetuned_ndcg=0.60, delta_ci=(0.15, 0.24), corpus_size=120_000, throughput=400.0)
    assert decision.reindex_seconds == pytest.approx(300.0)
    assert any("5.0 min" in reason and "400.0 passages/s" in reason for reason in decision.reasons)
    assert choose(throughput=None).reindex_seconds is None


def fake_run(run_dir, tiny_model, rows=1500):
    """A run directory as decide_for_run reads it: corpus, manifest (mine stats) and evaluate/results.json."""
    write_corpus(run_dir / "corpus.jsonl", make_passages())
    (run_dir / "manifest.json").write_text(json.dumps({"stages": {"mine": {"stats": {"rows": rows}}}}))

    def model(name, ndcg, ci=None):
        entry = {"model": name, "scores": {"ndcg@10": ndcg}}
        if ci:
            entry["versus_reference"] = {"ndcg@10": {"delta": ndcg - 0.40, "ci95": ci, "p_value": 0.001, "verdict": "better"}}
        return entry

    def eval_set(source, base, tuned, ci):
        models = {"base": model(tiny_model, base), "fine-tuned": model(tiny_model, tuned, ci), "bm25": model("bm25", 0.45, [0.0, 0.1])}
        return {"source": source, "queries": 300, "models": models}

    results = {"reference": "base", "eval_sets": {
        "synthetic-test": eval_set("LLM-written", 0.40, 0.70, [0.25, 0.33]),
        "labelled": eval_set("human labels", 0.40, 0.48, [0.05, 0.11]),
    }}
    (run_dir / "evaluate").mkdir(parents=True)
    (run_dir / "evaluate" / "results.json").write_text(json.dumps(results))
    return run_dir


def test_decide_for_run_measures_throughput_on_the_labelled_set(tmp_path, tiny_model):
    run_dir = fake_run(tmp_path / "run", tiny_model)
    decision = decide_for_run(run_dir, 0.55, sample=20)
    # The human-labelled set is the yardstick (the synthetic one would say "fine-tune" at 0.70).
    assert decision.facts["eval_set"] == "labelled"
    assert decision.recommendation == "fine-tune + hybrid retrieval"  # 0.48 < 0.55, BM25 0.45 >= 0.9 * 0.48
    assert decision.facts["pairs"] == 1500 and decision.facts["corpus_size"] == 40
    assert decision.facts["throughput_passages_per_s"] > 0
    assert decision.reindex_seconds == pytest.approx(40 / decision.facts["throughput_passages_per_s"])


def test_decide_cli(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from embedforge.cli import app

    run_dir = fake_run(tmp_path / "run", tiny_model, rows=300)
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--decide", "--target", "0.55", "--run", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "Recommendation: generate more data first" in result.output and "only 300 training pairs" in result.output
    missing_target = runner.invoke(app, ["evaluate", "--decide", "--run", str(run_dir)])
    assert missing_target.exit_code != 0 and "--target" in str(missing_target.exception)


# --- standalone CLI -----------------------------------------------------------------------------

def test_standalone_cli_writes_results(beir_folder, tmp_path, tiny_model):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "EMBEDFORGE_PROGRESS": "0"}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "embedforge", "evaluate", "--eval-set", str(beir_folder), "--model", tiny_model, "--out", str(out),
               "--cache", str(tmp_path / "cache"), "--bootstrap-resamples", "200", "--encode-backend", "torch"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["eval_sets"]["toy"]["models"]) == ["model", "bm25"]
    assert (out / "report.md").exists() and (out / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "| bm25 |" in result.stdout


@pytest.mark.parametrize("tuned_value, expected", [(0.5, "forgets"), (1.0, "holds")])
def test_a_regression_set_says_forgets_only_when_the_whole_ci_is_below_zero(beir_folder, tmp_path, monkeypatch, tuned_value, expected):
    from dataclasses import replace

    from embedforge.evaluate import stage

    eval_set = replace(load_beir(beir_folder, name="regression:toy"), role="regression")

    def scored(name, eval_set, *arguments, **options):
        per_query = {query: 1.0 if name == "base-model" else tuned_value for query in eval_set.queries}
        return {"binary": {metric: per_query for metric in METRICS}, "graded": {"ndcg@10": per_query}, "ranked": {query: [] for query in eval_set.queries}}

    monkeypatch.setattr(stage, "evaluate_model", scored)
    summary = stage.evaluate([eval_set], [("base", "base-model"), ("fine-tuned", "tuned-model")], tmp_path / "out", None, resamples=200, seed=0, bm25=False)
    entry = json.loads((tmp_path / "out" / "results.json").read_text())["eval_sets"]["regression:toy"]
    assert entry["role"] == "regression" and entry["models"]["fine-tuned"]["regression"] == expected
    assert summary["regression:toy/fine-tuned/regression"] == expected and "regression" not in entry["models"]["base"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"**fine-tuned on toy: {expected}**" in report
    assert ("fine-tuned forgets toy" in report) == (expected == "forgets")


@pytest.mark.parametrize("ci95, p_value, expected", [
    ([0.00003, 0.0217], 0.0545, "holds"),  # nfcorpus's default run on LegalSummarization, 2026-12-07: the report said "gains" beside "no significant difference"
    ([0.0041, 0.0185], 0.002, "gains"),
    ([-0.0150, -0.0001], 0.07, "holds"),
    ([-0.0150, -0.0030], 0.004, "forgets"),
])
def test_a_regression_verdict_agrees_with_the_comparisons_own_verdict(ci95, p_value, expected):
    from embedforge.evaluate.metrics import verdict
    from embedforge.evaluate.stage import regression_verdict

    versus = {"delta": sum(ci95) / 2, "ci95": ci95, "p_value": p_value, "verdict": verdict(*ci95, p_value)}
    assert regression_verdict(versus) == expected


def test_a_model_that_forgets_is_offered_the_least_merged_model_that_does_not(beir_folder, tmp_path, monkeypatch, tiny_model):
    from dataclasses import replace

    from embedforge.evaluate import stage

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model, tuned)
    regression = replace(load_beir(beir_folder, name="regression:toy"), role="regression")
    human = load_beir(beir_folder, name="human")
    # By model: the fine-tuned one and its 0.75 merge forget the regression domain, the 0.5 merge does not.
    values = {tiny_model: 1.0, str(tuned): 0.5, str(tmp_path / "out" / "merged-0.75"): 0.6, str(tmp_path / "out" / "merged-0.5"): 1.0}
    evaluated = []

    def scored(name, eval_set, *arguments, **options):
        evaluated.append(name)
        value = values[name] if eval_set.role == "regression" else 1.0
        per_query = {query: value for query in eval_set.queries}
        return {"binary": {metric: per_query for metric in METRICS}, "graded": {"ndcg@10": per_query}, "ranked": {query: [] for query in eval_set.queries}}

    monkeypatch.setattr(stage, "evaluate_model", scored)
    (tmp_path / "out" / "merged-0.25").mkdir(parents=True)  # an earlier evaluation's offer
    summary = stage.evaluate([human, regression], [("base", tiny_model), ("fine-tuned", str(tuned))], tmp_path / "out", None, resamples=200, seed=0,
                             bm25=False, fine_tuned="fine-tuned")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["merge_offer"] == {"of": "fine-tuned", "alpha": 0.5, "model": str(tmp_path / "out" / "merged-0.5"),
                                      "forgets_by_alpha": {"0.75": ["regression:toy"], "0.5": []}}
    assert summary["merge_offer_alpha"] == 0.5
    assert results["eval_sets"]["regression:toy"]["models"]["merged-0.5"]["regression"] == "holds"
    assert set(results["eval_sets"]["human"]["models"]) == {"base", "fine-tuned", "merged-0.75", "merged-0.5"}
    assert sorted(path.name for path in (tmp_path / "out").glob("merged-*")) == ["merged-0.5"]  # the refused merge and the stale one are gone
    assert "rerun with --merge-alpha 0.5" in (tmp_path / "out" / "report.md").read_text()
    # Nothing forgotten: nothing merged or offered.
    values[str(tuned)] = 1.0
    stage.evaluate([regression], [("base", tiny_model), ("fine-tuned", str(tuned))], tmp_path / "out", None, resamples=200, seed=0, bm25=False,
                   fine_tuned="fine-tuned")
    assert "merge_offer" not in json.loads((tmp_path / "out" / "results.json").read_text()) and not list((tmp_path / "out").glob("merged-*"))


def test_standalone_evaluate_cuts_documents_when_asked(beir_folder, tmp_path, tiny_model):
    from typer.testing import CliRunner

    from embedforge.cli import app

    arguments = ["evaluate", "--eval-set", str(beir_folder), "--model", tiny_model, "--cache", str(tmp_path / "cache"), "--bootstrap-resamples", "200"]
    for name, extra in (("whole", []), ("cut", ["--chunk-tokens", "12"])):
        result = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    whole, cut = (json.loads((tmp_path / name / "results.json").read_text())["eval_sets"]["toy"] for name in ("whole", "cut"))
    assert "documents" not in whole and cut["documents"] == whole["passages"] < cut["passages"]


@pytest.mark.parametrize("dev_improved, human_value, says", [(True, 0.5, True), (True, 1.0, False), (False, 0.5, False), (None, 0.5, False)])
def test_when_dev_rises_and_a_human_set_falls_the_human_set_decides(beir_folder, tmp_path, monkeypatch, dev_improved, human_value, says):
    from embedforge.evaluate import stage

    synthetic, human = load_beir(beir_folder, name=stage.SYNTHETIC_TEST), load_beir(beir_folder, name="human")

    def scored(name, eval_set, *arguments, **options):
        # The fine-tuned model is worse than the base on the synthetic set too: only human sets are judged.
        value = 1.0 if name == "base-model" else (human_value if eval_set.name == "human" else 0.5)
        per_query = {query: value for query in eval_set.queries}
        return {"binary": {metric: per_query for metric in METRICS}, "graded": {"ndcg@10": per_query}, "ranked": {query: [] for query in eval_set.queries}}

    monkeypatch.setattr(stage, "evaluate_model", scored)
    stage.evaluate([synthetic, human], [("base", "base-model"), ("fine-tuned", "tuned-model")], tmp_path / "out", None, resamples=200, seed=0, bm25=False,
                   fine_tuned="fine-tuned", dev_improved=dev_improved)
    note = "The dev split rose, but on human (human-labelled) fine-tuned is worse than base"
    assert (note in (tmp_path / "out" / "report.md").read_text()) == says
    assert not says or "synthetic-test" not in next(n for n in json.loads((tmp_path / "out" / "results.json").read_text())["notes"] if n.startswith("The dev split rose"))
