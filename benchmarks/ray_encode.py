"""Corpus encoding through Ray Data against the same encoding in this process.

Corpus: the first --passages passages of ../shared/data/nfcorpus/corpus.jsonl, cut by
all-MiniLM-L6-v2's tokens as a run cuts it (else synthetic ones). Model: all-MiniLM-L6-v2 on
torch (both sides alike: this measures the engine, not the backend), loaded once by the driver.

Each round, in alternating order (drifting machine load hits both sides alike):
  local  embedforge's local encoder in this process, torch with --threads threads;
  ray    `--engine ray`: blocks of 512 texts through `ray.data` map_batches over a pool of
         actors of 1 CPU each, on a local Ray instance of --threads CPUs started once. The time
         includes what a user pays per encoding: the actors start and load the model each time.
With `--actors 1,2` the Ray side runs once per actor count, so the scaling curve shows; the
ratio is taken at the largest count.
Default size: 5,000 passages, 2 rounds, 2 actors (about 8 minutes on 2 CPU cores).
Ends with `RESULT ratio=<ray passages/s / local passages/s> max_abs_diff=<largest |difference| of
the vectors> ray_passages_per_second=<…> local_passages_per_second=<…>` (medians over rounds).
Goals: ratio >= 0.85, max_abs_diff <= 1e-5.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nfcorpus" / "corpus.jsonl"


def load_texts(count: int, model) -> tuple[list[str], str]:
    from embedforge.config import CorpusConfig
    from embedforge.corpus import read_corpus
    from embedforge.embeddings import passage_text

    if DATA.exists():
        passages, _ = read_corpus(CorpusConfig(corpus=DATA), model.tokenizer, model.max_seq_length, "")
        return [passage_text(p) for p in passages[:count]], str(DATA)
    words = "cell protein diet risk study cancer heart blood trial dose effect patients level intake acid vitamin fiber weight sugar fat".split()
    rng = random.Random(0)
    return [" ".join(rng.choices(words, k=rng.randint(60, 200))) for _ in range(count)], "synthetic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--actors", default="2", help="comma-separated actor counts for the Ray side, e.g. 1,2")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the local side, and the CPUs of the Ray instance")
    parser.add_argument("--batch-size", type=int, default=64)
    arguments = parser.parse_args()

    import logging

    import numpy as np
    import ray
    import torch

    from embedforge.embeddings import LocalEncoder, encode_corpus, load_model
    from embedforge.embeddings.cluster import RayEncoder, RaySettings

    torch.set_num_threads(arguments.threads)
    actor_counts = [int(part) for part in arguments.actors.split(",") if part.strip()]
    model = load_model("all-MiniLM-L6-v2", device="cpu")
    texts, source = load_texts(arguments.passages, model)
    print(f"{len(texts)} passages from {source}; local: {arguments.threads} torch threads; ray: actors {actor_counts} x 1 CPU")
    ray.init(num_cpus=arguments.threads, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)

    def local() -> np.ndarray:
        return encode_corpus(LocalEncoder(model, arguments.batch_size), texts, show=False)

    def on_ray(actors: int) -> np.ndarray:
        return encode_corpus(RayEncoder(RaySettings(address="auto", actors=actors), model, "all-MiniLM-L6-v2", arguments.batch_size), texts, show=False)

    rates: dict[str, list[float]] = {"local": [], **{f"ray-{count}": [] for count in actor_counts}}
    reference, largest_difference = None, 0.0
    for round_number in range(arguments.rounds):
        sides = [("local", local)] + [(f"ray-{count}", lambda count=count: on_ray(count)) for count in actor_counts]
        if round_number % 2:
            sides.reverse()
        for name, encode in sides:
            started = time.perf_counter()
            vectors = encode()
            seconds = time.perf_counter() - started
            rates[name].append(len(texts) / seconds)
            if name == "local" and reference is None:  # round 1 runs local first: every Ray run is compared
                reference = vectors
            elif name != "local":
                largest_difference = max(largest_difference, float(np.abs(vectors - reference).max()))
            print(f"round {round_number + 1} {name:8}: {seconds:7.1f} s, {len(texts) / seconds:6.1f} passages/s", flush=True)
    ray.shutdown()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in medians.items():
        print(f"{name:8}: {value:6.1f} passages/s (median of {len(rates[name])})")
    best = f"ray-{max(actor_counts)}"
    print(f"RESULT ratio={medians[best] / medians['local']:.3f} max_abs_diff={largest_difference:.2e} "
          f"ray_passages_per_second={medians[best]:.1f} local_passages_per_second={medians['local']:.1f}")


if __name__ == "__main__":
    main()
