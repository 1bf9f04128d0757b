"""Encoding backends: ONNX Runtime and OpenVINO give torch's vectors (or are not used), export once
per model, and only a backend with other vectors (onnx-int8, openvino-int8) changes cache keys."""

import json

import numpy as np
import pytest

from embedforge import backends
from embedforge.embeddings import corpus_embeddings, corpus_key, encode_texts, load_model
from embedforge.errors import EmbedforgeError

TEXTS = ["apple river", "history of the engine " * 40, "tax", "what is a protein", "engine"] * 4  # one longer than max_seq_length
FP32 = [pytest.param(name, marks=pytest.mark.skipif(not backends.installed(name), reason=f"{name} is not installed")) for name in ("onnx", "openvino")]


def vectors(model):
    return encode_texts(model, TEXTS, 4, kind="document", progress=False)


@pytest.mark.parametrize("backend", FP32)
def test_an_fp32_backend_gives_torch_vectors_for_documents_and_queries(tiny_model, tmp_path, backend):
    torch_model = load_model(tiny_model)
    model = load_model(tiny_model, backend=backend, cache_dir=tmp_path)
    assert model.encode_backend == backend
    assert np.abs(vectors(model) - vectors(torch_model)).max() <= backends.AGREEMENT
    queries = ["apple", "history of tax"]
    assert np.abs(encode_texts(model, queries, 2, kind="query") - encode_texts(torch_model, queries, 2, kind="query")).max() <= backends.AGREEMENT
    check = json.loads(next(tmp_path.glob(f"backends/*/{backend}/check.json")).read_text())
    assert check["max_abs_diff"] <= backends.AGREEMENT and check["probe_texts"] > 0


def test_the_export_happens_once_per_model(tiny_model, tmp_path, monkeypatch):
    load_model(tiny_model, backend="onnx", cache_dir=tmp_path)
    monkeypatch.setattr(backends, "_export", lambda *arguments: pytest.fail("exported a second time"))
    assert load_model(tiny_model, backend="onnx", cache_dir=tmp_path).encode_backend == "onnx"


def test_a_failed_export_leaves_nothing_behind_and_the_next_one_succeeds(tiny_model, tmp_path, monkeypatch):
    real = backends._export

    def half_then_fail(model, backend, folder):
        (folder / "model.onnx").write_bytes(b"half a graph")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backends, "_export", half_then_fail)
    with pytest.raises(EmbedforgeError, match="Exporting the model to onnx failed"):
        load_model(tiny_model, backend="onnx", cache_dir=tmp_path)
    assert not list(tmp_path.glob("backends/*/*"))  # no folder that a later run could take for an export
    monkeypatch.setattr(backends, "_export", real)
    assert load_model(tiny_model, backend="onnx", cache_dir=tmp_path).encode_backend == "onnx"


def test_an_export_that_disagrees_with_torch_is_refused_or_passed_over(tiny_model, tmp_path, monkeypatch):
    real = backends.load_runner
    monkeypatch.setattr(backends, "load_runner", lambda backend, folder: (lambda feeds, run=real(backend, folder): run(feeds) + 0.01))
    with pytest.raises(EmbedforgeError, match="disagrees with torch"):
        load_model(tiny_model, backend="onnx", cache_dir=tmp_path)
    monkeypatch.setattr(backends, "installed", lambda name: name == "onnx")
    model = load_model(tiny_model, backend="auto", cache_dir=tmp_path)
    assert model.encode_backend == "torch"
    assert np.abs(vectors(model) - vectors(load_model(tiny_model))).max() == 0


def test_auto_takes_a_backend_only_when_it_was_measured_faster(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "installed", lambda name: name == "onnx")
    load_model(tiny_model, backend="onnx", cache_dir=tmp_path)
    check_file = next(tmp_path.glob("backends/*/onnx/check.json"))
    check = json.loads(check_file.read_text())
    for speedup, expected in ((0.8, "torch"), (1.5, "onnx")):
        check_file.write_text(json.dumps({**check, "speedup": speedup}))
        assert load_model(tiny_model, backend="auto", cache_dir=tmp_path).encode_backend == expected


@pytest.mark.parametrize("quantized", ["onnx-int8", "openvino-int8"])
def test_int8_changes_the_vectors_and_so_the_cache_key(tiny_model, tmp_path, quantized):
    if not backends.installed(quantized):
        pytest.skip(f"{quantized} is not installed")
    model = load_model(tiny_model, backend=quantized, cache_dir=tmp_path)
    assert model.encode_backend == quantized
    difference = np.abs(vectors(model) - vectors(load_model(tiny_model))).max()
    assert backends.AGREEMENT < difference < 0.2  # quantized: close, and further than any fp32 export
    passages = [{"_id": f"p{i}", "title": "", "text": text} for i, text in enumerate(TEXTS[:5])]
    torch_key = corpus_key(tiny_model, passages, None, encode_backend="torch")
    assert corpus_key(tiny_model, passages, None, encode_backend="onnx") == torch_key == corpus_key(tiny_model, passages, None, encode_backend="auto")
    assert corpus_key(tiny_model, passages, None, encode_backend=quantized) != torch_key
    stored = corpus_embeddings(tiny_model, passages, tmp_path, encode_backend=quantized)
    exact = corpus_embeddings(tiny_model, passages, tmp_path, encode_backend="torch")
    assert stored.key != exact.key and np.abs(np.asarray(stored.vectors) - np.asarray(exact.vectors)).max() > 0


def test_a_backend_that_is_not_installed_is_a_clear_error_before_any_work(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "installed", lambda name: False)
    with pytest.raises(EmbedforgeError) as error:
        load_model(tiny_model, backend="openvino", cache_dir=tmp_path)
    assert "not installed" in error.value.message and "--encode-backend torch" in error.value.message
    assert load_model(tiny_model, backend="auto", cache_dir=tmp_path).encode_backend == "torch"  # auto needs nothing extra
    with pytest.raises(EmbedforgeError, match="Unknown encode backend"):
        backends.check_backend("tensorrt")


def test_hub_names_that_share_a_prefix_get_their_own_export_folders(tmp_path):
    first = backends.export_folder(str(tmp_path / "absent"), "hub:sentence-transformers/all-mpnet-base-v1", "onnx", tmp_path)
    second = backends.export_folder(str(tmp_path / "absent"), "hub:sentence-transformers/all-mpnet-base-v2", "onnx", tmp_path)
    assert first != second and first.parent.parent == second.parent.parent == tmp_path / "backends"


def test_a_shipped_export_is_used_only_for_the_weights_it_was_made_from(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    backends.save_with_model(load_model(str(folder)), folder)
    assert backends.export_folder(str(folder), "sha256:x", "onnx", tmp_path / "cache") == folder / "onnx"
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # the model changed after its export
    assert backends.export_folder(str(folder), "sha256:x", "onnx", tmp_path / "cache") == tmp_path / "cache" / "backends" / "x" / "onnx"


def test_a_second_process_that_finishes_later_keeps_the_first_export(tiny_model, tmp_path, monkeypatch):
    model = load_model(tiny_model)
    folder = tmp_path / "export"
    real = backends._export

    def first_process_finishes_meanwhile(model, backend, partial):
        inputs = real(model, backend, partial)
        folder.mkdir()
        (folder / "check.json").write_text(json.dumps({"version": backends.EXPORT_VERSION, "by": "the other process"}))
        return inputs

    monkeypatch.setattr(backends, "_export", first_process_finishes_meanwhile)
    assert backends.ensure_export(model, "onnx", folder)["by"] == "the other process"
    assert not list(tmp_path.glob("export.partial-*"))
    abandoned = tmp_path / "export2.partial-999999999"  # a pid no process has
    abandoned.mkdir()
    monkeypatch.setattr(backends, "_export", real)
    backends.ensure_export(model, "onnx", tmp_path / "export2")
    assert not abandoned.exists() and (tmp_path / "export2" / "check.json").exists()


def test_ctrl_c_during_an_export_is_not_lost_in_the_exporter(tiny_model, tmp_path, monkeypatch):
    import os
    import signal
    import time

    real = backends._export

    def swallowing(model, backend, folder):
        try:  # what an exporter that catches everything its Python callbacks raise does
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        except BaseException:
            pass
        return real(model, backend, folder)

    monkeypatch.setattr(backends, "_export", swallowing)
    # Python's own handler, as in a terminal: a background job of a shell starts with Ctrl-C ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            load_model(tiny_model, backend="onnx", cache_dir=tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not list(tmp_path.glob("backends/*/*"))


def test_ctrl_c_after_openvino_models_were_released_out_of_order_is_still_an_interrupt(tiny_model, tmp_path):
    """Each OpenVINO Core's CPU plugin swaps in its own signal stack and puts back the one it found
    when released: out of order, the main thread was left on an unmapped stack and the next Ctrl-C
    was a segmentation fault (the full suite died in the Ctrl-C test above after the OpenVINO ones)."""
    import subprocess
    import sys
    import textwrap

    load_model(tiny_model, backend="openvino", cache_dir=tmp_path)
    (export,) = tmp_path.glob("backends/*/openvino")
    script = textwrap.dedent(f"""
        import gc, os, signal, time
        from pathlib import Path
        from embedforge import backends
        first = backends.load_runner("openvino", Path({str(export)!r}))
        second = backends.load_runner("openvino", Path({str(export)!r}))
        del first
        gc.collect()
        del second
        gc.collect()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            print("interrupted")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout.strip()) == (0, "interrupted"), done.stderr[-2000:]


def test_a_fine_tuned_model_never_ships_an_export_that_disagrees(tiny_model, tmp_path, monkeypatch):
    import shutil

    from embedforge import train

    real = backends.load_runner
    monkeypatch.setattr(backends, "load_runner", lambda backend, folder: (lambda feeds, run=real(backend, folder): run(feeds) + 0.01))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    model = load_model(str(folder))
    with pytest.raises(EmbedforgeError, match="disagrees with torch"):
        train._ship_onnx_export(model, folder, "onnx")
    assert not (folder / "onnx").exists()
    assert train._ship_onnx_export(model, folder, "auto") is None and not (folder / "onnx").exists()


def test_the_export_is_checked_against_the_saved_model_not_the_trained_objects_autocast_forward(tiny_model, tmp_path):
    import shutil

    import torch

    from embedforge import train

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    model = load_model(str(folder))
    forward = model.forward
    calls = []

    def autocast_forward(*args, **options):  # what accelerate leaves behind after bf16 mixed-precision training
        calls.append(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **options)

    model.forward = autocast_forward
    check = train._ship_onnx_export(model, folder, "onnx")
    # On all-MiniLM-L6-v2 the bf16 vectors differed by 1.5e-03 and a good export was refused.
    assert not calls
    assert check is not None and check["max_abs_diff"] <= backends.AGREEMENT and (folder / "onnx").is_dir()


def test_an_unwritable_cache_leaves_auto_on_torch(tiny_model, tmp_path):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    assert load_model(tiny_model, backend="auto", cache_dir=blocked).encode_backend == "torch"
    with pytest.raises(EmbedforgeError, match="Exporting the model to onnx failed"):
        load_model(tiny_model, backend="onnx", cache_dir=blocked)


def test_an_ignored_ctrl_c_stays_ignored_during_an_export():
    import os
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with backends._interrupt_survives():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_export_keeps_the_callers_logging_switched_off(tiny_model, tmp_path, monkeypatch):
    import logging

    monkeypatch.setattr(backends, "_export", lambda model, backend, folder: [])
    monkeypatch.setattr(backends, "_compare", lambda model, backend, folder, inputs: {"max_abs_diff": 0.0, "speedup": 1.0})
    logging.disable(logging.CRITICAL)
    try:
        backends.ensure_export(load_model(tiny_model), "onnx", tmp_path / "onnx")
        assert logging.root.manager.disable == logging.CRITICAL
    finally:
        logging.disable(logging.NOTSET)


def test_the_config_offers_exactly_the_backends_there_are():
    import typing

    from embedforge.config import RunConfig

    # Two lists, so that backends.py stays below the config on the import graph; they must agree.
    assert typing.get_args(RunConfig.model_fields["encode_backend"].annotation) == backends.BACKENDS


@pytest.mark.skipif(not backends.installed("openvino"), reason="openvino is not installed")
def test_openvino_runs_in_fp32_even_where_the_cpu_has_native_bf16(tiny_model, tmp_path, monkeypatch):
    # OpenVINO's CPU default is bf16 where the CPU has it (AVX512-BF16, AMX): all-MiniLM-L6-v2's
    # vectors then differ from torch's by ~1e-3, and the fp32 backend was refused on such CPUs.
    import openvino

    asked = []
    compile_model = openvino.Core.compile_model

    def recording(core, model, device, config=None):
        asked.append(dict(config or {}))
        return compile_model(core, model, device, config or {})

    monkeypatch.setattr(openvino.Core, "compile_model", recording)
    model = load_model(tiny_model, backend="openvino", cache_dir=tmp_path)
    assert model.encode_backend == "openvino" and asked
    assert all(config.get("INFERENCE_PRECISION_HINT") == "f32" for config in asked)
