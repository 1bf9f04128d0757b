"""Does fine-tuning beat the off-the-shelf model on a real, human-labelled test set?

Runs the real pipeline (`embedforge run`) with a BEIR dataset's corpus as the unlabelled
passages and its human-labelled `qrels/test.tsv` as `--eval-set`, then prints base vs fine-tuned
NDCG@10, Recall@100 and MRR@10 with the paired-bootstrap 95% CI of each difference.

Where the training queries come from (`--queries-from`):
  llm    the configured LLM writes them (the local SmolLM2 model unless flags after `--` say otherwise);
  human  the dataset's own train queries and qrels/train.tsv: what perfect queries give (an upper bound);
  FILE   recorded pairs (JSONL of query + passage_id), replayed without an LLM.

Test queries and test qrels are read only by the evaluate stage: the human pairs are built from
qrels/train.tsv and the query ids it names. Anything after `--` goes to `embedforge run`
unchanged, e.g. `-- --num-negatives 1 --epochs 2`.

    python benchmarks/quality.py ../shared/data/nfcorpus --queries-from human

`--versus RUN` also prints this run's fine-tuned model against RUN's, paired over the same
human-labelled test queries (RUN: another quality.py run directory on the same dataset): what
one setting changed, with the CI of the paired difference, not two CIs against the base model.

Default size: the whole dataset (nfcorpus: 3,633 passages, 323 test queries), the pipeline's defaults.
Ends with `RESULT base_ndcg10=... tuned_ndcg10=... delta=... ` with the CI of the difference (and the
`versus_...` figures with `--versus`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from embedforge.corpus import read_qrels
from embedforge.evaluate import versus_reference
from embedforge.files import iter_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ("ndcg@10", "recall@100", "mrr@10")


def human_pairs(dataset: Path, out: Path) -> int:
    """Every (train query, relevant passage) pair of qrels/train.tsv; only train query ids are kept."""
    qrels = read_qrels(dataset / "qrels" / "train.tsv")
    texts = {str(row["_id"]): row["text"] for row in iter_jsonl(dataset / "queries.jsonl") if str(row["_id"]) in qrels}
    pairs = [{"query": texts[query], "passage_id": doc} for query, docs in sorted(qrels.items()) if query in texts for doc, grade in sorted(docs.items()) if grade > 0]
    write_jsonl(out, pairs)
    return len(pairs)


def main() -> int:
    arguments, extra = split_arguments(sys.argv[1:])
    dataset = arguments.dataset.resolve()
    if not (dataset / "corpus.jsonl").exists() or not (dataset / "qrels" / "test.tsv").exists():
        print(f"skipped: {dataset} is not a BEIR folder with corpus.jsonl and qrels/test.tsv")
        return 0
    source = arguments.queries_from
    settings = hashlib.sha256(json.dumps([source, arguments.max_positives_per_query, extra]).encode()).hexdigest()[:8]
    label = source if source in ("llm", "human") else "file"
    run = (arguments.run or ROOT / "runs" / "quality" / f"{dataset.name}-{label}-{settings}").resolve()
    run.mkdir(parents=True, exist_ok=True)

    command = [sys.executable, "-m", "embedforge", "run", "--run", str(run), "--corpus", str(dataset / "corpus.jsonl"),
               "--eval-set", str(dataset), "--cache", str(arguments.cache.resolve())]
    if source == "human":
        if not (dataset / "qrels" / "train.tsv").exists():
            print(f"skipped: {dataset} has no qrels/train.tsv for --queries-from human")
            return 0
        count = human_pairs(dataset, run / "human-pairs.jsonl")
        print(f"human pairs: {count} from {dataset / 'qrels/train.tsv'}; training on at most {arguments.max_positives_per_query} per query")
        # Human queries are the yardstick, kept whole: the cheap filters (made for LLM output) would
        # drop 762 of nfcorpus's 2,590 train queries as one-word.
        command += ["--queries", str(run / "human-pairs.jsonl"), "--llm-model", "none", "--min-pairs", "1",
                    "--max-positives-per-query", str(arguments.max_positives_per_query), "--no-filter-imports"]
    elif source != "llm":
        command += ["--queries", str(Path(source).resolve()), "--llm-model", "none", "--min-pairs", "1"]
    command += extra
    print("$", " ".join(command), flush=True)
    started = time.time()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, cwd=ROOT, env=environment)
    wall = time.time() - started
    if completed.returncode != 0:
        print(f"embedforge run failed (exit {completed.returncode}) after {wall:.0f}s")
        return completed.returncode
    result = report(run, dataset.name, wall)
    if arguments.versus:
        paired = versus(run, arguments.versus.resolve(), dataset.name)
        if paired is None:
            return 2
        result += " " + paired
    print(f"RESULT {result}")
    return 0


def versus(run: Path, other: Path, eval_set: str) -> str | None:
    """This run's fine-tuned model against `other`'s, paired over the same test queries (the
    evaluate stage's own comparison, with `other` as the reference)."""
    per_query = []
    for folder in (run, other):
        results = folder / "evaluate" / "results.json"
        if not results.exists():
            print(f"--versus: {results} does not exist; run quality.py for {folder} first")
            return None
        models = json.loads(results.read_text())["eval_sets"].get(eval_set, {}).get("models", {})
        if "fine-tuned" not in models:
            print(f"--versus: {results} has no fine-tuned model on {eval_set}")
            return None
        per_query.append(models["fine-tuned"]["per_query"])
    ours, theirs = (set(scores["ndcg@10"]) for scores in per_query)
    if ours != theirs:
        print(f"--versus: the two runs scored different {eval_set} queries ({len(ours)} and {len(theirs)}, {len(ours & theirs)} shared)")
        return None
    against = versus_reference({"binary": per_query[1]}, {"binary": per_query[0]}, resamples=10_000, seed=0)["ndcg@10"]
    low, high = against["ci95"]
    print(f"versus {other}: fine-tuned ndcg@10 {against['delta']:+.4f} [{low:+.4f}, {high:+.4f}], p={against['p_value']:.3g}, {against['verdict']}, over {len(ours)} queries")
    return f"versus_delta={against['delta']:+.4f} versus_ci_low={low:+.4f} versus_ci_high={high:+.4f} versus_p={against['p_value']:.4f}"


def report(run: Path, eval_set: str, wall: float) -> str:
    """Print the base vs fine-tuned table; return the RESULT line's figures."""
    results = json.loads((run / "evaluate" / "results.json").read_text())
    models = results["eval_sets"][eval_set]["models"]
    base, tuned = models["base"], models["fine-tuned"]
    manifest = json.loads((run / "manifest.json").read_text())
    train = manifest["stages"].get("train", {}).get("stats", {})
    print(f"\n{eval_set} test ({results['eval_sets'][eval_set]['queries']} human-labelled queries); run {run}; wall {wall / 60:.1f} min")
    print(f"training pairs {train.get('pairs')}, steps {train.get('steps')}, dev NDCG@10 {train.get('base_dev_ndcg@10')} -> {train.get('tuned_dev_ndcg@10')}")
    print(f"{'metric':12} {'base':>8} {'tuned':>8} {'delta':>8}  95% CI of delta      verdict")
    for metric in SHOWN:
        against = tuned["versus_reference"][metric]
        low, high = against["ci95"]
        print(f"{metric:12} {base['scores'][metric]:8.4f} {tuned['scores'][metric]:8.4f} {against['delta']:+8.4f}  [{low:+.4f}, {high:+.4f}]  {against['verdict']}")
    if "bm25" in models:
        print(f"{'bm25 ndcg@10':12} {models['bm25']['scores']['ndcg@10']:8.4f}")
    against = tuned["versus_reference"]["ndcg@10"]
    return (f"base_ndcg10={base['scores']['ndcg@10']:.4f} tuned_ndcg10={tuned['scores']['ndcg@10']:.4f} delta={against['delta']:+.4f} "
            f"ci_low={against['ci95'][0]:+.4f} ci_high={against['ci95'][1]:+.4f}")


def split_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("dataset", type=Path, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv (and qrels/train.tsv for human)")
    parser.add_argument("--queries-from", default="llm", help="llm | human | FILE (JSONL of query + passage_id)")
    parser.add_argument("--max-positives-per-query", type=int, default=2,
                        help="human: train on at most this many relevant passages per query (NFCorpus has ~43; the rest stay known positives)")
    parser.add_argument("--run", type=Path, default=None, help="run directory (default: runs/quality/<dataset>-<source>-<settings hash>)")
    parser.add_argument("--versus", type=Path, default=None, help="another run directory on this dataset: print the paired difference of the two fine-tuned models")
    parser.add_argument("--cache", type=Path, default=ROOT / "cache", help="embedding cache, shared between runs")
    return parser.parse_args(own), extra


if __name__ == "__main__":
    sys.exit(main())
