"""Config file and flags; `init`; user-facing errors print one paragraph and exit 1."""

import os
import subprocess
import sys

import pytest

from embedforge.config import FIELD_SECTION, RunConfig, load_config
from embedforge.errors import EmbedforgeError


def cli(*args, cwd=None, env=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "embedforge", *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=300)


def test_flags_override_file_and_paths_are_relative_to_it(tmp_path):
    (tmp_path / "embedforge.toml").write_text('run = "runs/x"\n[generate]\nmin_pairs = 50\nconcurrency = 2\n[train]\nepochs = 3\n')
    config = load_config(tmp_path / "embedforge.toml", {"min_pairs": 70, "epochs": None})
    assert config.generate.min_pairs == 70 and config.generate.concurrency == 2 and config.train.epochs == 3
    assert config.run == (tmp_path / "runs" / "x").resolve()


def test_merge_alpha_is_auto_or_a_number_from_a_flag_or_the_file(tmp_path):
    (tmp_path / "embedforge.toml").write_text("[train]\nmerge_alpha = 0.25\n")
    assert load_config(tmp_path / "embedforge.toml").train.merge_alpha == 0.25
    assert load_config(tmp_path / "embedforge.toml", {"merge_alpha": "auto"}).train.merge_alpha == "auto"
    assert load_config(None, {"merge_alpha": "0.5"}).train.merge_alpha == 0.5 and RunConfig().train.merge_alpha == 1.0


def test_prompt_is_one_file_or_several_with_shares(tmp_path):
    (tmp_path / "embedforge.toml").write_text('[generate]\nprompt = "a.toml"\n')
    assert load_config(tmp_path / "embedforge.toml").generate.prompt == ((tmp_path / "a.toml").resolve(),)  # config files written before
    (tmp_path / "embedforge.toml").write_text('[generate]\nprompt = ["a.toml", "b.toml"]\nprompt_shares = [3, 1]\n')
    generate = load_config(tmp_path / "embedforge.toml").generate
    assert generate.prompt == ((tmp_path / "a.toml").resolve(), (tmp_path / "b.toml").resolve()) and generate.shares == (0.75, 0.25)
    flags = load_config(None, {"prompt": [tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "c.toml"]}).generate
    assert flags.shares == pytest.approx((1 / 3,) * 3) and load_config(None, {"prompt": [tmp_path / "a.toml"]}).generate.shares == (1.0,)
    for shares, message in (("0.5", "gives 1 shares for 2 prompt files"), ("1,0", "must be above 0")):
        with pytest.raises(EmbedforgeError, match=message):
            load_config(None, {"prompt": [tmp_path / "a.toml", tmp_path / "b.toml"], "prompt_shares": shares})
    with pytest.raises(EmbedforgeError, match="given twice"):
        load_config(None, {"prompt": [tmp_path / "a.toml", tmp_path / "a.toml"]})
    (tmp_path / "embedforge.toml").write_text('[generate]\nprompt = "a.toml"\nheld_out_prompt = "b.toml"\n')
    generate = load_config(tmp_path / "embedforge.toml").generate
    assert generate.prompt_files == ((tmp_path / "a.toml").resolve(), (tmp_path / "b.toml").resolve()) and generate.shares == (1.0,)
    with pytest.raises(EmbedforgeError, match="also a --prompt"):
        load_config(None, {"prompt": [tmp_path / "a.toml"], "held_out_prompt": tmp_path / "a.toml"})


def test_unknown_keys_are_rejected(tmp_path):
    (tmp_path / "embedforge.toml").write_text("[generate]\nmin_pair = 5\n")
    with pytest.raises(EmbedforgeError, match="generate.min_pair: Extra inputs are not permitted"):
        load_config(tmp_path / "embedforge.toml")


def test_every_config_field_is_a_flag():
    help_text = cli("run", "--help", env={"COLUMNS": "300"}).stdout
    for name in FIELD_SECTION:
        assert "--" + name.replace("_", "-") in help_text, name


def test_init_writes_a_loadable_commented_config(tmp_path):
    result = cli("init", str(tmp_path / "project"))
    assert result.returncode == 0, result.stderr
    assert "regression_set" in result.stdout and "eval_set" in result.stdout
    config = load_config(tmp_path / "project" / "embedforge.toml")
    assert config.model_dump(exclude={"run", "cache"}) == RunConfig().model_dump(exclude={"run", "cache"}) | {
        "generate": {**RunConfig().generate.model_dump(), "prompt": ((tmp_path / "project" / "prompts" / "question.toml").resolve(),)}
    }
    assert (tmp_path / "project" / "prompts" / "claim.toml").exists()
    assert cli("init", str(tmp_path / "project")).returncode == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--corpus", "/nonexistent/corpus"], "Corpus path does not exist"),
        (["run", "--min-pairs", "0"], "Invalid configuration: generate.min_pairs"),
        (["run", "--force", "bogus"], "Unknown stage 'bogus'"),
        (["evaluate", "--model", "x"], "needs --eval-set DIR and --out DIR"),
        (["run", "--merge-alpha", "2"], "Invalid configuration: train.merge_alpha"),
    ],
)
def test_user_errors_exit_1_without_traceback(tmp_path, args, message):
    result = cli(*args, "--run", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_remote_endpoint_without_key_fails_before_writing_outputs(tmp_path, corpus_file, tiny_model):
    env = {key: value for key, value in os.environ.items() if key != "OPENAI_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "embedforge", "run", "--corpus", str(corpus_file), "--run", str(tmp_path / "run"), "--base-model", tiny_model,
         "--base-url", "https://api.example.invalid/v1", "--llm-model", "gpt-x", "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 1 and "OPENAI_API_KEY" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "generate" / "queries.jsonl").exists()


def test_unloadable_model(tmp_path, corpus_file):
    beir = corpus_file.parent
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "apple"}\n')
    (beir / "qrels").mkdir()
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tdoc000\t1\n")
    result = cli("evaluate", "--eval-set", str(beir), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c"))
    assert result.returncode == 1 and "Cannot load the embedding model" in result.stderr
