"""compare(): every model on every eval set against the reference; evaluate(): the stage's files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from embedforge.evaluate.data import SYNTHETIC_TEST, EvalSet
from embedforge.evaluate.leaks import contamination
from embedforge.evaluate.metrics import paired_bootstrap, randomization_p_value, verdict
from embedforge.evaluate.report import render_chart, render_report
from embedforge.evaluate.retrieval import BM25_MODEL, METRICS_VERSION, evaluate_model
from embedforge.embeddings import load_model
from embedforge.files import write_json, write_text
from embedforge.merging import save_merged

logger = logging.getLogger(__name__)

STAGE_VERSION = 3  # 2: BM25 row, contamination check, report.png, biggest per-query changes; 3: regression verdicts by the comparison's own rule (CI and p-value)
HEADLINE = ("ndcg@10", "recall@10", "recall@100", "mrr@10")  # compared with CIs and p-values
CHANGES_SHOWN = 5
OFFERED_ALPHAS = (0.75, 0.5, 0.25)  # merges offered when the fine-tuned model forgets, most fine-tuned first


def _mean(per_query: dict[str, float]) -> float:
    return float(np.mean(list(per_query.values()))) if per_query else 0.0


def _rounded(per_query: dict[str, float]) -> dict[str, float]:
    return {query: round(value, 6) for query, value in per_query.items()}


def versus_reference(reference: dict, result: dict, resamples: int, seed: int) -> dict:
    """Paired bootstrap 95% CI, randomization p-value and verdict (both must agree) of the mean difference, per headline metric."""
    comparison = {}
    for metric in HEADLINE:
        query_ids = list(reference["binary"][metric])
        differences = np.array([result["binary"][metric][q] - reference["binary"][metric][q] for q in query_ids])
        low, high = paired_bootstrap(differences, resamples, seed)
        p_value = randomization_p_value(differences, resamples, seed)
        comparison[metric] = {
            "delta": round(float(differences.mean()), 6),
            "ci95": [round(low, 6), round(high, 6)],
            "p_value": round(p_value, 6),
            "verdict": verdict(low, high, p_value),
        }
    return comparison


def regression_verdict(versus: dict) -> str:
    """On another domain's set: "forgets" when the NDCG@10 difference is significantly below zero,
    "gains" when above, else "holds". Read off the comparison's own verdict (CI and p-value must
    agree), so the report never says "gains" beside "no significant difference" for one comparison."""
    return {"worse": "forgets", "better": "gains"}.get(versus["verdict"], "holds")


def regression_notes(results: dict) -> list[str]:
    """One line per other-domain set the fine-tuned model forgets (for the report's caveats and the screen)."""
    notes = []
    for name, entry in results["eval_sets"].items():
        for label, model in entry["models"].items():
            if model.get("regression") == "forgets":
                versus = model["versus_reference"]["ndcg@10"]
                notes.append(f"{label} forgets {name.removeprefix('regression:')}: NDCG@10 Δ {versus['delta']:+.4f} [{versus['ci95'][0]:+.4f}, {versus['ci95'][1]:+.4f}] "
                             f"against {results['reference']} on that domain; keep {results['reference']} where it serves that domain too, "
                             "or try a model merged with it (--merge-alpha 0.5, or auto)")
    return notes


def biggest_changes(eval_set: EvalSet, reference: dict, result: dict, count: int = CHANGES_SHOWN) -> dict:
    """The queries whose NDCG@10 rose most and fell most against the reference, with both top-3 lists."""
    before, after = reference["binary"]["ndcg@10"], result["binary"]["ndcg@10"]
    deltas = {query: after[query] - before[query] for query in eval_set.queries}

    def row(query: str) -> dict:
        shown = reference["ranked"].get(query, [])[:3] + result["ranked"].get(query, [])[:3]
        return {
            "query_id": query, "query": eval_set.queries[query], "delta": round(deltas[query], 6),
            "reference_ndcg@10": round(before[query], 6), "model_ndcg@10": round(after[query], 6),
            "reference_top3": reference["ranked"].get(query, [])[:3], "model_top3": result["ranked"].get(query, [])[:3],
            "relevant_shown": sorted({doc for doc in shown if doc in eval_set.qrels[query]}),
        }

    gained = sorted((q for q in deltas if deltas[q] > 0), key=lambda q: (-deltas[q], q))[:count]
    lost = sorted((q for q in deltas if deltas[q] < 0), key=lambda q: (deltas[q], q))[:count]
    return {"gained": [row(q) for q in gained], "lost": [row(q) for q in lost]}


def compare(eval_sets: list[EvalSet], models: list[tuple[str, str]], cache_dir: Path | None, resamples: int = 10_000, seed: int = 0,
            batch_size: int = 64, train_rows: list[dict] | None = None, prompts: dict[str, dict[str, str]] | None = None,
            encode_backend: str = "torch", engine=None) -> dict:
    """Results for every (eval set, model); the first model is the reference for deltas and CIs.

    `models` are (label, model name or path) pairs; the name "bm25" is the BM25 lexical reference.
    `prompts` maps a model name to the query/document prompts that override its own.
    """
    prompts = prompts or {}
    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique: {labels}")
    reference_label = labels[0]
    results = {"reference": reference_label, "metrics_version": METRICS_VERSION, "eval_sets": {}}
    for eval_set in eval_sets:
        graded = any(grade > 1 for docs in eval_set.qrels.values() for grade in docs.values())
        check = contamination(train_rows, eval_set) if train_rows is not None else None
        if check is not None and not check["clean"]:
            logger.warning("CONTAMINATION in %s: %d shared query texts, %d shared positives", eval_set.name, check["shared_query_texts"], check["shared_positives"])
        entry = {"source": eval_set.source, "queries": len(eval_set.queries), "passages": len(eval_set.passages), "graded_qrels": graded,
                 **({"documents": len(set(eval_set.documents.values()))} if eval_set.documents else {}), "role": eval_set.role,
                 "contamination": check, "models": {}}
        per_model = {label: evaluate_model(name, eval_set, cache_dir, batch_size, prompts.get(name), encode_backend, engine) for label, name in models}
        reference = per_model[reference_label]
        for label, model_name in models:
            result = per_model[label]
            scores = {name: round(_mean(values), 6) for name, values in result["binary"].items()}
            scores.update({f"graded_{name}": round(_mean(values), 6) for name, values in result["graded"].items() if name.startswith("ndcg")})
            # The chart's whiskers: a bootstrap over queries of this model's own mean NDCG@10.
            low, high = paired_bootstrap(np.array(list(result["binary"]["ndcg@10"].values())), resamples, seed)
            per_query = {name: _rounded(values) for name, values in result["binary"].items()}
            per_query.update({f"graded_{name}": _rounded(values) for name, values in result["graded"].items() if name.startswith("ndcg")})
            model_entry = {"model": model_name, **({"prompts": prompts[model_name]} if prompts.get(model_name) else {}), "scores": scores, "ci95": {"ndcg@10": [round(low, 6), round(high, 6)]}, "per_query": per_query}
            if label != reference_label:
                model_entry["versus_reference"] = versus_reference(reference, result, resamples, seed)
                if eval_set.role == "regression" and model_name != BM25_MODEL:
                    model_entry["regression"] = regression_verdict(model_entry["versus_reference"]["ndcg@10"])
                if model_name != BM25_MODEL:  # the examples are about what fine-tuning changed
                    model_entry["changes"] = biggest_changes(eval_set, reference, result)
            entry["models"][label] = model_entry
        results["eval_sets"][eval_set.name] = entry
    return results


def judge_note(results: dict, label: str, dev_improved: bool | None) -> str | None:
    """When the dev split (queries written like the training ones) says `label` improved and a
    human-labelled set says it is worse, which one decides: the human-labelled set. (The
    opposite case is the train guard's note.)"""
    if not dev_improved:
        return None
    worse = [name for name, entry in results["eval_sets"].items()
             if entry["role"] == "target" and name != SYNTHETIC_TEST and entry["models"].get(label, {}).get("versus_reference", {}).get("ndcg@10", {}).get("verdict") == "worse"]
    if not worse:
        return None
    return (f"The dev split rose, but on {', '.join(worse)} (human-labelled) {label} is worse than {results['reference']}: "
            f"dev queries are written like the training ones and flatter it, so the human-labelled set decides: keep {results['reference']}.")


def forgotten(results: dict, label: str) -> list[str]:
    """The regression sets on which the model `label` forgets."""
    return [name for name, entry in results["eval_sets"].items() if entry["models"].get(label, {}).get("regression") == "forgets"]


def offer_merge(results: dict, eval_sets: list[EvalSet], models: list[tuple[str, str]], label: str, out_dir: Path, cache_dir: Path | None,
                resamples: int, seed: int, batch_size: int, encode_backend: str, engine=None) -> dict:
    """When `label` forgets a regression set: its merges with the reference model, from the most
    fine-tuned down (OFFERED_ALPHAS), each evaluated on every set beside the others, until one
    forgets none. The one that does is kept in `out_dir/merged-<alpha>`; the merged rows join
    `results`. Returns what was tried."""
    reference = models[0]
    base, tuned = load_model(reference[1]), load_model(dict(models)[label])
    tried = {}
    for alpha in OFFERED_ALPHAS:
        merged_label = f"merged-{alpha:g}"
        folder = save_merged(base, tuned, alpha, out_dir / merged_label)
        extra = compare(eval_sets, [reference, (merged_label, str(folder))], cache_dir, resamples, seed, batch_size, encode_backend=encode_backend, engine=engine)
        for name, entry in extra["eval_sets"].items():
            results["eval_sets"][name]["models"][merged_label] = entry["models"][merged_label]
        tried[f"{alpha:g}"] = forgotten(extra, merged_label)
        if not tried[f"{alpha:g}"]:
            return {"of": label, "alpha": alpha, "model": str(folder), "forgets_by_alpha": tried}
        shutil.rmtree(folder)
    return {"of": label, "alpha": None, "model": None, "forgets_by_alpha": tried}


def merge_offer_note(offer: dict, results: dict) -> str:
    if offer["alpha"] is None:
        return (f"No merge of {offer['of']} with {results['reference']} (alpha {', '.join(offer['forgets_by_alpha'])}) stops it forgetting: "
                f"keep {results['reference']} for those domains.")
    label = f"merged-{offer['alpha']:g}"
    elsewhere = [f"{name} NDCG@10 Δ {entry['models'][label]['versus_reference']['ndcg@10']['delta']:+.4f}"
                 for name, entry in results["eval_sets"].items() if label in entry["models"]]
    return (f"Offered instead: {label}, {offer['alpha']:g} x {offer['of']} + {1 - offer['alpha']:g} x {results['reference']} ({offer['model']}), which forgets "
            f"no regression set ({'; '.join(elsewhere)} against {results['reference']}); to train and ship it, rerun with --merge-alpha {offer['alpha']:g}.")


def evaluate(eval_sets: list[EvalSet], models: list[tuple[str, str]], out_dir: Path, cache_dir: Path | None, resamples: int, seed: int,
             batch_size: int = 64, notes: list[str] | None = None, bm25: bool = True, train_rows: list[dict] | None = None,
             prompts: dict[str, dict[str, str]] | None = None, encode_backend: str = "torch", fine_tuned: str | None = None,
             dev_improved: bool | None = None, engine=None) -> dict:
    """Write results.json, report.md and report.png to `out_dir`; return headline numbers for the manifest.

    With `bm25`, a BM25 row (label "bm25") joins the models as the lexical reference. With
    `train_rows` (mine/train.jsonl), each eval set is checked for test data among the training pairs.
    `fine_tuned` is the label of the fine-tuned model, if one is compared: it is offered a merge
    with the reference when it forgets a regression set (see offer_merge), and `dev_improved`
    (the train stage's dev verdict on it) is weighed against the human-labelled sets (judge_note).
    `engine` (a `embeddings.cluster.RaySettings`) encodes the corpora on Ray.
    """
    out_dir = Path(out_dir)
    models = list(models)
    if bm25 and all(name != BM25_MODEL and label != "bm25" for label, name in models):
        models.append(("bm25", BM25_MODEL))
    results = compare(eval_sets, models, cache_dir, resamples, seed, batch_size, train_rows=train_rows, prompts=prompts, encode_backend=encode_backend, engine=engine)
    notes = list(notes or []) + regression_notes(results)
    judged = judge_note(results, fine_tuned, dev_improved) if fine_tuned else None
    if judged:
        notes.append(judged)
    for stale in out_dir.glob("merged-*"):  # an earlier evaluation's offer, of another model
        shutil.rmtree(stale)
    if fine_tuned and forgotten(results, fine_tuned):
        results["merge_offer"] = offer_merge(results, eval_sets, models, fine_tuned, out_dir, cache_dir, resamples, seed, batch_size, encode_backend, engine)
        notes.append(merge_offer_note(results["merge_offer"], results))
    results["notes"] = notes
    render_chart(results, out_dir / "report.png")
    write_text(out_dir / "report.md", render_report(results, notes))
    write_json(out_dir / "results.json", results)
    summary = {"merge_offer_alpha": results["merge_offer"]["alpha"]} if "merge_offer" in results else {}
    for name, entry in results["eval_sets"].items():
        for label, model in entry["models"].items():
            summary[f"{name}/{label}/ndcg@10"] = model["scores"]["ndcg@10"]
            if "regression" in model:
                summary[f"{name}/{label}/regression"] = model["regression"]
        if entry["contamination"] is not None:
            summary[f"{name}/contamination/shared_query_texts"] = entry["contamination"]["shared_query_texts"]
            summary[f"{name}/contamination/shared_positives"] = entry["contamination"]["shared_positives"]
    return summary
