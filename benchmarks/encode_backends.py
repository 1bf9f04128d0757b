"""Encode speed per backend: torch, ONNX Runtime, OpenVINO and their int8 variants on nfcorpus (all-MiniLM-L6-v2).

Every backend encodes nfcorpus's passages and its test queries, in rounds that alternate the order
of the backends (this machine is shared and noisy), the way embedforge encodes (encode_texts, the
CPU batch plan). Prints per backend: passages/s, the export's one-time cost, the largest
|difference| of its vectors to torch's, and NDCG@10 on the nfcorpus test queries.
Default size: nfcorpus whole (3,633 passages, 323 test queries), 2 rounds; backends not
installed are skipped.
Ends with `RESULT speedup=<best fp32 backend / torch, passages/s> backend=<it> max_abs_diff=<its
largest |difference| to torch> int8_speedup=<fastest int8 backend / torch> int8_backend=<it>
int8_ndcg_delta=<its NDCG@10 - torch's>`; goals: speedup >= 1.8 with max_abs_diff <= 1e-4; int8_speedup >= 3 with |int8_ndcg_delta| <= 0.005.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from embedforge import backends
from embedforge.embeddings import encode_texts, load_model, passage_text
from embedforge.evaluate import load_beir
from embedforge.evaluate.metrics import ir_metrics

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FP32 = ("onnx", "openvino")
INT8 = ("onnx-int8", "openvino-int8")


def ndcg_at_10(passage_vectors: np.ndarray, query_vectors: np.ndarray, eval_set) -> float:
    import faiss

    index = faiss.IndexFlatIP(passage_vectors.shape[1])
    index.add(passage_vectors)
    _, rows = index.search(query_vectors, 100)
    ids = [p["_id"] for p in eval_set.passages]
    ranked = {query: [ids[i] for i in row] for query, row in zip(eval_set.queries, rows)}
    return float(np.mean(list(ir_metrics(ranked, eval_set.qrels)["ndcg@10"].values())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA / "nfcorpus")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--passages", type=int, default=None, help="encode only the first N passages (speed only; NDCG then covers a part of the corpus)")
    arguments = parser.parse_args()
    if not arguments.data.is_dir():
        print(f"skipped: {arguments.data} not found")
        return 0
    eval_set = load_beir(arguments.data)
    passages = eval_set.passages[: arguments.passages] if arguments.passages else eval_set.passages
    eval_set.passages = passages
    texts = [passage_text(p) for p in passages]
    queries = list(eval_set.queries.values())
    names = ["torch", *(name for name in (*FP32, *INT8) if backends.installed(name))]
    cache = Path(tempfile.mkdtemp(prefix="embedforge-backends-"))
    models, export_seconds = {}, {}
    for name in names:
        started = time.perf_counter()
        models[name] = load_model(arguments.model, backend=name, cache_dir=cache)
        export_seconds[name] = time.perf_counter() - started
        assert models[name].encode_backend == name, (name, models[name].encode_backend)
    print(f"{len(texts)} passages, {len(queries)} queries; backends: {', '.join(names)}")
    seconds = {name: 0.0 for name in names}
    vectors: dict[str, np.ndarray] = {}
    query_vectors: dict[str, np.ndarray] = {}
    for round_number in range(arguments.rounds):
        order = names if round_number % 2 == 0 else names[::-1]
        for name in order:
            started = time.perf_counter()
            vectors[name] = encode_texts(models[name], texts, 64, kind="document", progress=False)
            seconds[name] += time.perf_counter() - started
            query_vectors[name] = encode_texts(models[name], queries, 64, kind="query", progress=False)
            print(f"round {round_number + 1}: {name:10} {len(texts) / (time.perf_counter() - started):7.1f} passages/s", flush=True)
    rate = {name: arguments.rounds * len(texts) / seconds[name] for name in names}
    difference = {name: float(np.abs(vectors[name] - vectors["torch"]).max()) for name in names}
    ndcg = {name: ndcg_at_10(vectors[name], query_vectors[name], eval_set) for name in names}
    lowest_cosine = {name: float((vectors[name] * vectors["torch"]).sum(axis=1).min()) for name in names}
    print(f"{'backend':13} {'passages/s':>10} {'x torch':>8} {'load+export s':>13} {'max |diff|':>10} {'min cos':>8} {'NDCG@10':>8}")
    for name in names:
        print(f"{name:13} {rate[name]:10.1f} {rate[name] / rate['torch']:8.2f} {export_seconds[name]:13.1f} {difference[name]:10.2e} {lowest_cosine[name]:8.4f} {ndcg[name]:8.4f}")
    fp32 = [name for name in FP32 if name in rate] or ["torch"]
    best = max(fp32, key=rate.get)
    figures = {"speedup": f"{rate[best] / rate['torch']:.2f}", "backend": best, "max_abs_diff": f"{difference[best]:.1e}"}
    quantized = [name for name in INT8 if name in rate]
    if quantized:
        fastest = max(quantized, key=rate.get)
        figures.update(int8_speedup=f"{rate[fastest] / rate['torch']:.2f}", int8_backend=fastest, int8_ndcg_delta=f"{ndcg[fastest] - ndcg['torch']:+.4f}")
    print("RESULT " + " ".join(f"{key}={value}" for key, value in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
