"""Reproduce published off-the-shelf figures with embedforge's evaluation (all-MiniLM-L6-v2).

Runs the same code path as `embedforge evaluate --eval-set DIR --model all-MiniLM-L6-v2`, on the
test splits in ../shared/data, and prints ours next to the reference figures of
../shared/data/README.md (sentence-transformers' InformationRetrievalEvaluator, binary
relevance, max_seq_length 256, title + " " + text). Exits non-zero when any differs by > 0.002.
Default size: both test sets whole (nfcorpus 323 queries over 3,633 passages; LegalSummarization
its test queries over its corpus). Ends with `RESULT nfcorpus_ndcg10=... nfcorpus_graded_ndcg10=...
legal_ndcg10=... max_abs_diff=<largest difference from the published figures>`; goal: max_abs_diff <= 0.002.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from embedforge.evaluate import compare, load_beir

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REFERENCE = {  # (eval set, metric): figure from ../shared/data/README.md
    ("nfcorpus", "ndcg@10"): 0.3184,
    ("nfcorpus", "graded_ndcg@10"): 0.3167,
    ("legal_summarization", "ndcg@10"): 0.5821,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache", type=Path, default=None, help="embedding cache (default: a fresh temporary folder)")
    arguments = parser.parse_args()
    if not (arguments.data / "nfcorpus").is_dir():
        print(f"skipped: {arguments.data} not found")
        return 0
    cache = arguments.cache or Path(tempfile.mkdtemp(prefix="embedforge-eval-"))
    figures, worst = {}, 0.0
    for name in ("nfcorpus", "legal_summarization"):
        started = time.time()
        eval_set = load_beir(arguments.data / name)
        result = compare([eval_set], [("all-MiniLM-L6-v2", "all-MiniLM-L6-v2")], cache, resamples=100)
        scores = result["eval_sets"][name]["models"]["all-MiniLM-L6-v2"]["scores"]
        print(f"{name}: {len(eval_set.queries)} queries, {len(eval_set.passages)} passages, {time.time() - started:.0f}s")
        for (set_name, metric), published in REFERENCE.items():
            if set_name == name:
                ours = scores[metric]
                worst = max(worst, abs(ours - published))
                figures[f"{name}/{metric}"] = ours
                print(f"  {metric:16} ours {ours:.4f}  reference {published:.4f}  diff {ours - published:+.4f}")
        print(f"  mrr@10           ours {scores['mrr@10']:.4f}")
    print(
        f"RESULT nfcorpus_ndcg10={figures['nfcorpus/ndcg@10']:.4f} nfcorpus_graded_ndcg10={figures['nfcorpus/graded_ndcg@10']:.4f} "
        f"legal_ndcg10={figures['legal_summarization/ndcg@10']:.4f} max_abs_diff={worst:.4f}"
    )
    return 1 if worst > 0.002 else 0


if __name__ == "__main__":
    sys.exit(main())
