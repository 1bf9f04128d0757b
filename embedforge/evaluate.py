"""Stage 4, evaluate: base and fine-tuned models side by side on held-out queries.

Reads:  eval sets in BEIR layout (the run's synthetic held-out test set, and any --eval-set
        folder with its own corpus), the models to compare, the shared embedding cache.
Writes: evaluate/results.json (per eval set, per model: metrics, per-query scores, paired
        bootstrap CIs and randomization p-values against the first model), evaluate/report.md.
Keeps:  per (model, eval set) results in cache/results/, so an unchanged base model on an
        unchanged eval set is never evaluated twice.

Metrics are computed here from the ranked lists (pure functions, checked against hand-computed
cases): binary NDCG reproduces sentence-transformers' InformationRetrievalEvaluator, graded
NDCG uses the qrels' grades as linear gains (pytrec_eval / MTEB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedforge.errors import EmbedforgeError
from embedforge.files import iter_jsonl, read_json, sha256_file, sha256_json, write_json, write_text

STAGE_VERSION = 1
METRICS_VERSION = 1
TOP_K = 100
HEADLINE = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


@dataclass
class EvalSet:
    name: str
    source: str  # where the queries come from, for the report
    passages: list[dict]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    sha256: str


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise EmbedforgeError("Qrels file not found", where=str(path), fix="an eval set needs qrels/test.tsv (query-id, corpus-id, score)") from error
    for number, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if not line.strip() or (number == 1 and not fields[-1].strip().lstrip("-").isdigit()):
            continue  # blank lines and the header
        if len(fields) != 3 or not fields[2].strip().lstrip("-").isdigit():
            raise EmbedforgeError("Qrels lines need three tab-separated fields: query-id, corpus-id, integer score", where=f"{path}, line {number}", fix="fix that line")
        qrels.setdefault(fields[0], {})[fields[1]] = int(fields[2])
    return qrels


def load_beir(folder: Path, split: str = "test", passages: list[dict] | None = None, name: str | None = None, source: str | None = None) -> EvalSet:
    """A BEIR folder; `passages` replaces its corpus.jsonl (the run's held-out set uses the run corpus)."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not folder.is_dir():
        raise EmbedforgeError("Eval set folder not found", where=str(folder), fix="pass --eval-set with a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    if passages is None:
        passages = [{"_id": str(row["_id"]), "title": row.get("title") or "", "text": row.get("text") or ""} for row in iter_jsonl(folder / "corpus.jsonl")]
    qrels = read_qrels(qrels_path)
    queries = {str(row["_id"]): row["text"] for row in iter_jsonl(folder / "queries.jsonl") if str(row["_id"]) in qrels}
    qrels = {query: {doc: grade for doc, grade in docs.items() if grade > 0} for query, docs in qrels.items() if query in queries}
    qrels = {query: docs for query, docs in qrels.items() if docs}
    if not qrels:
        raise EmbedforgeError(f"No query with a relevant passage in qrels/{split}.tsv", where=str(folder), fix="check that query ids match queries.jsonl")
    digest = sha256_json({"corpus": sha256_json([[p["_id"], p.get("title", ""), p["text"]] for p in passages]), "queries": queries, "qrels": qrels})
    return EvalSet(name=name or folder.name, source=source or f"{folder} (qrels/{split}.tsv)", passages=passages, queries={q: queries[q] for q in qrels}, qrels=qrels, sha256=digest)


def ir_metrics(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], graded: bool = False) -> dict[str, dict[str, float]]:
    """Per-query NDCG@1/5/10, Recall@1/5/10/50/100, MRR@10, MAP@100 from ranked id lists."""
    metrics: dict[str, dict[str, float]] = {}
    for query, relevant in qrels.items():
        ranking = ranked.get(query, [])
        gains = [float(relevant.get(doc, 0)) if graded else float(doc in relevant) for doc in ranking]
        ideal = sorted((float(g) if graded else 1.0 for g in relevant.values()), reverse=True)
        row = {}
        for k in (1, 5, 10):
            dcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains[:k]))
            idcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(ideal[:k]))
            row[f"ndcg@{k}"] = dcg / idcg if idcg else 0.0
        for k in (1, 5, 10, 50, 100):
            row[f"recall@{k}"] = sum(1 for doc in ranking[:k] if doc in relevant) / len(relevant)
        row["mrr@10"] = next((1.0 / (rank + 1) for rank, doc in enumerate(ranking[:10]) if doc in relevant), 0.0)
        hits, precision_sum = 0, 0.0
        for rank, doc in enumerate(ranking[:100]):
            if doc in relevant:
                hits += 1
                precision_sum += hits / (rank + 1)
        row["map@100"] = precision_sum / min(100, len(relevant))
        for name, value in row.items():
            metrics.setdefault(name, {})[query] = value
    return metrics


def paired_bootstrap(differences: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of paired per-query differences."""
    differences = np.asarray(differences, dtype=np.float64)
    if differences.size == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks bound memory on large query sets
        count = min(1000, resamples - start)
        means[start : start + count] = differences[rng.integers(0, differences.size, size=(count, differences.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def randomization_p_value(differences: np.ndarray, resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired randomization (sign-flip) test of a zero mean difference."""
    differences = np.asarray(differences, dtype=np.float64)
    if differences.size == 0 or not differences.any():
        return 1.0
    rng = np.random.default_rng(seed + 1)
    observed = abs(differences.mean())
    extreme = 0
    for start in range(0, resamples, 1000):
        count = min(1000, resamples - start)
        signs = rng.choice((-1.0, 1.0), size=(count, differences.size))
        extreme += int((np.abs((signs * differences).mean(axis=1)) >= observed - 1e-12).sum())
    return (extreme + 1) / (resamples + 1)


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no significant difference"


def retrieve(model_name: str, eval_set: EvalSet, cache_dir: Path | None, batch_size: int) -> dict[str, list[str]]:
    from embedforge.embeddings import corpus_embeddings, encode_texts, load_model

    model = load_model(model_name)
    embeddings = corpus_embeddings(model_name, eval_set.passages, cache_dir, batch_size=batch_size, model=model)
    query_ids = list(eval_set.queries)
    query_vectors = encode_texts(model, [eval_set.queries[q] for q in query_ids], batch_size, kind="query")
    _, indices = embeddings.search(query_vectors, TOP_K)
    return {query: [embeddings.ids[i] for i in row if i >= 0] for query, row in zip(query_ids, indices)}


def evaluate_model(model_name: str, eval_set: EvalSet, cache_dir: Path | None, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per-query metrics (binary and graded) of one model on one eval set, cached by content."""
    from embedforge.embeddings import model_identity

    key = sha256_json({"model": model_identity(model_name), "eval_set": eval_set.sha256, "metrics": METRICS_VERSION, "top_k": TOP_K})
    path = Path(cache_dir) / "results" / f"{key}.json" if cache_dir else None
    if path and path.exists():
        return read_json(path)
    ranked = retrieve(model_name, eval_set, cache_dir, batch_size)
    result = {"binary": ir_metrics(ranked, eval_set.qrels), "graded": ir_metrics(ranked, eval_set.qrels, graded=True)}
    if path:
        write_json(path, result)
    return result


def _mean(per_query: dict[str, float]) -> float:
    return float(np.mean(list(per_query.values()))) if per_query else 0.0


def compare(eval_sets: list[EvalSet], models: list[tuple[str, str]], cache_dir: Path | None, resamples: int = 10_000, seed: int = 0, batch_size: int = 64) -> dict:
    """Results for every (eval set, model); the first model is the reference for deltas and CIs."""
    results = {"reference": models[0][0], "eval_sets": {}}
    for eval_set in eval_sets:
        graded = any(grade > 1 for docs in eval_set.qrels.values() for grade in docs.values())
        entry = {"source": eval_set.source, "queries": len(eval_set.queries), "passages": len(eval_set.passages), "graded_qrels": graded, "models": {}}
        reference = None
        for label, model_name in models:
            per_query = evaluate_model(model_name, eval_set, cache_dir, batch_size)
            scores = {name: round(_mean(values), 6) for name, values in per_query["binary"].items()}
            scores.update({f"graded_{name}": round(_mean(values), 6) for name, values in per_query["graded"].items() if name.startswith("ndcg")})
            model_entry = {"model": model_name, "scores": scores, "per_query": {"ndcg@10": per_query["binary"]["ndcg@10"]}}
            if reference is None:
                reference = per_query
            else:
                model_entry["versus_reference"] = {}
                for metric in HEADLINE:
                    query_ids = list(reference["binary"][metric])
                    differences = np.array([per_query["binary"][metric][q] - reference["binary"][metric][q] for q in query_ids])
                    low, high = paired_bootstrap(differences, resamples, seed)
                    model_entry["versus_reference"][metric] = {
                        "delta": round(float(differences.mean()), 6),
                        "ci95": [round(low, 6), round(high, 6)],
                        "p_value": round(randomization_p_value(differences, resamples, seed), 6),
                        "verdict": verdict(low, high),
                    }
            entry["models"][label] = model_entry
        results["eval_sets"][eval_set.name] = entry
    return results


def render_report(results: dict, notes: list[str] | None = None) -> str:
    lines = ["# embedforge evaluation", ""]
    for name, entry in results["eval_sets"].items():
        lines += [f"## {name}", "", f"Queries: {entry['queries']} · passages: {entry['passages']} · source: {entry['source']}", ""]
        lines.append("| model | " + " | ".join(HEADLINE) + " | Δ NDCG@10 [95% CI] | p | verdict |")
        lines.append("|---" * (len(HEADLINE) + 4) + "|")
        for label, model in entry["models"].items():
            versus = model.get("versus_reference", {}).get("ndcg@10")
            delta = f"{versus['delta']:+.4f} [{versus['ci95'][0]:+.4f}, {versus['ci95'][1]:+.4f}]" if versus else "reference"
            p_value = f"{versus['p_value']:.4f}" if versus else ""
            lines.append(f"| {label} | " + " | ".join(f"{model['scores'][m]:.4f}" for m in HEADLINE) + f" | {delta} | {p_value} | {versus['verdict'] if versus else ''} |")
        lines.append("")
    lines += [f"- {note}" for note in notes or []]
    return "\n".join(lines).rstrip() + "\n"


def evaluate(eval_sets: list[EvalSet], models: list[tuple[str, str]], out_dir: Path, cache_dir: Path | None, resamples: int, seed: int, batch_size: int = 64, notes: list[str] | None = None) -> dict:
    out_dir = Path(out_dir)
    results = compare(eval_sets, models, cache_dir, resamples, seed, batch_size)
    results["notes"] = notes or []
    write_json(out_dir / "results.json", results)
    write_text(out_dir / "report.md", render_report(results, notes))
    summary = {}
    for name, entry in results["eval_sets"].items():
        for label, model in entry["models"].items():
            summary[f"{name}/{label}/ndcg@10"] = model["scores"]["ndcg@10"]
    return summary


def eval_set_files(folder: Path, split: str = "test") -> dict[str, str]:
    """The files of a BEIR eval set and their hashes: the inputs of a fingerprint."""
    folder = Path(folder)
    return {str(folder / name): sha256_file(folder / name) for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv") if (folder / name).exists()}
