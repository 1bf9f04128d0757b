"""Encoding backends: the same SentenceTransformer, its transformer run by ONNX Runtime or OpenVINO.

Reads:  a loaded SentenceTransformer on the CPU and the folder it came from.
Writes: `cache/backends/<model hash>/<backend>/` (the exported graph and `check.json`), or
        `<model>/onnx/` for a model that ships its own export (the fine-tuned model does).
Keeps:  one export per model and backend, with the proof that it agrees with torch: fp32
        backends must give vectors within AGREEMENT of torch's on probe texts, or they are not
        used. That is why an fp32 backend changes no cache key or fingerprint, while
        the int8 ones (`onnx-int8`, `openvino-int8`: other vectors) do.

Tokenization, pooling, normalization and the model's prompts stay sentence-transformers' own:
only the Hugging Face model inside the first module is swapped for a runner of the export.
sentence-transformers' own `backend="onnx"` goes through optimum, whose releases pin
transformers < 4.58; this module needs only `onnxruntime` + `onnx` (or `openvino`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from embedforge.errors import EmbedforgeError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-int8")
INT8 = ("onnx-int8", "openvino-int8")  # quantized: other vectors, keyed apart, never taken by auto
OPENVINO = ("openvino", "openvino-int8")  # exported and run by OpenVINO
AGREEMENT = 1e-4  # largest |difference| to torch's normalized vectors for an fp32 backend
EXPORT_VERSION = 2  # 2: OpenVINO checked at f32 (1 checked it in bf16 on CPUs that have it)
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_PACKAGES = {"onnx": ("onnxruntime", "onnx"), "onnx-int8": ("onnxruntime", "onnx"), "openvino": ("openvino",), "openvino-int8": ("openvino", "nncf")}
_FIX = {"onnx": "pip install onnxruntime onnx (make setup installs them)", "onnx-int8": "pip install onnxruntime onnx (make setup installs them)",
        "openvino": "pip install 'embedforge[openvino]'", "openvino-int8": "pip install 'embedforge[openvino]' (OpenVINO and NNCF; make setup installs them)"}


def vectors_key(backend: str) -> str | None:
    """What a backend adds to cache keys and fingerprints: nothing for those that agree with torch."""
    return backend if backend in INT8 else None


def installed(backend: str) -> bool:
    return all(importlib.util.find_spec(package) for package in _PACKAGES.get(backend, ()))


def check_backend(backend: str) -> None:
    """A clear error before any work when an explicitly chosen backend cannot run here."""
    if backend not in BACKENDS:
        raise EmbedforgeError(f"Unknown encode backend {backend!r}", where="--encode-backend", fix=f"use one of: {', '.join(BACKENDS)}")
    if backend in _PACKAGES and not installed(backend):
        raise EmbedforgeError(f"The {backend} encode backend is not installed", where="--encode-backend", fix=f"{_FIX[backend]}, or use --encode-backend torch")


def attach(model, model_folder: str, identity: str, backend: str, cache_dir: Path | None) -> str:
    """Run `model`'s transformer on `backend` (exported once, then reused); returns the backend used.

    `auto` takes the fastest installed backend whose check passed and measured faster than torch
    (torch when none did, when the model is not on the CPU, when it is not a plain transformer +
    pooling model, or when there is no cache folder for an export)."""
    check_backend(backend)
    transformer = _transformer_module(model)
    on_cpu = str(model.device) == "cpu"
    if backend == "torch" or (backend == "auto" and (not on_cpu or transformer is None)):
        return "torch"
    if transformer is None or not on_cpu:
        raise EmbedforgeError(
            f"The {backend} encode backend runs a transformer model on the CPU; this model is {'not a transformer model' if transformer is None else 'on ' + str(model.device)}",
            where=model_folder, fix="use --encode-backend torch (or auto)",
        )
    candidates = [backend] if backend != "auto" else [name for name in ("onnx", "openvino") if installed(name)]
    checks, folders = {}, {}
    for name in candidates:
        try:
            folders[name] = export_folder(model_folder, identity, name, cache_dir)
            checks[name] = ensure_export(model, name, folders[name])
        except EmbedforgeError as error:
            if backend != "auto":
                raise
            logger.warning("encode backend %s is unusable for this model (%s); auto goes on without it", name, error)
    usable = {name: check for name, check in checks.items() if agrees(check)}
    if backend != "auto" and backend not in usable:
        raise EmbedforgeError(
            f"The {backend} export of this model disagrees with torch (max |difference| {checks[backend]['max_abs_diff']:.2e} > {AGREEMENT:g})",
            where=str(folders[backend]), fix="use --encode-backend torch, and report the model",
        )
    ranked = sorted(usable, key=lambda name: -usable[name]["speedup"]) if backend == "auto" else [backend]
    for name in ranked:
        if backend == "auto" and usable[name]["speedup"] <= 1.0:
            break
        try:
            run = load_runner(name, folders[name])
        except Exception as error:  # a runtime that cannot open its own export: auto goes on, a chosen backend is an error
            if backend != "auto":
                raise EmbedforgeError(f"The {name} runtime cannot load the export ({type(error).__name__}: {str(error)[:200]})", where=str(folders[name]),
                                      fix=f"delete {folders[name]} to export again, or use --encode-backend torch") from error
            logger.warning("encode backend %s cannot load its export (%s); auto goes on without it", name, error)
            continue
        transformer.model = _runner(run, transformer.model.config, usable[name]["inputs"])
        logger.info("encoding with %s (%.2fx torch when it was exported)", name, usable[name]["speedup"])
        return name
    return "torch"


def agrees(check: dict) -> bool:
    """Whether an export may stand in for torch: an fp32 one within AGREEMENT of its vectors
    (int8 changes the vectors by design, and its vectors are keyed apart)."""
    return check["backend"] in INT8 or check["max_abs_diff"] <= AGREEMENT


def export_folder(model_folder: str, identity: str, backend: str, cache_dir: Path | None) -> Path:
    """Where a model's export lives: in the model when it ships one made from these very weights
    (a fine-tuned model does), else in the cache under a hash of the model's identity."""
    shipped = Path(model_folder) / "onnx"
    if backend == "onnx" and _shipped_export_matches(shipped, Path(model_folder)):
        return shipped
    if cache_dir is None:
        raise EmbedforgeError(f"The {backend} encode backend needs a cache folder for its export", where=model_folder, fix="pass --cache, or --encode-backend torch")
    key = identity.removeprefix("sha256:") if identity.startswith("sha256:") else hashlib.sha256(identity.encode()).hexdigest()  # hub names contain slashes
    return Path(cache_dir) / "backends" / key[:32] / backend


def _weights_sha256(model_folder: Path) -> str:
    """The model's files other than its shipped export and its card: what the export was made from."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_folder.rglob("*") if p.is_file() and p.name != "README.md" and "onnx" not in p.relative_to(model_folder).parts[:1]):
        digest.update(path.relative_to(model_folder).as_posix().encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _shipped_export_matches(shipped: Path, model_folder: Path) -> bool:
    check = _read_check(shipped)
    return check is not None and check.get("weights_sha256") == _weights_sha256(model_folder)


def _read_check(folder: Path) -> dict | None:
    """The folder's check when it is complete and of this version, else None."""
    try:
        check = json.loads((folder / "check.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return check if check.get("version") == EXPORT_VERSION else None


def ensure_export(model, backend: str, folder: Path, weights_sha256: str | None = None) -> dict:
    """The export's check, exporting first when the folder has none (written whole, or not at all).

    Two processes exporting at once both succeed: the second to finish keeps the first's export."""
    check = _read_check(folder)
    if check is not None:
        return check
    started = time.perf_counter()
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        # Inside the try: an unwritable cache is an export failure (auto goes on with torch), not a crash.
        _remove_abandoned_partials(folder)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        # The exporters' deprecation notes and the fusions' per-operator log lines are for us, not
        # for a user; errors still show.
        with warnings.catch_warnings(), _interrupt_survives():
            warnings.simplefilter("ignore")
            disabled = logging.root.manager.disable
            logging.disable(max(disabled, logging.WARNING))
            try:
                inputs = _export(model, backend, partial)
            finally:
                logging.disable(disabled)
        check = {"version": EXPORT_VERSION, "backend": backend, "inputs": inputs, **_compare(model, backend, partial, inputs)}
        check["export_seconds"] = round(time.perf_counter() - started, 2)
        if weights_sha256:
            check["weights_sha256"] = weights_sha256
        # Plain writes are enough inside the partial folder: it is renamed into place whole.
        (partial / "check.json").write_text(json.dumps(check, indent=2), encoding="utf-8")
        theirs = _read_check(folder)
        if theirs is not None:  # another process finished first, and may be using its export
            return theirs
        shutil.rmtree(folder, ignore_errors=True)  # an export of an older version, or half of one
        try:
            os.replace(partial, folder)
        except OSError:
            theirs = _read_check(folder)
            if theirs is None:
                raise
            return theirs
    except EmbedforgeError:
        raise
    except Exception as error:
        raise EmbedforgeError(f"Exporting the model to {backend} failed ({type(error).__name__}: {str(error)[:200]})", where=str(folder),
                              fix="use --encode-backend torch") from error
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("exported to %s in %.1fs: max |difference| to torch %.2e, %.2fx its speed", backend, check["export_seconds"], check["max_abs_diff"], check["speedup"])
    return check


@contextlib.contextmanager
def _interrupt_survives():
    """The exporters call Python code from C++ and catch whatever it raises, KeyboardInterrupt
    too (a Ctrl-C 1.5 s into an OpenVINO export was lost and the run went on): a Ctrl-C during
    the export is raised again once it returns."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None or previous is signal.SIG_IGN:
        # Off the main thread no handler can be set; an ignored Ctrl-C stays ignored; a handler
        # installed from C cannot be put back from Python.
        yield
        return
    received = []

    def remember(signum, frame):
        received.append(signum)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _remove_abandoned_partials(folder: Path) -> None:
    """Partial exports of processes that died (killed mid-export) are removed; live ones are not."""
    for partial in folder.parent.glob(f"{folder.name}.partial-*") if folder.parent.is_dir() else []:
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_with_model(model, model_folder: Path) -> dict:
    """Ship an ONNX export inside a saved model (`<model>/onnx/model.onnx`, the layout
    sentence-transformers' own ONNX backend reads), so that it is served as it was evaluated.
    Its check names the weights it was made from: once they change, the export is not used."""
    model_folder = Path(model_folder)
    return ensure_export(model, "onnx", model_folder / "onnx", weights_sha256=_weights_sha256(model_folder))


# --- export and run ---------------------------------------------------------------------------


def _transformer_module(model):
    from sentence_transformers.base.modules.transformer import Transformer

    first = model[0] if len(model) else None
    if not isinstance(first, Transformer) or not hasattr(first.model, "config") or getattr(first.model.config, "is_encoder_decoder", False):
        return None
    return first


def _export(model, backend: str, folder: Path) -> list[str]:
    """The transformer as a graph from token ids to token embeddings, batch and length dynamic."""
    import torch

    hf_model = copy.deepcopy(_transformer_module(model).model).eval().float()
    try:
        hf_model.set_attn_implementation("eager")  # plain matmuls: ONNX Runtime fuses them into one Attention op, SDPA it does not
    except (AttributeError, ValueError):
        pass
    example = model.tokenizer(["a probe text", "a b"], return_tensors="pt", padding=True)
    names = [name for name in _INPUTS if name in example]
    arguments = tuple(example[name] for name in names)

    class Graph(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            return self.inner(**dict(zip(names, tensors))).last_hidden_state

    if backend in OPENVINO:
        import openvino

        converted = openvino.convert_model(Graph(hf_model), example_input=arguments)
        if backend == "openvino-int8":
            converted = _compress_weights(converted)
        openvino.save_model(converted, str(folder / "openvino_model.xml"), compress_to_fp16=False)
        return names
    dynamic = {name: {0: "batch", 1: "sequence"} for name in (*names, "last_hidden_state")}
    fp32 = folder / ("model_fp32.onnx" if backend == "onnx-int8" else "model.onnx")
    with torch.no_grad():
        torch.onnx.export(Graph(hf_model), arguments, str(fp32), input_names=names, output_names=["last_hidden_state"], dynamic_axes=dynamic,
                          opset_version=17, dynamo=False)
    _fuse(fp32, hf_model.config)
    if backend == "onnx-int8":
        _quantize(fp32, folder / "model.onnx")
        fp32.unlink()
    return names


def _compress_weights(converted):
    """int8 weights (asymmetric, one scale per output channel), from the weights alone: no
    calibration texts, so the vectors depend on the model only. OpenVINO's CPU plugin then
    quantizes the activations of each matmul as it runs (int8 dot products where the CPU has
    VNNI). On nfcorpus its vectors kept a cosine of 0.9989 or more to torch's (onnx-int8: 0.9899),
    at 3.0x torch's speed against 2.6x (benchmarks/README)."""
    import nncf

    return nncf.compress_weights(converted, mode=nncf.CompressWeightsMode.INT8_ASYM)


def _quantize(source: Path, target: Path) -> None:
    """int8 weights, one scale per output channel: on 128 nfcorpus passages its vectors kept a cosine
    of 0.986 or more to torch's, against 0.905 with one scale per tensor, at the same speed."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The fused operators carry no type information; their outputs are float.
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _fuse(path: Path, config) -> None:
    """ONNX Runtime's transformer fusions (attention, layer norm, GELU) for BERT-like encoders;
    the plain graph stays when they do not apply. The check afterwards guards the result."""
    if getattr(config, "model_type", None) not in ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra"):
        return
    from onnxruntime.transformers import optimizer

    try:
        fused = optimizer.optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size)
    except Exception:  # the plain graph is correct, only slower
        logger.info("onnxruntime fusions do not apply to this model", exc_info=True)
        return
    fused.save_model_to_file(str(path))


def load_runner(backend: str, folder: Path) -> Callable[[dict], np.ndarray]:
    """A function from the tokenizer's arrays to token embeddings, on the export in `folder`."""
    import torch

    threads = torch.get_num_threads()  # the threads torch would have used, no more
    if backend in OPENVINO:
        # OpenVINO computes in bf16 by default on CPUs with native bf16 (AVX512-BF16, AMX): vectors
        # ~1e-3 off torch's (all-MiniLM-L6-v2), which the fp32 agreement check refuses.
        compiled = _openvino_core().compile_model(str(folder / "openvino_model.xml"), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        return lambda feeds: np.array(request.infer(list(feeds.values()))[0], copy=True)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are noise to a user
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(["last_hidden_state"], feeds)[0]


@functools.cache
def _openvino_core():
    """One OpenVINO Core for the process, never released. Each Core's CPU plugin installs its own
    signal stack and, when released, puts back the one it found: two released out of order leave
    the main thread on an unmapped stack, and the next Ctrl-C (any Python signal handler) is a
    segmentation fault instead of a KeyboardInterrupt."""
    import openvino

    return openvino.Core()


@functools.cache
def _runner_class():
    import torch  # here, not at the top: the CLI imports this module and must stay quick

    class Runner(torch.nn.Module):
        """Stands in for the Hugging Face model inside sentence-transformers' Transformer module."""

        def __init__(self, run: Callable[[dict], np.ndarray], config, inputs: list[str]):
            super().__init__()
            self.run, self.config, self.inputs = run, config, inputs

        def forward(self, **features):
            feeds = {name: features[name].cpu().numpy().astype(np.int64) for name in self.inputs if name in features}
            if "token_type_ids" in self.inputs and "token_type_ids" not in feeds:
                feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
            return {"last_hidden_state": torch.from_numpy(self.run(feeds))}

    return Runner


def _runner(run: Callable[[dict], np.ndarray], config, inputs: list[str]):
    return _runner_class()(run, config, inputs)


def _probe_texts() -> list[str]:
    """Texts of many lengths (some longer than any model's limit, so truncation is checked too),
    batched together so that padding is checked as well."""
    words = ("retrieval embedding protein river contract clause engine glacier violin tax satellite bakery volcano "
             "patient dose trial court appeal statute").split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=length)) for length in [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610] * 4]


def _compare(model, backend: str, folder: Path, inputs: list[str]) -> dict:
    """Max |difference| of normalized vectors to torch's, and speed relative to torch, alternating
    the two over rounds (this machine is shared and noisy)."""
    transformer = _transformer_module(model)
    original = transformer.model
    runner = _runner(load_runner(backend, folder), original.config, inputs)
    texts = _probe_texts()
    seconds = {"torch": 0.0, backend: 0.0}
    vectors = {}

    def encode(name):
        transformer.model = original if name == "torch" else runner
        started = time.perf_counter()
        result = model.encode_document(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return result, time.perf_counter() - started

    try:
        encode(backend)  # warm-up: the first call allocates
        for _ in range(2):
            for name in ("torch", backend):
                vectors[name], elapsed = encode(name)
                seconds[name] += elapsed
    finally:
        transformer.model = original
    return {"max_abs_diff": float(np.abs(vectors["torch"] - vectors[backend]).max()), "speedup": round(seconds["torch"] / max(seconds[backend], 1e-9), 3),
            "probe_texts": len(texts)}
