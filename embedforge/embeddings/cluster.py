"""Corpus encodings on a Ray cluster: `ray.data` batch inference over an actor pool, one model per actor.

Reads:  passages' texts, and the model the driver loaded (its folder, max_seq_length, prompts and
        the encode backend it settled on, so every actor encodes exactly as the driver would).
Writes: nothing; vectors come back to the caller, which stores them where a local run would.
Keeps:  nothing between calls. A model folder's files travel through Ray's object store to any
        actor that does not see the same folder (by content hash), so a model trained on the head
        node needs no shared disk; a model given by hub name is loaded by each actor from the hub.

Each actor runs `embedforge.embeddings.encode_texts` on its blocks, so the vectors are those of a
local run up to padding (texts batch with other neighbours): max |difference| ~1e-7 on CPU.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np

from embedforge.errors import EmbedforgeError

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
BLOCK_TEXTS = 512  # texts per Ray block: small enough that actors share a 5,000-passage corpus evenly
_INSTALL = "pip install 'embedforge[ray]' (make setup installs it)"


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide: runtime settings only (the vectors do not depend on them)."""

    address: str = "auto"  # "auto" (a cluster started by `ray start`), "host:port", "ray://host:10001", or "local"
    actors: int = 2
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0

    def check(self) -> None:
        if self.actors < 1:
            raise EmbedforgeError("--ray-actors must be at least 1", where="--ray-actors", fix="pass e.g. --ray-actors 2")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise EmbedforgeError("An actor needs a positive CPU share and a GPU share of 0 or more", where="--ray-cpus-per-actor / --ray-gpus-per-actor",
                                  fix="pass e.g. --ray-cpus-per-actor 1 --ray-gpus-per-actor 0")


def _reachable(address: str, timeout: float = 5.0) -> None:
    """A clear error in seconds for a host:port nobody listens on (ray.init would retry for a minute)."""
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if not parts.hostname or not parts.port:
        raise EmbedforgeError(f"Cannot read the Ray address {address!r}", where="--ray-address", fix="pass auto, local, host:port (the head's GCS port, 6379 by default) or ray://host:10001")
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=timeout).close()
    except OSError as error:
        raise EmbedforgeError(f"No Ray cluster answers at {address} ({error.strerror or error})", where="--ray-address",
                              fix="start the head with `ray start --head` and pass its address, or use --ray-address local to run Ray on this machine") from error


def connect(settings: RaySettings) -> None:
    """Join (or, with address "local", start) the Ray cluster, and check that it can hold the actors; before any work."""
    settings.check()
    try:
        import ray
        import ray.data  # noqa: F401 (the [data] extra)
    except ImportError as error:
        raise EmbedforgeError(f"--engine ray needs Ray Data ({error})", where="--engine", fix=_INSTALL) from error
    if not ray.is_initialized():
        if settings.address not in ("auto", "local"):
            _reachable(settings.address)
        options = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        try:
            ray.init(**options) if settings.address == "local" else ray.init(address=settings.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            fix = ("start one with `ray start --head`, pass --ray-address host:port, or use --ray-address local to run Ray on this machine"
                   if settings.address == "auto" else "check --ray-address, and that this machine runs the cluster's Ray and Python versions")
            raise EmbedforgeError(f"Cannot join a Ray cluster at {settings.address} ({str(error).splitlines()[0][:200]})", where="--ray-address", fix=fix) from error
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line per dataset otherwise
    resources = ray.cluster_resources()
    wanted = {"CPU": settings.actors * settings.cpus_per_actor, "GPU": settings.actors * settings.gpus_per_actor}
    for name, amount in wanted.items():
        if amount > resources.get(name, 0) + 1e-9:
            # Ray Data would wait for them forever: a scripted run must not wedge.
            raise EmbedforgeError(
                f"{settings.actors} actors want {amount:g} {name}s; the Ray cluster has {resources.get(name, 0):g}", where="--ray-actors / --ray-cpus-per-actor / --ray-gpus-per-actor",
                fix="lower --ray-actors or the per-actor share, or add nodes to the cluster",
            )
    largest = {name: max((node.get("Resources", {}).get(name, 0) for node in ray.nodes() if node.get("Alive")), default=0) for name in wanted}
    for name, share in (("CPU", settings.cpus_per_actor), ("GPU", settings.gpus_per_actor)):
        if share > largest[name] + 1e-9:  # an actor runs on one node
            raise EmbedforgeError(f"An actor wants {share:g} {name}s; the largest node of the Ray cluster has {largest[name]:g}",
                                  where="--ray-cpus-per-actor / --ray-gpus-per-actor", fix="lower the per-actor share to what one node holds")


def engine_of(config) -> RaySettings | None:
    """The Ray settings of a run configuration, None for the local engine."""
    if config.engine == "local":
        return None
    return RaySettings(config.ray_address, config.ray_actors, config.ray_gpus_per_actor, config.ray_cpus_per_actor)


def make_encoder(model, model_name: str, batch_size: int, engine: RaySettings | None = None, pool=None, cache_dir: Path | None = None):
    """The encoder of corpus vectors: in this process (`pool`: several devices), or on Ray when `engine` is given."""
    from embedforge.embeddings import LocalEncoder

    if engine is None:
        return LocalEncoder(model, batch_size, pool)
    return RayEncoder(engine, model, model_name, batch_size, cache_dir)


def _pack(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _unpacked(identity: str, packed) -> Path:
    """The model's files in this node's temporary folder, one copy per model (the actors of a node share it)."""
    import ray

    from embedforge.embeddings import model_identity

    target = Path(tempfile.gettempdir()) / "embedforge-models" / identity.replace(":", "-")
    if target.is_dir() and model_identity(str(target)) == identity:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=target.parent))
    for name, data in ray.get(packed).items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
    shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another actor of this node renamed its copy first: the same files
        shutil.rmtree(staging, ignore_errors=True)
    return target


class _EncodeActor:
    """One model per actor, loaded once; each call encodes one block of texts."""

    def __init__(self, model_name: str, identity: str | None, packed: list, max_seq_length: int, prompts: dict[str, str], backend: str,
                 cache_dir: str | None, batch_size: int, cpus: float):
        import ray
        import torch

        from embedforge.embeddings import load_model, model_identity

        if torch.cuda.device_count() == 0:
            torch.set_num_threads(max(1, int(cpus)))  # the actor's CPU share, not the node's cores
        folder = Path(model_name)
        if identity is not None and (not folder.is_dir() or model_identity(str(folder)) != identity):
            # This node does not see the driver's model folder: unpack the copy the driver put in the object store.
            model_name = str(_unpacked(identity, packed[0]))
        cache = Path(cache_dir) if cache_dir and Path(cache_dir).is_dir() else Path(tempfile.gettempdir()) / "embedforge-cache"
        self.model = load_model(model_name, max_seq_length=max_seq_length, prompts=prompts, backend=backend, cache_dir=cache)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from embedforge.embeddings import encode_texts

        vectors = encode_texts(self.model, [str(text) for text in batch["text"]], self.batch_size, kind="document", progress=False)
        return {"position": batch["position"], "vector": vectors}


class RayEncoder:
    """Corpus vectors through `ray.data`: blocks of texts, streamed back as the actors finish them."""

    def __init__(self, settings: RaySettings, model, model_name: str, batch_size: int, cache_dir: Path | None = None):
        from embedforge.embeddings import resolve_model

        self.settings, self.model, self.batch_size, self.cache_dir = settings, model, batch_size, cache_dir
        self.model_name = resolve_model(model_name)

    def _actor_backend(self) -> str:
        """The driver's backend for CPU actors; torch for GPU actors, refused where that changes the vectors."""
        from embedforge.backends import vectors_key

        backend = getattr(self.model, "encode_backend", "torch")
        if self.settings.gpus_per_actor == 0:
            return backend
        if vectors_key(backend):
            raise EmbedforgeError(f"--encode-backend {backend} runs on CPUs; GPU actors encode with torch, whose vectors differ", where="--encode-backend / --ray-gpus-per-actor",
                                  fix=f"use --encode-backend auto (or torch) with GPU actors, or CPU actors (--ray-gpus-per-actor 0) for {backend}")
        return "torch"  # the driver's CPU export is for CPUs

    def stream(self, texts: list[str], chunk_size: int, progress=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, vectors) in chunks of `chunk_size` rows (the last may be smaller), in the order the actors finish."""
        import pyarrow as pa
        import ray
        import ray.data

        backend = self._actor_backend()
        connect(self.settings)
        if not texts:
            return
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the caller's bar counts passages
        from embedforge.embeddings import model_identity

        folder = Path(self.model_name)
        # By content: a node holding another model at the same path (an older training) gets the driver's.
        identity = model_identity(str(folder)) if folder.is_dir() else None
        # In a list: Ray resolves a top-level reference when the actor is created, on every restart.
        packed = [ray.put(_pack(folder))] if identity is not None else []

        table = pa.table({"position": np.arange(len(texts), dtype=np.int64), "text": texts})
        blocks = [table.slice(start, BLOCK_TEXTS) for start in range(0, len(texts), BLOCK_TEXTS)]
        dataset = ray.data.from_arrow(blocks).map_batches(
            _EncodeActor, batch_size=BLOCK_TEXTS, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=min(self.settings.actors, len(blocks))),
            num_cpus=self.settings.cpus_per_actor, num_gpus=self.settings.gpus_per_actor or None,
            fn_constructor_kwargs=dict(model_name=self.model_name, identity=identity, packed=packed, max_seq_length=self.model.max_seq_length,
                                       prompts=dict(self.model.prompts), backend=backend, cache_dir=str(self.cache_dir) if self.cache_dir else None,
                                       batch_size=self.batch_size, cpus=self.settings.cpus_per_actor),
        )
        positions, vectors, held = [], [], 0
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            positions.append(batch["position"])
            vectors.append(np.asarray(batch["vector"], dtype=np.float32))
            held += len(batch["position"])
            if progress is not None:
                progress.update(len(batch["position"]))
            while held >= chunk_size:
                chunk, positions, vectors, held = _take(positions, vectors, chunk_size)
                yield chunk
        if held:
            yield _take(positions, vectors, held)[0]


def _take(positions: list[np.ndarray], vectors: list[np.ndarray], count: int):
    """The first `count` rows of the held batches, and what remains."""
    all_positions, all_vectors = np.concatenate(positions), np.concatenate(vectors)
    rest = len(all_positions) - count
    return (all_positions[:count], all_vectors[:count]), [all_positions[count:]], [all_vectors[count:]], rest

