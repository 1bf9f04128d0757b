"""Should this corpus get a fine-tuned model? A recommendation from a run's measured numbers.

`decide` is the pure rule (testable without a model); `decide_for_run` reads a run directory and
measures the fine-tuned model's encoding throughput on this machine for the reindex estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedforge.errors import EmbedforgeError
from embedforge.evaluate.data import SYNTHETIC_TEST
from embedforge.evaluate.metrics import verdict
from embedforge.files import iter_jsonl, read_json
from embedforge.text import format_duration

OFF_THE_SHELF = "off-the-shelf"
MORE_DATA = "generate more data first"
FINE_TUNE = "fine-tune"
HYBRID = "fine-tune + hybrid retrieval"
MIN_PAIRS = 1000  # below this, fine-tuning results are mostly noise (DESIGN: "at least 1,000 usable pairs")
MAX_CI_WIDTH = 0.10  # a wider 95% CI of the NDCG@10 difference cannot tell a real gain from noise
BM25_COMPETITIVE = 0.9  # BM25 within 10% of the fine-tuned model: the two rankings are worth fusing


@dataclass(frozen=True)
class Decision:
    recommendation: str
    reasons: list[str]
    reindex_seconds: float | None = None
    facts: dict = field(default_factory=dict)

    def render(self) -> str:
        return "\n".join([f"Recommendation: {self.recommendation}", *(f"- {reason}" for reason in self.reasons)])


def decide(target: float, base_ndcg: float, finetuned_ndcg: float | None, delta_ci: tuple[float, float] | None, bm25_ndcg: float | None,
           pairs: int, corpus_size: int, throughput: float | None, p_value: float | None = None, min_pairs: int = MIN_PAIRS,
           max_ci_width: float = MAX_CI_WIDTH, bm25_competitive: float = BM25_COMPETITIVE) -> Decision:
    """The recommendation, first rule that applies wins. NDCG@10 values; `throughput` in passages/s."""
    reindex = corpus_size / throughput if throughput else None
    facts = {"target": target, "base_ndcg@10": base_ndcg, "finetuned_ndcg@10": finetuned_ndcg, "delta_ci95": list(delta_ci) if delta_ci else None,
             "p_value": p_value, "bm25_ndcg@10": bm25_ndcg, "pairs": pairs, "corpus_size": corpus_size, "throughput_passages_per_s": throughput, "reindex_seconds": reindex}
    reindex_reason = (f"reindexing the {corpus_size:,}-passage corpus with the fine-tuned model takes ~{format_duration(reindex)} on this machine "
                      f"(measured {throughput:.1f} passages/s)") if reindex is not None else "reindex time unknown (throughput not measured)"

    def result(recommendation: str, *reasons: str) -> Decision:
        return Decision(recommendation, list(reasons), reindex, facts)

    if base_ndcg >= target:
        return result(OFF_THE_SHELF, f"the base model already reaches the target: NDCG@10 {base_ndcg:.4f} ≥ {target}")
    if finetuned_ndcg is None or delta_ci is None:
        return result(MORE_DATA, f"the base model is under the target ({base_ndcg:.4f} < {target}) and there is no fine-tuned model to compare yet")
    if pairs < min_pairs:
        return result(MORE_DATA, f"only {pairs:,} training pairs (fewer than {min_pairs:,}): generate more queries before trusting a fine-tune")
    low, high = delta_ci
    if high - low > max_ci_width:
        return result(MORE_DATA, f"the 95% CI of the fine-tuned − base NDCG@10 difference is {high - low:.3f} wide ([{low:+.4f}, {high:+.4f}], "
                                 f"wider than {max_ci_width}): too few test queries to tell; generate more data (and held-out queries)")
    delta = f"NDCG@10 {base_ndcg:.4f} → {finetuned_ndcg:.4f}, Δ 95% CI [{low:+.4f}, {high:+.4f}]"
    outcome = verdict(low, high, p_value)
    if outcome != "better":
        return result(OFF_THE_SHELF, f"fine-tuning did not beat the base model ({delta}, {outcome}): keep the base model",
                      f"the base model is under the target ({base_ndcg:.4f} < {target}); better training queries or a stronger base model are the next levers")
    if finetuned_ndcg >= target:
        return result(FINE_TUNE, f"the fine-tuned model is significantly better ({delta}) and reaches the target: {finetuned_ndcg:.4f} ≥ {target}", reindex_reason)
    if bm25_ndcg is not None and bm25_ndcg >= bm25_competitive * finetuned_ndcg:
        return result(HYBRID, f"the fine-tuned model is significantly better ({delta}) but under the target: {finetuned_ndcg:.4f} < {target}",
                      f"BM25 is competitive (NDCG@10 {bm25_ndcg:.4f}, ≥ {bm25_competitive:.0%} of the fine-tuned model): fuse both rankings "
                      "(e.g. reciprocal rank fusion)", reindex_reason)
    bm25 = f"NDCG@10 {bm25_ndcg:.4f}" if bm25_ndcg is not None else "not measured"
    return result(FINE_TUNE, f"the fine-tuned model is significantly better ({delta}) but under the target: {finetuned_ndcg:.4f} < {target}",
                  f"BM25 is not competitive ({bm25}), so hybrid retrieval would not help; more or better training data is the next lever", reindex_reason)


def measure_throughput(model_name: str, passages: list[dict], batch_size: int = 64, encode_backend: str = "torch", cache_dir: Path | None = None) -> float:
    """Passages per second that `model_name` encodes on this machine (model loading not counted)."""
    from embedforge.embeddings import encode_throughput, load_model, passage_text

    if not passages:
        raise EmbedforgeError("No passages to time the encoder on", where="decide", fix="the run's corpus.jsonl is empty")
    model = load_model(model_name, backend=encode_backend, cache_dir=cache_dir)
    return encode_throughput(model, [passage_text(p) for p in passages], batch_size)


def _sample_corpus(path: Path, size: int, seed: int) -> tuple[int, list[dict]]:
    """(line count, a uniform sample of `size` passages) in one pass with bounded memory (reservoir sampling)."""
    rng = np.random.default_rng(seed)
    count, sample = 0, []
    for row in iter_jsonl(path):
        count += 1
        if len(sample) < size:
            sample.append(row)
        elif (slot := int(rng.integers(0, count))) < size:
            sample[slot] = row
    return count, sample


def decide_for_run(run_dir: Path, target: float, throughput: float | None = None, eval_set: str | None = None,
                   sample: int = 200, batch_size: int = 64, seed: int = 0, encode_backend: str = "torch", cache_dir: Path | None = None) -> Decision:
    """Read evaluate/results.json, the manifest and corpus.jsonl of a run; measure throughput unless given."""
    run_dir = Path(run_dir)
    results_path, manifest_path = run_dir / "evaluate" / "results.json", run_dir / "manifest.json"
    if not results_path.exists():
        raise EmbedforgeError("This run has no evaluation results", where=str(results_path), fix=f"run `embedforge evaluate --run {run_dir}` first")
    results = read_json(results_path)
    pairs = (read_json(manifest_path) if manifest_path.exists() else {}).get("stages", {}).get("mine", {}).get("stats", {}).get("rows")
    if pairs is None:
        raise EmbedforgeError("The run's manifest records no mined training pairs", where=str(manifest_path), fix=f"run `embedforge mine --run {run_dir}` first")
    # Human-labelled eval sets are the honest yardstick; the synthetic test set flatters fine-tuning.
    names = list(results["eval_sets"])
    name = eval_set or next((n for n in names if n != SYNTHETIC_TEST), names[0])
    if name not in results["eval_sets"]:
        raise EmbedforgeError(f"No eval set {name!r} in the results", where=str(results_path), fix=f"use one of {', '.join(names)}")
    entry, reference = results["eval_sets"][name], results["reference"]
    models = entry["models"]
    tuned = "fine-tuned" if "fine-tuned" in models else next((label for label, m in models.items() if label != reference and m["model"] != "bm25"), None)
    corpus_size, passages = _sample_corpus(run_dir / "corpus.jsonl", sample, seed)
    if tuned is not None and throughput is None:
        throughput = measure_throughput(models[tuned]["model"], passages, batch_size, encode_backend, cache_dir)
    versus = models[tuned]["versus_reference"]["ndcg@10"] if tuned else None
    decision = decide(
        target, models[reference]["scores"]["ndcg@10"], models[tuned]["scores"]["ndcg@10"] if tuned else None, tuple(versus["ci95"]) if versus else None,
        models["bm25"]["scores"]["ndcg@10"] if "bm25" in models else None, int(pairs), corpus_size, throughput,
        p_value=versus["p_value"] if versus else None,
    )
    decision.reasons.append(f"yardstick: eval set {name} ({entry['source']}, {entry['queries']} queries); {int(pairs):,} training pairs")
    decision.facts["eval_set"] = name
    return decision
