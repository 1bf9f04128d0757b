"""embedforge's miner against sentence-transformers' mine_hard_negatives, and IVF at scale.

Part 1, on ../shared/data/nfcorpus (train queries + qrels as the pairs, all-MiniLM-L6-v2),
matched settings (window 0..50, relative margin 0.05, top sampling, 3 negatives, extra
exclusions off): the share of identical negatives, wall time and peak memory, each in a fresh
process; ours cold (empty cache) and warm (corpus embeddings cached). Both encode with at most
32 texts per batch (sentence-transformers' default); ours sizes CPU batches by text length.
The two sides alternate for --rounds rounds; the ratios are medians of the per-round ratios.
Part 2: IVF mining over N random normalized 384-d vectors with 10,000 queries: peak memory,
time, and recall@100 against exact search on a sample of queries. The vectors are drawn around
N/1,000 random centres, as embeddings of real text cluster by topic: vectors drawn uniformly on
the sphere in 384 dimensions are all nearly orthogonal (cosine 0 +- 0.05), their "top 100" is
noise, and no approximate index can find it short of scanning everything.
Default size: the first 20,000 nfcorpus train pairs, 2 rounds; IVF over 1,000,000 vectors with 10,000 queries.
Ends with `RESULT overlap=<identical negatives> time_ratio=<ours/st> warm_time_ratio=... ` and the
IVF figures (peak memory, time, recall@100); goals: overlap >= 0.99, time_ratio <= 0.7 (ours
with the CLI's default --encode-backend auto; sentence-transformers' miner encodes with torch).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nfcorpus"
SETTINGS = dict(range_min=0, range_max=50, relative_margin=0.05, num_negatives=3)
# Noise around each cluster centre, per dimension: neighbours within a cluster have cosine ~0.45,
# about what a sentence-embedding model gives related passages.
SPREAD = 0.06


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def load_pairs(data: Path, limit: int | None):
    from embedforge.corpus import read_qrels
    from embedforge.files import iter_jsonl

    corpus = [{"_id": str(r["_id"]), "title": r.get("title") or "", "text": r.get("text") or ""} for r in iter_jsonl(data / "corpus.jsonl")]
    texts = {str(r["_id"]): r["text"] for r in iter_jsonl(data / "queries.jsonl")}
    qrels = read_qrels(data / "qrels" / "train.tsv")
    pairs = [(query, doc) for query, docs in qrels.items() if query in texts for doc, grade in docs.items() if grade > 0]
    return corpus, texts, pairs[:limit] if limit else pairs


def run_ours(data: Path, cache: Path, limit: int | None, out: Path, encode_backend: str) -> None:
    from embedforge.config import MineConfig
    from embedforge.embeddings import corpus_embeddings, encode_texts, load_model
    from embedforge.files import iter_jsonl
    from embedforge.mine import mine

    started = time.perf_counter()
    corpus, texts, pairs = load_pairs(data, limit)
    # As `embedforge run` loads it (cold: the export and its check into the empty cache included).
    model = load_model("all-MiniLM-L6-v2", backend=encode_backend, cache_dir=cache)
    embeddings = corpus_embeddings("all-MiniLM-L6-v2", corpus, cache, batch_size=32, model=model, encode_backend=encode_backend)
    queries = [{"_id": f"{q}-{d}", "text": texts[q], "passage_id": d, "split": "train"} for q, d in pairs]
    unique = sorted({q["text"] for q in queries})
    vectors = encode_texts(model, unique, 32, kind="query")
    row_of = {text: i for i, text in enumerate(unique)}
    query_vectors = vectors[[row_of[q["text"]] for q in queries]]
    config = MineConfig(duplicate_threshold=1.0, **SETTINGS)
    with tempfile.TemporaryDirectory() as folder:
        mine(corpus, queries, embeddings, query_vectors, Path(folder), config, test_ids=set(), seed=0)
        elapsed = time.perf_counter() - started
        negatives = {row["query_id"]: row["negative_ids"] for row in iter_jsonl(Path(folder) / "train.jsonl")}
    out.write_text(json.dumps({"seconds": elapsed, "peak_gb": peak_gb(), "negatives": negatives, "encode_backend": model.encode_backend}))


def run_st(data: Path, limit: int | None, out: Path) -> None:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from embedforge.embeddings import load_model, passage_text

    started = time.perf_counter()
    corpus, texts, pairs = load_pairs(data, limit)
    text_of = {p["_id"]: passage_text(p) for p in corpus}
    id_of = {}
    for p in corpus:
        id_of.setdefault(text_of[p["_id"]], p["_id"])
    dataset = Dataset.from_dict({"anchor": [texts[q] for q, _ in pairs], "positive": [text_of[d] for _, d in pairs]})
    model = load_model("all-MiniLM-L6-v2")
    mined = mine_hard_negatives(
        dataset, model, corpus=list(text_of.values()), sampling_strategy="top", output_format="n-tuple", use_faiss=True,
        batch_size=32, verbose=False, **SETTINGS,
    )
    elapsed = time.perf_counter() - started
    negatives = {}
    by_pair = {}
    for row in mined:
        by_pair.setdefault((row["anchor"], row["positive"]), [id_of[row[f"negative_{i}"]] for i in range(1, 4)])
    for q, d in pairs:
        negatives[f"{q}-{d}"] = by_pair.get((texts[q], text_of[d]), [])
    out.write_text(json.dumps({"seconds": elapsed, "peak_gb": peak_gb(), "negatives": negatives}))


def clustered_vectors(count: int, dimension: int, clusters: int, rng) -> "np.ndarray":
    """Random normalized vectors around random centres, built in place chunk by chunk (one float32 copy)."""
    import numpy as np

    centres = rng.standard_normal((clusters, dimension), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = np.empty((count, dimension), dtype=np.float32)
    for start in range(0, count, 100_000):
        stop = min(start + 100_000, count)
        chunk = centres[rng.integers(0, clusters, size=stop - start)] + SPREAD * rng.standard_normal((stop - start, dimension), dtype=np.float32)
        vectors[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return vectors


def run_ivf(count: int, queries: int, out: Path) -> None:
    import numpy as np

    from embedforge.embeddings import IndexSpec, build_index, configure_index

    rng = np.random.default_rng(0)
    vectors = clustered_vectors(count, 384, max(1, count // 1000), rng)
    query_vectors = vectors[rng.choice(count, size=queries, replace=False)] + SPREAD * rng.standard_normal((queries, 384), dtype=np.float32)
    query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
    spec = IndexSpec(kind="ivf", nprobe=32)
    started = time.perf_counter()
    index = configure_index(build_index(vectors, spec), spec)
    built = time.perf_counter() - started
    _, found = index.search(query_vectors, 100)
    searched = time.perf_counter() - started - built
    # Exact top-100 of a sample by brute force, in chunks: a second (flat) index would double the memory.
    sample = rng.choice(queries, size=200, replace=False)
    scores = np.concatenate([query_vectors[sample] @ vectors[start : start + 100_000].T for start in range(0, count, 100_000)], axis=1)
    truth = np.argpartition(-scores, 100, axis=1)[:, :100]
    recall = float(np.mean([len(set(found[i]) & set(t)) / 100 for i, t in zip(sample, truth)]))
    out.write_text(json.dumps({"build_seconds": built, "search_seconds": searched, "recall_at_100": recall, "peak_gb": peak_gb()}))


def fresh(*arguments: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    subprocess.run([sys.executable, __file__, *arguments, "--out", str(out)], check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["ours", "st", "ivf"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=DATA)
    # 20,000 of the 110,575 train pairs: with all of them mine/train.jsonl alone would be ~900 MB.
    parser.add_argument("--limit", type=int, default=20_000, help="use only the first N pairs (0: all)")
    parser.add_argument("--rounds", type=int, default=2, help="sentence-transformers and ours cold, alternating; the median of the per-round ratios")
    parser.add_argument("--encode-backend", default="auto", help="ours: what encodes (the CLI's default, auto); sentence-transformers' side is torch")
    parser.add_argument("--ivf-vectors", type=int, default=1_000_000)
    parser.add_argument("--ivf-queries", type=int, default=10_000)
    arguments = parser.parse_args()
    limit = ["--limit", str(arguments.limit)]
    if arguments.part == "ours":
        return run_ours(arguments.data, arguments.cache, arguments.limit, arguments.out, arguments.encode_backend)
    if arguments.part == "st":
        return run_st(arguments.data, arguments.limit, arguments.out)
    if arguments.part == "ivf":
        return run_ivf(arguments.ivf_vectors, arguments.ivf_queries, arguments.out)
    if not arguments.data.is_dir():
        print(f"skipped: {arguments.data} not found")
        return None
    # This machine's speed drifts by several percent over minutes: alternate the two sides and
    # take the median of the per-round ratios, each cold run with an empty cache of its own.
    rounds = []
    for _ in range(arguments.rounds):
        st = fresh("--part", "st", "--data", str(arguments.data), *limit)
        with tempfile.TemporaryDirectory() as cache:
            ours = ["--part", "ours", "--data", str(arguments.data), "--cache", cache, "--encode-backend", arguments.encode_backend, *limit]
            cold = fresh(*ours)
            warm = fresh(*ours)
        rounds.append((st, cold, warm))
        print(f"round {len(rounds)}: sentence-transformers {st['seconds']:.1f}s, embedforge cold {cold['seconds']:.1f}s, warm {warm['seconds']:.1f}s "
              f"(ours encoded with {cold['encode_backend']})")
    time_ratio = statistics.median(cold["seconds"] / st["seconds"] for st, cold, _ in rounds)
    warm_ratio = statistics.median(warm["seconds"] / st["seconds"] for st, _, warm in rounds)
    st, cold, warm = rounds[0]
    identical = sum(len(set(cold["negatives"][key]) & set(negatives)) for key, negatives in st["negatives"].items())
    total = sum(len(negatives) for negatives in st["negatives"].values())
    overlap = identical / max(total, 1)
    print(f"pairs: {len(st['negatives'])}; identical negatives: {identical}/{total} = {overlap:.4f}")
    for column, label in enumerate(("sentence-transformers:", "embedforge cold:", "embedforge warm:")):
        seconds = statistics.median(side[column]["seconds"] for side in rounds)
        print(f"{label:22} {seconds:.1f}s (median), peak {rounds[0][column]['peak_gb']:.2f} GB")
    ivf = fresh("--part", "ivf", "--ivf-vectors", str(arguments.ivf_vectors), "--ivf-queries", str(arguments.ivf_queries))
    print(f"IVF over {arguments.ivf_vectors:,} vectors, {arguments.ivf_queries:,} queries: build {ivf['build_seconds']:.1f}s, "
          f"search {ivf['search_seconds']:.1f}s, recall@100 {ivf['recall_at_100']:.3f}, peak {ivf['peak_gb']:.2f} GB")
    print(f"RESULT overlap={overlap:.4f} time_ratio={time_ratio:.3f} warm_time_ratio={warm_ratio:.3f} "
          f"ivf_recall_at_100={ivf['recall_at_100']:.3f} ivf_peak_gb={ivf['peak_gb']:.2f}")


if __name__ == "__main__":
    main()
