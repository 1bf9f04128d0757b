"""Training samples/s of embedforge's train stage against a plain sentence-transformers script.

Same tuples (query, passage pairs from ../shared/data/nfcorpus qrels/train.tsv), same model
(all-MiniLM-L6-v2), same settings (MultipleNegativesRankingLoss, NO_DUPLICATES batches, batch 32,
max_seq_length 128, learning rate 2e-5, 10% warmup, one epoch of `--steps` batches). Each
measurement runs in a fresh process and the two alternate (ours, plain, ours, plain, ...);
each is timed from loading the model to the saved model, which for ours includes its
per-epoch checkpoint (what makes a killed training resumable). No dev set: dev evaluation is a
separate, optional cost.

The second part trains a few steps at batch 128 with the plain and the cached (GradCache,
mini-batch 32) loss and compares the peak memory each adds on top of the loaded model (CUDA:
torch's peak allocation; CPU: peak resident set size minus the size before training).

Default size: 50 steps of batch 32 per measurement, 2 alternating rounds.
Ends with `RESULT ratio=<ours/plain samples per s> cached_peak_ratio=<cached/plain peak memory>`.
Goal: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nfcorpus"
BATCH = 32
PEAK_BATCH = 128
PEAK_STEPS = 3


def pairs_from(dataset: Path, count: int) -> list[dict]:
    """`count` distinct (query, passage) pairs, the first positives of each query in turn, so batches mix queries."""
    from embedforge.embeddings import passage_text
    from embedforge.corpus import read_qrels
    from embedforge.files import iter_jsonl

    qrels = read_qrels(dataset / "qrels" / "train.tsv")
    queries = {str(row["_id"]): row["text"] for row in iter_jsonl(dataset / "queries.jsonl") if str(row["_id"]) in qrels}
    passages = {str(row["_id"]): passage_text(row) for row in iter_jsonl(dataset / "corpus.jsonl")}
    ranked = {query: sorted(docs) for query, docs in sorted(qrels.items()) if query in queries}
    pairs, depth = [], 0
    while len(pairs) < count and depth < max(len(docs) for docs in ranked.values()):
        pairs += [{"anchor": queries[query], "positive": passages[docs[depth]], "positive_id": docs[depth], "negative_ids": []}
                  for query, docs in ranked.items() if depth < len(docs) and docs[depth] in passages]
        depth += 1
    return pairs[:count]


def rss_gb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def plain_trainer(model, rows: list[dict], out: Path, batch_size: int, loss, max_steps: int = -1):
    from datasets import Dataset
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    arguments = SentenceTransformerTrainingArguments(
        output_dir=str(out), num_train_epochs=1, max_steps=max_steps, per_device_train_batch_size=batch_size, learning_rate=2e-5, warmup_steps=0.1,
        batch_sampler=BatchSamplers.NO_DUPLICATES, seed=0, save_strategy="no", logging_steps=10, report_to="none", disable_tqdm=True,
    )
    dataset = Dataset.from_list([{"anchor": row["anchor"], "positive": row["positive"]} for row in rows])
    return SentenceTransformerTrainer(model=model, args=arguments, train_dataset=dataset, loss=loss)


def worker(kind: str, rows: list[dict]) -> dict:
    """One measurement in this (fresh) process."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    from embedforge.config import TrainConfig
    from embedforge.embeddings import resolve_model
    from embedforge.train import train

    model_path = resolve_model("all-MiniLM-L6-v2")
    out = Path(tempfile.mkdtemp(prefix=f"train-bench-{kind}-"))
    if kind in ("ours", "plain"):
        started = time.perf_counter()
        if kind == "ours":
            config = TrainConfig(loss="mnrl", learning_rate=2e-5, batch_size=BATCH, max_seq_length=128)
            stats = train(rows, [], {}, {}, model_path, out, config, seed=0)
            steps = stats["steps"]
        else:
            model = SentenceTransformer(model_path)
            model.max_seq_length = 128
            result = plain_trainer(model, rows, out / "checkpoints", BATCH, losses.MultipleNegativesRankingLoss(model)).train()
            model.save(str(out / "model"))
            steps = result.global_step
        seconds = time.perf_counter() - started
        return {"kind": kind, "steps": steps, "seconds": seconds, "samples_per_s": steps * BATCH / seconds}
    # Peak memory of one loss at batch 128.
    model = SentenceTransformer(model_path)
    model.max_seq_length = 128
    loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=BATCH) if kind == "peak-cached" else losses.MultipleNegativesRankingLoss(model)
    trainer = plain_trainer(model, rows, out / "checkpoints", PEAK_BATCH, loss, max_steps=PEAK_STEPS)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 1e9
    else:
        before = rss_gb()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else peak_gb()
    return {"kind": kind, "added_peak_gb": peak - before, "device": "cuda" if cuda else "cpu"}


def measure(kind: str, rows_file: Path) -> dict:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "EMBEDFORGE_PROGRESS": "0"}
    completed = subprocess.run([sys.executable, __file__, "--worker", kind, "--rows", str(rows_file)], capture_output=True, text=True, env=environment)
    if completed.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=50, help="training steps per measurement (batch 32)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating (ours, plain) measurements")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        rows = json.loads(arguments.rows.read_text())
        print(json.dumps(worker(arguments.worker, rows)))
        return 0
    if not (arguments.data / "qrels" / "train.tsv").exists():
        print(f"skipped: {arguments.data} not found")
        return 0
    rows_file = Path(tempfile.mkdtemp(prefix="train-bench-")) / "rows.json"
    rows = pairs_from(arguments.data, arguments.steps * BATCH)
    rows_file.write_text(json.dumps(rows))
    print(f"{len(rows)} pairs from {arguments.data / 'qrels/train.tsv'}; {arguments.steps} steps of {BATCH}; {arguments.rounds} alternating rounds")
    speeds: dict[str, list[float]] = {"ours": [], "plain": []}
    for round_index in range(arguments.rounds):
        for kind in ("ours", "plain"):
            result = measure(kind, rows_file)
            speeds[kind].append(result["samples_per_s"])
            print(f"  round {round_index + 1} {kind:5}: {result['steps']} steps in {result['seconds']:.1f}s = {result['samples_per_s']:.1f} samples/s", flush=True)
    ratio = statistics.median(speeds["ours"]) / statistics.median(speeds["plain"])
    peaks = {kind: measure(f"peak-{kind}", rows_file) for kind in ("plain", "cached")}
    for kind, result in peaks.items():
        print(f"  batch {PEAK_BATCH}, {kind:6} loss: +{result['added_peak_gb']:.2f} GB peak ({result['device']})")
    cached_ratio = peaks["cached"]["added_peak_gb"] / max(peaks["plain"]["added_peak_gb"], 1e-9)
    print(f"RESULT ratio={ratio:.3f} cached_peak_ratio={cached_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
