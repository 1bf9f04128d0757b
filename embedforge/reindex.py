"""Reindex: re-embed a corpus with a (fine-tuned) model, incrementally and resumably, and search it.

Reads:  a SentenceTransformer (name or folder) and passages (any layout `load_corpus` reads).
Writes: into the index folder, each file atomically:
          shards/shard-NNNNNN.npy          vectors (float32 or float16), one row per encoded passage
          shards/shard-NNNNNN.texts.jsonl  the encoded text of each row, so search needs no corpus
          shards/shard-NNNNNN.json         ids, text sha256s, model identity, dtype; written last,
                                           its presence marks the shard complete
          index-GGGGGG.faiss, index-GGGGGG.ids.json   the FAISS index over all current passages, its row ids
          manifest.json                    model, dtype, index, and per passage id -> [shard, row, text sha256];
                                           written last, it names the index that search uses
Keeps:  every complete shard. A killed reindex resumes after the last complete shard; a later
        reindex with the same model encodes only passages whose text (by sha256) it has not
        encoded yet and drops removed ones. Another model or dtype re-encodes everything, and says so.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedforge.backends import INT8, check_backend, vectors_key
from embedforge.embeddings.cluster import RaySettings, connect, make_encoder
from embedforge.embeddings import (IndexSpec, build_index, configure_index, encode_texts, encode_throughput, load_model, model_identity, passage_text,
                                   resolve_model)
from embedforge.errors import EmbedforgeError
from embedforge.files import atomic_write, iter_jsonl, read_json, sha256_text, write_json
from embedforge.progress import progress_bar
from embedforge.text import format_duration

logger = logging.getLogger(__name__)

FORMAT = 1
DTYPES = ("float32", "float16")
INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
# auto: exact search while the float32 vectors fit comfortably in memory (1.5 GB per million
# 384-d passages), IVF beyond that, IVF-PQ (1/16 of the memory) past five million passages.
EXACT_MAX = IndexSpec().exact_max
IVF_MAX = 5_000_000
DRY_RUN_SAMPLE = 64


@dataclass(frozen=True)
class ReindexSettings:
    shard_size: int = 10_000
    dtype: str = "float32"
    index: str = "auto"
    batch_size: int = 64
    devices: tuple[str, ...] = ()
    nprobe: int = 32
    # torch and no cache for a library caller; the CLI passes --encode-backend (default auto) and --cache.
    encode_backend: str = "torch"
    cache: Path | None = None  # where an exported encoder is kept (a fine-tuned model ships its own)
    engine: RaySettings | None = None  # encode on Ray (same vectors, same files); None: in this process

    def check(self) -> None:
        """Settings errors before any work; with `engine`, also joins the Ray cluster."""
        check_backend(self.encode_backend)
        if self.engine is not None and self.devices:
            raise EmbedforgeError("--devices names this machine's devices; on Ray, actors hold them", where="--devices / --engine ray",
                                  fix="drop --devices and set --ray-actors and --ray-gpus-per-actor")
        if vectors_key(self.encode_backend) and len(self.devices) > 1:
            raise EmbedforgeError(f"--encode-backend {self.encode_backend} encodes in one process; several --devices encode with torch",
                                  where="--encode-backend / --devices", fix="drop --devices, or use an fp32 backend (auto, torch, onnx, openvino)")
        if self.dtype not in DTYPES:
            raise EmbedforgeError(f"Unknown dtype {self.dtype!r}", where="--dtype", fix=f"use one of {', '.join(DTYPES)}")
        if self.index not in INDEX_KINDS:
            raise EmbedforgeError(f"Unknown index kind {self.index!r}", where="--index", fix=f"use one of {', '.join(INDEX_KINDS)}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise EmbedforgeError("Shard size and batch size must be at least 1", where="--shard-size / --batch-size", fix="pass positive numbers")
        if self.engine is not None:
            connect(self.engine)


@dataclass
class ReindexStats:
    total: int
    encoded: int
    reused: int
    dropped: int
    shards_written: int
    index_kind: str
    seconds: float
    encode_seconds: float
    notes: list[str] = field(default_factory=list)

    def render(self, out_dir: Path) -> str:
        rate = f" ({self.encoded / self.encode_seconds:.1f} passages/s)" if self.encoded and self.encode_seconds > 0 else ""
        lines = [*self.notes, f"{self.total} passages: {self.encoded} encoded{rate}, {self.reused} reused, {self.dropped} dropped; "
                 f"{self.index_kind} index in {out_dir} ({self.seconds:.1f} s)"]
        return "\n".join(lines)


@dataclass
class Estimate:
    total: int
    to_encode: int
    sample_size: int
    passages_per_second: float
    seconds: float
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        if not self.to_encode:
            return "\n".join([*self.notes, f"{self.total} passages, none to encode: a reindex only rebuilds the index. Nothing was written."])
        return "\n".join([*self.notes, (
            f"{self.to_encode} of {self.total} passages to encode; measured {self.passages_per_second:.1f} passages/s on "
            f"{self.sample_size} of them: about {format_duration(self.seconds)} of encoding, plus model loading and the index. Nothing was written."
        )])


@dataclass
class Hit:
    rank: int
    id: str
    score: float
    text: str


def parse_devices(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def resolve_index_kind(kind: str, count: int) -> str:
    if kind != "auto":
        return kind
    if count <= EXACT_MAX:
        return "flat"
    return "ivf" if count <= IVF_MAX else "ivfpq"


# --- the index folder ------------------------------------------------------------------------


def _shard_files(out_dir: Path, shard: str) -> tuple[Path, Path, Path]:
    folder = Path(out_dir) / "shards"
    return folder / f"{shard}.npy", folder / f"{shard}.texts.jsonl", folder / f"{shard}.json"


def _shard_complete(out_dir: Path, shard: str) -> bool:
    return all(path.exists() for path in _shard_files(out_dir, shard))


def _shard_number(name: str) -> int | None:
    stem = name.split(".")[0]
    digits = stem.removeprefix("shard-")
    return int(digits) if stem.startswith("shard-") and digits.isdigit() else None


def read_manifest(index_dir: Path) -> dict:
    """The manifest of a finished reindex; says what to do when there is none."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise EmbedforgeError("The index folder does not exist", where=str(index_dir), fix="build it first: embedforge reindex --model M --corpus C --out DIR")
    if not (index_dir / "manifest.json").exists():
        raise EmbedforgeError(
            "No finished index in this folder (a reindex never ran here, or was stopped before the end)",
            where=str(index_dir), fix="run, or rerun, embedforge reindex --out with this folder; it resumes where it stopped",
        )
    manifest = read_json(index_dir / "manifest.json")
    if manifest.get("format") != FORMAT:
        raise EmbedforgeError(f"Index format {manifest.get('format')!r} is not the supported {FORMAT}", where=str(index_dir / "manifest.json"), fix="rerun embedforge reindex into a new folder")
    return manifest


def _write_shard(out_dir: Path, shard: str, ids: list[str], texts: list[str], hashes: list[str], vectors: np.ndarray, identity: str, dtype: str) -> None:
    vectors_path, texts_path, marker_path = _shard_files(out_dir, shard)
    with atomic_write(vectors_path, "wb") as handle:
        np.save(handle, vectors.astype(dtype))
    with atomic_write(texts_path) as handle:
        handle.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
    # Written last: a shard without its marker is a torn write of a killed run and is redone.
    write_json(marker_path, {"model_identity": identity, "dtype": dtype, "count": len(ids), "ids": ids, "hashes": hashes})


def _write_manifest(path: Path, header: dict, passages: dict[str, list]) -> None:
    # One line per passage: readable, and a tenth of the size of indent=2 for millions of passages.
    body = json.dumps(header, ensure_ascii=False, indent=2)[:-2]
    with atomic_write(path) as handle:
        handle.write(body + ',\n  "passages": {\n')
        handle.write(",\n".join(f"    {json.dumps(key, ensure_ascii=False)}: {json.dumps(value)}" for key, value in passages.items()))
        handle.write("\n  }\n}\n")


def _remove_unreferenced(out_dir: Path, manifest: dict) -> None:
    """After the manifest is in place: drop shards it no longer names, old indexes and torn temporary files."""
    keep = set(manifest["shards"])
    for file in (out_dir / "shards").iterdir():
        if file.name.startswith(".") or file.name.split(".")[0] not in keep:
            file.unlink(missing_ok=True)
    current = {manifest["index"]["file"], manifest["index"]["ids"]}
    for file in [*out_dir.glob("index-*"), *out_dir.glob(".*.tmp")]:
        if file.name not in current:
            file.unlink(missing_ok=True)


# --- planning: what is stored, what must be encoded ---------------------------------------------


@dataclass
class _Plan:
    identity: str
    ids: list[str]
    texts: list[str]
    hashes: list[str]
    located: dict[str, tuple[str, int]]  # text sha256 -> (shard, row) of a stored vector usable now
    pending: list[int]  # positions of passages to encode, in corpus order, one per distinct text
    previous: dict | None
    next_number: int
    notes: list[str]


def _plan(model_name: str, passages: list[dict], out_dir: Path, settings: ReindexSettings) -> _Plan:
    out_dir = Path(out_dir)
    if not passages:
        raise EmbedforgeError("The corpus has no passages", where="--corpus", fix="point --corpus at files that contain text")
    if out_dir.exists() and not out_dir.is_dir():
        raise EmbedforgeError("The index folder is a file", where=str(out_dir), fix="choose a folder for --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").exists() and not (out_dir / "shards").is_dir():
        raise EmbedforgeError("The folder holds other files, not a reindex", where=str(out_dir), fix="choose an empty or new folder for --out")
    identity = vector_identity(model_name, settings.encode_backend)
    texts = [passage_text(p) for p in passages]
    hashes = [sha256_text(text) for text in texts]
    previous = read_manifest(out_dir) if (out_dir / "manifest.json").exists() else None
    notes = []
    located: dict[str, tuple[str, int]] = {}
    if previous and previous["model_identity"] != identity:
        notes.append(f"The model differs from the one that built {out_dir} ({previous['model']}): full rebuild, every passage is encoded again.")
    elif previous and previous["dtype"] != settings.dtype:
        notes.append(f"The dtype differs from the stored {previous['dtype']}: full rebuild, every passage is encoded again.")
    elif previous:
        for shard, row, digest in previous["passages"].values():
            if _shard_complete(out_dir, shard):
                located.setdefault(digest, (shard, row))
    # Complete shards the manifest does not name are the work of a killed (or model-changing) run.
    referenced = set(previous["shards"]) if previous else set()
    numbers = [-1, *(n for n in map(_shard_number, referenced) if n is not None)]
    shards_folder = out_dir / "shards"
    for marker in sorted(shards_folder.glob("shard-*.json")) if shards_folder.is_dir() else []:
        shard = marker.name.removesuffix(".json")
        if not _shard_complete(out_dir, shard):
            continue
        numbers.append(_shard_number(shard) or 0)
        if shard in referenced:
            continue
        info = read_json(marker)
        if info["model_identity"] == identity and info["dtype"] == settings.dtype:
            for row, digest in enumerate(info["hashes"]):
                located.setdefault(digest, (shard, row))
    pending, queued = [], set()
    for position, digest in enumerate(hashes):
        if digest not in located and digest not in queued:
            queued.add(digest)
            pending.append(position)
    ids = [p["_id"] for p in passages]
    return _Plan(identity, ids, texts, hashes, located, pending, previous, max(numbers) + 1, notes)


def vector_identity(model_name: str, encode_backend: str) -> str:
    """What shards must share to be reused: the model, and the backend when its vectors differ from torch's."""
    key = vectors_key(encode_backend)
    return model_identity(model_name) + (f"+{key}" if key else "")


def _backend_used(model, plan: _Plan) -> str:
    """What encoded the stored vectors: `model` when it encoded some (None when nothing was
    encoded), else the shard identity (which carries a backend with other vectors) or the last manifest."""
    if model is not None:
        return getattr(model, "encode_backend", "torch")
    for quantized in INT8:
        if plan.identity.endswith(f"+{quantized}"):
            return quantized
    return (plan.previous or {}).get("encode_backend", "torch")


def _open_model(model_name: str, settings: ReindexSettings, model=None):
    """The model, and a multi-process pool when several devices are named (one process each)."""
    devices = list(settings.devices)
    if model is not None and vectors_key(getattr(model, "encode_backend", "torch")) != vectors_key(settings.encode_backend):
        raise ValueError(f"the given model encodes with {getattr(model, 'encode_backend', 'torch')}, the settings say {settings.encode_backend}")
    if model is None:
        # Several encoding processes each load the model themselves, on torch.
        backend = settings.encode_backend if len(devices) <= 1 else "torch"
        model = load_model(model_name, device=devices[0] if len(devices) == 1 else ("cpu" if devices else None), backend=backend, cache_dir=settings.cache)
    elif len(devices) == 1:
        model.to(devices[0])
    pool = model.start_multi_process_pool(devices) if len(devices) > 1 else None
    return model, pool


def _gather(out_dir: Path, entries: list[list]) -> np.ndarray:
    """All current vectors in manifest order, as float32, reading each shard once."""
    by_shard: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for position, (shard, row, _) in enumerate(entries):
        by_shard[shard][0].append(position)
        by_shard[shard][1].append(row)
    matrix = None
    for shard, (positions, rows) in by_shard.items():
        stored = np.load(_shard_files(out_dir, shard)[0], mmap_mode="r")
        if matrix is None:
            matrix = np.empty((len(entries), stored.shape[1]), dtype=np.float32)
        matrix[positions] = stored[rows]
    return matrix


# --- the two entry points ---------------------------------------------------------------------


def reindex(model_name: str, passages: list[dict], out_dir: Path, settings: ReindexSettings = ReindexSettings(), model=None) -> ReindexStats:
    """Encode what is not stored yet, shard by shard, then index every current passage."""
    import faiss

    settings.check()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    plan = _plan(model_name, passages, out_dir, settings)
    for note in plan.notes:
        logger.warning(note)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    for file in (out_dir / "shards").iterdir():
        # Files of a shard whose marker never came: nothing names them; they would only be overwritten.
        number = _shard_number(file.name)
        if number is not None and number >= plan.next_number:
            file.unlink(missing_ok=True)
    encode_seconds = 0.0
    shards_written = 0
    if plan.pending:
        model, pool = _open_model(model_name, settings, model)
        encode_started = time.perf_counter()
        encoder = make_encoder(model, model_name, settings.batch_size, settings.engine, pool, settings.cache)
        pending_texts = [plan.texts[p] for p in plan.pending]
        try:
            with progress_bar(total=len(plan.pending), desc="reindex", unit="passage", unit_scale=True) as progress:
                # A shard holds the passages in the order they were encoded (on Ray, as actors finish).
                for rows, vectors in encoder.stream(pending_texts, settings.shard_size, progress):
                    positions = [plan.pending[row] for row in rows]
                    shard = f"shard-{plan.next_number + shards_written:06d}"
                    _write_shard(out_dir, shard, [plan.ids[p] for p in positions], [plan.texts[p] for p in positions], [plan.hashes[p] for p in positions],
                                 vectors, plan.identity, settings.dtype)
                    shards_written += 1
                    for row, position in enumerate(positions):
                        plan.located[plan.hashes[position]] = (shard, row)
        finally:
            if pool is not None:
                model.stop_multi_process_pool(pool)
        encode_seconds = time.perf_counter() - encode_started
    entries = {identifier: [*plan.located[digest], digest] for identifier, digest in zip(plan.ids, plan.hashes)}
    previous = plan.previous or {}
    kind = resolve_index_kind(settings.index, len(entries))
    dropped = len(set(previous.get("passages", {})) - set(entries))
    stats = ReindexStats(len(entries), len(plan.pending), len(entries) - len(plan.pending), dropped, shards_written, kind, 0.0, encode_seconds, plan.notes)
    unchanged = (
        not plan.pending and not plan.notes and previous.get("index", {}).get("kind") == kind
        and list(previous.get("passages", {}).items()) == list(entries.items())
        and all((out_dir / previous["index"][name]).exists() for name in ("file", "ids"))
    )
    if unchanged:
        stats.notes = [*plan.notes, "Up to date: no passage changed, the index is kept."]
        stats.seconds = time.perf_counter() - started
        return stats
    vectors = _gather(out_dir, list(entries.values()))
    index = build_index(vectors, IndexSpec(kind=kind, nprobe=settings.nprobe))
    generation = previous.get("generation", 0) + 1
    index_file, ids_file = f"index-{generation:06d}.faiss", f"index-{generation:06d}.ids.json"
    with atomic_write(out_dir / index_file, "wb") as handle:
        handle.write(faiss.serialize_index(index).tobytes())
    write_json(out_dir / ids_file, plan.ids)
    stats.seconds = time.perf_counter() - started
    header = {
        "format": FORMAT,
        "model": model_name,
        "model_path": resolve_model(model_name),
        "model_identity": plan.identity,
        "encode_backend": _backend_used(model if plan.pending else None, plan),
        "dtype": settings.dtype,
        "dimension": int(vectors.shape[1]),
        "count": len(entries),
        "generation": generation,
        "index": {"kind": kind, "file": index_file, "ids": ids_file, "nprobe": settings.nprobe},
        "shards": sorted({shard for shard, _, _ in entries.values()}),
        "stats": {"encoded": stats.encoded, "reused": stats.reused, "dropped": stats.dropped, "seconds": round(stats.seconds, 3),
                  "encode_seconds": round(encode_seconds, 3), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    _write_manifest(out_dir / "manifest.json", header, entries)
    _remove_unreferenced(out_dir, header)
    return stats


def estimate(model_name: str, passages: list[dict], out_dir: Path, settings: ReindexSettings = ReindexSettings(), model=None) -> Estimate:
    """Time a sample of the passages a reindex would encode; writes nothing."""
    settings.check()
    plan = _plan(model_name, passages, out_dir, settings)
    if not plan.pending:
        return Estimate(len(passages), 0, 0, 0.0, 0.0, plan.notes)
    model, pool = _open_model(model_name, settings, model)
    try:
        # Spread over the corpus, so long and short passages are both in the sample.
        wanted = max(DRY_RUN_SAMPLE, 2 * settings.batch_size) * max(1, len(settings.devices))
        chosen = np.unique(np.linspace(0, len(plan.pending) - 1, num=min(len(plan.pending), wanted)).astype(int))
        sample = [plan.texts[plan.pending[i]] for i in chosen]
        rate = encode_throughput(model, sample, settings.batch_size, pool)
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    notes = plan.notes + (["Measured on this machine: --engine ray encodes on the cluster's actors, at their own rate."] if settings.engine else [])
    return Estimate(len(passages), len(plan.pending), len(sample), rate, len(plan.pending) / rate, notes)


def load_index_model(manifest: dict, index_dir: Path, cache_dir: Path | None = Path("cache")):
    """The model recorded in the manifest, refusing one whose files changed since the index was built."""
    recorded = manifest["model_path"]
    name = recorded if Path(recorded).exists() else manifest["model"]
    rebuild = f"rerun embedforge reindex --model {manifest['model']} --corpus CORPUS --out {index_dir}"
    if manifest["model_identity"].startswith("sha256:") and not Path(resolve_model(name)).exists():
        raise EmbedforgeError("The model folder this index was built with is gone", where=recorded, fix=f"restore it, or {rebuild} with the model you have")
    built_with = manifest.get("encode_backend", "torch")
    backend = built_with if vectors_key(built_with) else "torch"  # fp32 backends agree with torch, which loads fastest for one query
    if vector_identity(name, backend) != manifest["model_identity"]:
        raise EmbedforgeError(
            "The model is not the one this index was built with (its files changed since)", where=recorded,
            fix=f"{rebuild} to re-embed with it, or restore the original model",
        )
    return load_model(name, backend=backend, cache_dir=cache_dir)


def search(index_dir: Path, query: str, k: int = 10, model=None, cache_dir: Path | None = Path("cache")) -> list[Hit]:
    """Top-k passages for `query`, with their text read back from the shards."""
    import faiss

    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    index_path, ids_path = index_dir / manifest["index"]["file"], index_dir / manifest["index"]["ids"]
    if not index_path.exists() or not ids_path.exists():
        raise EmbedforgeError("The index named by the manifest is missing", where=str(index_path), fix=f"rerun embedforge reindex --out {index_dir}")
    model = model or load_index_model(manifest, index_dir, cache_dir)
    vector = encode_texts(model, [query], 1, kind="query")
    if vector.shape[1] != manifest["dimension"]:
        raise EmbedforgeError(
            f"The model makes {vector.shape[1]}-d vectors, the index holds {manifest['dimension']}-d ones", where=str(index_dir),
            fix="search with the model the index was built with",
        )
    index = configure_index(faiss.read_index(str(index_path)), IndexSpec(nprobe=manifest["index"]["nprobe"]))
    scores, rows = index.search(vector, min(k, index.ntotal))
    ids = read_json(ids_path)
    found = [(float(score), ids[row]) for score, row in zip(scores[0], rows[0]) if row >= 0]  # IVF may find fewer than k
    wanted: dict[str, set[int]] = defaultdict(set)
    for _, identifier in found:
        shard, row, _ = manifest["passages"][identifier]
        wanted[shard].add(row)
    texts = {}
    for shard, rows_wanted in wanted.items():
        for row, record in enumerate(iter_jsonl(_shard_files(index_dir, shard)[1])):
            if row in rows_wanted:
                texts[(shard, row)] = record["text"]
    return [Hit(rank, identifier, score, texts[tuple(manifest["passages"][identifier][:2])]) for rank, (score, identifier) in enumerate(found, start=1)]
