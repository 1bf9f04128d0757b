"""End to end: `embedforge run` on a 40-passage corpus against the fake OpenAI server."""

import json
import os
import subprocess
import sys

from conftest import passage_responder


def run_cli(args, env_extra=None, cwd=None):
    env = {**os.environ, "EMBEDFORGE_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "embedforge", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_run_end_to_end(tmp_path, corpus_file, tiny_model, fake_openai):
    fake_openai.responder = passage_responder
    run_dir = tmp_path / "runs" / "e2e"
    args = [
        "run", "--corpus", str(corpus_file), "--run", str(run_dir), "--cache", str(tmp_path / "cache"),
        "--base-url", fake_openai.base_url, "--llm-model", "fake-model", "--base-model", tiny_model,
        "--min-pairs", "20", "--round-trip-k", "40", "--dev-fraction", "0.2", "--test-fraction", "0.2",
        "--epochs", "1", "--min-steps", "0", "--batch-size", "4", "--bootstrap-resamples", "200", "--num-negatives", "2",
    ]
    result = run_cli(args, env_extra={"OPENAI_API_KEY": "sk-secret-test-key"})
    assert result.returncode == 0, result.stderr[-3000:]
    for name in [
        "manifest.json", "config.toml", "corpus.jsonl", "generate/requests.jsonl", "generate/queries.jsonl", "generate/rejects.jsonl",
        "generate/prompt.toml", "generate/eval/queries.jsonl", "generate/eval/qrels/dev.tsv", "generate/eval/qrels/test.tsv",
        "mine/train.jsonl", "mine/stats.json", "train/model/modules.json", "evaluate/results.json", "evaluate/report.md", "evaluate/report.png",
    ]:
        assert (run_dir / name).exists(), name
    queries = [json.loads(line) for line in (run_dir / "generate/queries.jsonl").read_text().splitlines()]
    assert {"_id", "text", "passage_id", "split", "prompt_sha", "request_sha"} <= set(queries[0])
    test_passages = {q["passage_id"] for q in queries if q["split"] == "test"}
    rows = [json.loads(line) for line in (run_dir / "mine/train.jsonl").read_text().splitlines()]
    assert len(rows) >= 20
    assert not {r["positive_id"] for r in rows} & test_passages
    assert not {n for r in rows for n in r["negative_ids"]} & test_passages
    assert all(r["positive_id"] not in r["negative_ids"] for r in rows)
    report = (run_dir / "evaluate/report.md").read_text()
    assert "| base |" in report and "| fine-tuned |" in report
    results = json.loads((run_dir / "evaluate/results.json").read_text())
    assert set(results["eval_sets"]["synthetic-test"]["models"]) == {"base", "fine-tuned", "bm25"}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("generate", "mine", "train", "evaluate")] == ["done"] * 4
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".toml", ".md", ".tsv"}:
            assert "sk-secret-test-key" not in path.read_text(errors="ignore"), path
    calls = len(fake_openai.requests)

    again = run_cli(args, env_extra={"OPENAI_API_KEY": "sk-secret-test-key"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("Skipping: nothing changed") == 4
    assert len(fake_openai.requests) == calls


def test_a_log_file_gets_no_redrawn_bars_from_the_model_libraries(tiny_model, tmp_path):
    # stderr is a pipe here, as in a nightly job's log file: transformers' "Loading weights" and
    # "Writing model shards" bars are frames joined by '\r' there, one unreadable line each.
    script = ("import sys\nfrom embedforge.cli import _setup_logging\n_setup_logging()\n"
              "from transformers import AutoModel\n"
              f"AutoModel.from_pretrained({tiny_model!r}).save_pretrained({str(tmp_path / 'saved')!r})\n")
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_DISABLE_PROGRESS_BARS"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "saved" / "config.json").exists()
    assert "Loading weights" not in result.stderr and "%|" not in result.stderr, result.stderr[-2000:]  # (text mode reads '\r' as a newline)


def test_a_log_file_gets_no_redrawn_bars_from_other_libraries_but_keeps_ours():
    # Off a terminal, a third-party tqdm bar (GGUF conversion, sentence-transformers' "Computing
    # widget examples") wrote '\r'-joined frames into a nightly job's log; ours must still log lines.
    script = ("import logging\nfrom embedforge.cli import quiet_other_progress_bars\nquiet_other_progress_bars()\n"
              "logging.basicConfig(level=logging.INFO)\nfrom tqdm.auto import tqdm\nlist(tqdm(range(3), desc='other library'))\n"
              "from embedforge.progress import progress_bar\nlist(progress_bar(range(3), desc='ours', unit='item'))\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("TQDM_")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "other library" not in result.stderr, result.stderr
    assert "ours: 3/3 item" in result.stderr, result.stderr


def test_the_cli_module_imports_no_tqdm_before_main_quiets_other_bars():
    # tqdm reads TQDM_DISABLE once, when first imported: main() sets it first, so importing the CLI must not import tqdm.
    script = "import sys, embedforge.cli\nprint('tqdm' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_the_cli_modules_import_no_hugging_face_library_before_logging_is_set_up():
    # _setup_logging turns their bars off through variables they read when imported: a module that
    # imported one at its top would bring the bars back into log files without a word.
    script = ("import sys, embedforge.cli, embedforge.generate, embedforge.runs, embedforge.reindex, embedforge.evaluate\n"
              "print(sorted(m for m in ('huggingface_hub', 'transformers', 'datasets', 'sentence_transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
