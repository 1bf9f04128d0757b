"""Stage 4, evaluate: base and fine-tuned models (and BM25) side by side on held-out queries.

Reads:  eval sets in BEIR layout (the run's synthetic held-out test set, and any --eval-set
        folder with its own corpus), the models to compare, the shared embedding cache, and
        optionally the training pairs (mine/train.jsonl) for the contamination check.
Writes: evaluate/results.json (per eval set, per model: every metric, per-query scores, the
        model's own 95% CI, paired bootstrap CIs and randomization p-values against the first
        model, the queries that changed most, the contamination check), evaluate/report.md,
        evaluate/report.png; evaluate/merged-<alpha>/ when the fine-tuned model forgets a
        --regression-set and a merge with the base model does not (the model offered).
Keeps:  per (model, eval set) results in cache/results/ (metrics and ranked lists), so an
        unchanged base model on an unchanged eval set is never evaluated twice.

Modules: data (BEIR eval sets), metrics (pure IR metrics and paired statistics), retrieval
(dense and BM25 ranked lists, cached), leaks (contamination check), report (markdown and chart),
stage (compare / evaluate), decision (the fine-tune-or-not helper).
"""

from embedforge.evaluate.data import SYNTHETIC_TEST, EvalSet, check_eval_set, cut_documents, eval_set_files, load_beir, read_qrels
from embedforge.evaluate.decision import Decision, decide, decide_for_run, measure_throughput
from embedforge.evaluate.leaks import contamination
from embedforge.evaluate.metrics import METRICS, ir_metrics, paired_bootstrap, randomization_p_value, verdict
from embedforge.evaluate.report import render_chart, render_report
from embedforge.evaluate.retrieval import BM25_MODEL, METRICS_VERSION, TOP_K, bm25_retrieve, evaluate_model, retrieve
from embedforge.evaluate.stage import HEADLINE, STAGE_VERSION, biggest_changes, compare, evaluate, versus_reference

__all__ = [
    "BM25_MODEL", "Decision", "EvalSet", "HEADLINE", "METRICS", "METRICS_VERSION", "STAGE_VERSION", "TOP_K", "biggest_changes",
    "bm25_retrieve", "check_eval_set", "compare", "contamination", "cut_documents", "decide", "decide_for_run", "eval_set_files", "evaluate", "evaluate_model",
    "ir_metrics", "load_beir", "measure_throughput", "paired_bootstrap", "randomization_p_value", "read_qrels",
    "render_chart", "render_report", "retrieve", "verdict", "versus_reference",
]
