"""The run directory: chain the stages, skip what is up to date, record everything in a manifest.

Reads:  the run configuration, and each stage's input files.
Writes: runs/<name>/{config.toml, corpus.jsonl, manifest.json} and, through the stages,
        generate/, mine/, train/, evaluate/.
Keeps:  per stage, a manifest entry with its fingerprint (sha256 over stage, stage version,
        config minus runtime-only fields, and the sha256 of every input file), input and
        output hashes, stats, versions and timings. A stage runs only when its fingerprint
        changed, or its outputs are missing or modified; its entry is written last, after its
        outputs are in place.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from embedforge import evaluate as evaluate_stage
from embedforge import generate as generate_stage
from embedforge import mine as mine_stage
from embedforge import train as train_stage
from embedforge.backends import vectors_key
from embedforge.embeddings.cluster import connect, engine_of, make_encoder
from embedforge.config import RunConfig, encoder_prompts, fingerprint_fields, toml_literal
from embedforge.corpus import describe as describe_corpus
from embedforge.corpus import check_source, cut_records, read_corpus, read_qrels, split_of
from embedforge.errors import EmbedforgeError
from embedforge.llm import strip_credentials
from embedforge.files import (FolderLock, check_writable_folder, iter_jsonl, process_rank, read_json, sha256_file, sha256_json, sha256_path, write_json, write_jsonl,
                              write_text)

# Every file of the run directory that a stage reads or writes, named once.
CORPUS = "corpus.jsonl"
QUERIES, REJECTS = "generate/queries.jsonl", "generate/rejects.jsonl"
EVAL_DIR = "generate/eval"
EVAL_QUERIES, DEV_QRELS, TEST_QRELS = f"{EVAL_DIR}/queries.jsonl", f"{EVAL_DIR}/qrels/dev.tsv", f"{EVAL_DIR}/qrels/test.tsv"
TRAIN_ROWS, MINE_STATS = "mine/train.jsonl", "mine/stats.json"
MODEL, CHECKPOINTS = "train/model", "train/checkpoints"
RESULTS, REPORT, CHART = "evaluate/results.json", "evaluate/report.md", "evaluate/report.png"
TRACKED_PACKAGES = ("embedforge", "torch", "sentence-transformers", "transformers", "openai", "faiss-cpu", "datasets")
logger = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in TRACKED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def config_toml(config: RunConfig) -> str:
    """The resolved configuration as TOML (None values are left out: TOML has no null)."""
    data = config.model_dump(mode="json")
    data["generate"]["base_url"] = [strip_credentials(url) for url in data["generate"].get("base_url") or ()]
    lines = ["# Resolved configuration of this run (written by embedforge; API keys are never stored)."]
    lines += [f"{key} = {toml_literal(value)}" for key, value in data.items() if not isinstance(value, dict) and value is not None]
    for section, values in data.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"]
            lines += [f"{key} = {toml_literal(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


@dataclass
class StagePlan:
    name: str
    inputs: dict[str, str]  # path (relative to the run when inside it) -> sha256
    config: dict
    outputs: list[str]
    fingerprint: str = ""
    reason: str = ""  # why it runs; empty when up to date


@dataclass
class Run:
    """One run directory and the resources its stages share (each created at most once)."""

    config: RunConfig
    llm_factory: Callable | None = None
    echo: Callable[[str], None] = print
    manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        self.dir = Path(self.config.run)
        self.cache = Path(self.config.cache)
        self.manifest_path = self.dir / "manifest.json"
        self.manifest = read_json(self.manifest_path) if self.manifest_path.exists() else {"stages": {}}

    # --- shared resources ------------------------------------------------------------------

    @functools.cached_property
    def passages(self) -> list[dict]:
        return list(iter_jsonl(self.path(CORPUS)))

    @functools.cached_property
    def base_identity(self) -> str:
        from embedforge.embeddings import model_identity

        return model_identity(self.config.base_model)

    @functools.cached_property
    def base_model(self):
        from embedforge.embeddings import load_model

        return load_model(self.config.base_model, prompts=encoder_prompts(self.config), backend=self.config.encode_backend, cache_dir=self.cache)

    @functools.cached_property
    def cross_encoder(self):
        return load_cross_encoder(self.config.mine.cross_encoder)

    @functools.cached_property
    def base_embeddings(self):
        from embedforge.embeddings import corpus_embeddings

        from embedforge.embeddings import IndexSpec

        spec = IndexSpec(self.config.index, self.config.exact_max, self.config.nprobe)
        return corpus_embeddings(self.config.base_model, self.passages, self.cache, self.config.encode_batch_size, model=self.base_model, index_spec=spec,
                                 prompts=encoder_prompts(self.config), encode_backend=self.config.encode_backend,
                                 encoder=make_encoder(self.base_model, self.config.base_model, self.config.encode_batch_size, engine_of(self.config), cache_dir=self.cache))

    def encode_queries(self, texts: list[str]):
        from embedforge.embeddings import encode_texts

        return encode_texts(self.base_model, texts, self.config.encode_batch_size, kind="query")

    # --- paths and hashes ------------------------------------------------------------------

    def relative(self, path: Path) -> str:
        path = Path(path)
        try:
            return path.resolve().relative_to(self.dir.resolve()).as_posix()
        except ValueError:
            return str(path.resolve())

    def absolute(self, name: str) -> Path:
        return Path(name) if Path(name).is_absolute() else self.dir / name

    def hash_inputs(self, paths: list[Path]) -> dict[str, str]:
        """Files of the run directory, keyed by their place in it."""
        return self.hash_files({self.relative(path): path for path in paths})

    @staticmethod
    def hash_files(named: dict[str, Path]) -> dict[str, str]:
        hashes = {}
        for name, path in named.items():
            if not Path(path).exists():
                raise EmbedforgeError("A stage input is missing", where=str(path), fix="run the earlier stages first (`embedforge run`), or pass --from an earlier stage")
            hashes[name] = sha256_path(Path(path))
        return hashes

    # --- corpus ----------------------------------------------------------------------------

    def check_inputs(self, dry_run: bool = False) -> None:
        """What a user can get wrong in the inputs, checked before the first LLM call or encode,
        each error naming the flag to fix."""
        from embedforge.prompts import load_prompt

        generate = self.config.generate
        check_source(self.config.corpus.corpus)
        for path in generate.prompt_files:
            load_prompt(path)
        for path, flag in ((generate.examples, "--examples"), (generate.queries, "--queries")):
            if path and not Path(path).exists():
                raise EmbedforgeError(f"The {flag} file does not exist", where=str(path), fix=f"check {flag}: the path names no file")
        for folder in (*self.config.evaluate.eval_set, *self.config.evaluate.regression_set):
            evaluate_stage.check_eval_set(folder)
        if engine_of(self.config) is not None and process_rank() == 0 and not dry_run:
            connect(engine_of(self.config))  # an unreachable cluster is an error now, not after the LLM calls

    def check_models(self, selected: list[str]) -> None:
        """Load the models the selected stages need (kept for them) before anything is paid for."""
        if process_rank() != 0:
            return
        self.base_model
        if "mine" in selected and self.config.mine.cross_encoder:
            self.cross_encoder

    def prepare(self, dry_run: bool = False) -> bool:
        """Normalize the corpus into corpus.jsonl; True when that changes it. A dry run writes nothing."""
        if process_rank() != 0:
            return False  # rank 0 normalizes the corpus; the others read what it wrote
        # Cut by the base model's own tokens, to what its encoder reads (title and prompt included).
        passages, report = read_corpus(self.config.corpus, self.base_model.tokenizer, self.base_model.max_seq_length, encoder_prompts(self.config).get("document", ""))
        corpus_path = self.path(CORPUS)
        changed = not corpus_path.exists() or sha256_json(list(iter_jsonl(corpus_path))) != sha256_json(passages)
        self.__dict__["passages"] = passages
        if dry_run:
            return changed
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text(self.dir / "config.toml", config_toml(self.config))
        if changed:
            write_jsonl(corpus_path, passages)
        self.manifest["corpus"] = report
        write_json(self.manifest_path, self.manifest)
        for line in describe_corpus(report):
            self.echo(f"corpus: {line}")
        self.echo(f"corpus: {len(passages)} passages -> {corpus_path}")
        return changed

    # --- plans -----------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.dir / name

    def plan(self, stage: str) -> StagePlan:
        """The stage's fingerprint, from its row of the stage table: inputs by content, settings minus runtime-only fields."""
        config, row = self.config, STAGE_TABLE[stage]
        shared = {"seed": config.seed, "base_model": self.base_identity, "index": [config.index, config.exact_max, config.nprobe]}
        if encoder_prompts(config):  # absent when unset, so runs made before prompts existed stay up to date
            shared["encoder_prompts"] = encoder_prompts(config)
        if vectors_key(config.encode_backend):  # only a backend whose vectors differ from torch's changes results
            shared["encode_backend"] = vectors_key(config.encode_backend)
        if stage == "evaluate" and config.corpus.chunk_tokens:  # labelled eval sets are then cut too (see _cut_as_asked)
            shared["eval_set_chunking"] = [config.corpus.chunk_tokens, config.corpus.chunk_overlap_tokens]
        section = getattr(config, row.section)
        # Files are inputs: their contents count, not where they are.
        settings = {key: value for key, value in fingerprint_fields(section).items() if key not in row.file_fields}
        if "base_url" in settings:
            # The first endpoint names the model's answers; replicas after it are runtime only. Never a secret in the manifest.
            settings["base_url"] = strip_credentials(settings["base_url"][0]) if settings["base_url"] else None
        plan = StagePlan(stage, row.inputs(self), {**settings, **shared}, list(row.outputs))
        plan.fingerprint = sha256_json({"stage": stage, "version": row.version, "config": plan.config, "inputs": plan.inputs})
        return plan

    def why_run(self, plan: StagePlan, forced: bool) -> str:
        """Empty when the stage is up to date, else the reason it must run."""
        if forced:
            return "forced"
        entry = self.manifest["stages"].get(plan.name)
        if entry is None:
            return "never run"
        if entry.get("status") == "failed":
            return "failed last time"
        if entry.get("fingerprint") != plan.fingerprint:
            changed = [f"input {name}" for name in sorted(set(plan.inputs) | set(entry.get("inputs", {}))) if plan.inputs.get(name) != entry.get("inputs", {}).get(name)]
            changed += [f"setting {key}" for key in sorted(set(plan.config) | set(entry.get("config", {}))) if plan.config.get(key) != entry.get("config", {}).get(key)]
            return "changed: " + (", ".join(changed) or "stage version")
        for name, digest in entry.get("outputs", {}).items():
            path = self.absolute(name)
            if not path.exists():
                return f"output missing: {name}"
            if sha256_path(path) != digest:
                return f"output modified: {name}"
        return ""

    # --- execution -------------------------------------------------------------------------

    def execute(self, plan: StagePlan) -> dict:
        return STAGE_TABLE[plan.name].run(self, plan)

    def _run_generate(self, plan: StagePlan) -> dict:
        from embedforge.prompts import load_prompt

        config = self.config.generate
        prompts = [load_prompt(path) for path in config.prompt_files]  # validated before any model is loaded
        if self.llm_factory is None:
            raise EmbedforgeError("No LLM is configured", where="generate", fix="pass --base-url, or install the local model with `make setup`")
        llm = None if config.llm_model == "none" else self.llm_factory(config, self.config.seed)

        def round_trip(queries: list[str], passage_ids: list[str]) -> list[int]:
            scores, indices = self.base_embeddings.search(self.encode_queries(queries), config.round_trip_k)
            ids = self.base_embeddings.ids
            return [next((rank for rank, i in enumerate(row) if i >= 0 and ids[i] == passage), config.round_trip_k) for row, passage in zip(indices, passage_ids)]

        return generate_stage.generate(self.passages, prompts, self.path(plan.name), config, llm, self.config.seed, round_trip)

    def _run_mine(self, plan: StagePlan) -> dict:
        queries = [q for q in iter_jsonl(self.path(QUERIES)) if q["split"] == "train"]
        generate_config = self.config.generate
        test_ids = {p["_id"] for p in self.passages if split_of(p["_id"], generate_config.dev_fraction, generate_config.test_fraction) == "test"}
        # Real queries often repeat with several positives: each text is encoded once.
        trained = [q["text"] for q in queries if not q.get("known_only")]
        texts = sorted(set(trained))
        row_of = {text: row for row, text in enumerate(texts)}
        vectors = self.encode_queries(texts)[[row_of[text] for text in trained]]
        cross_encoder = self.cross_encoder if self.config.mine.cross_encoder else None
        return mine_stage.mine(self.passages, queries, self.base_embeddings, vectors, self.path(plan.name), self.config.mine, test_ids, self.config.seed, cross_encoder)

    def _held_out(self, qrels_file: str) -> tuple[dict[str, str], dict[str, set[str]]]:
        qrels = read_qrels(self.path(qrels_file))
        queries = {row["_id"]: row["text"] for row in iter_jsonl(self.path(EVAL_QUERIES)) if row["_id"] in qrels}
        return queries, {query: set(docs) for query, docs in qrels.items() if query in queries}

    def _run_train(self, plan: StagePlan) -> dict:
        checkpoints = self.path(CHECKPOINTS)
        marker = checkpoints / "fingerprint.txt"
        # Checkpoints of other settings or data must not be resumed; those of this fingerprint may.
        # Resume only an interrupted training of exactly these inputs and settings; a finished one
        # that reruns (forced, or its model deleted) starts afresh.
        previous = self.manifest["stages"].get("train", {})
        interrupted = (plan.reason != "forced" and previous.get("status") != "done" and marker.exists()
                       and marker.read_text().strip() == plan.fingerprint)
        if process_rank() == 0:
            if checkpoints.exists() and not interrupted:
                shutil.rmtree(checkpoints)
            checkpoints.mkdir(parents=True, exist_ok=True)
            marker.write_text(plan.fingerprint)
        dev_queries, dev_qrels = self._held_out(DEV_QRELS)
        notes = {"corpus sha256": plan.inputs.get(CORPUS), "prompt sha256": ", ".join(sha256_file(path) for path in self.config.generate.prompt), "LLM": llm_note(self.config.generate)}
        rows = list(iter_jsonl(self.path(TRAIN_ROWS)))
        return train_stage.train(rows, self.passages, dev_queries, dev_qrels, self.config.base_model, self.path(plan.name), self.config.train, self.config.seed, self.config.encode_batch_size, notes,
                                 prompts=encoder_prompts(self.config), encode_backend=self.config.encode_backend)

    def _run_evaluate(self, plan: StagePlan) -> dict:
        eval_sets, notes = [], []
        # test_fraction 0 (allowed only with a human-labelled --eval-set) gives every passage to
        # training and dev: there is no synthetic test split to score.
        if self.config.generate.test_fraction > 0:
            eval_sets.append(evaluate_stage.load_beir(
                self.path(EVAL_DIR), "test", passages=self.passages, name=evaluate_stage.SYNTHETIC_TEST,
                source="LLM-written queries for held-out test passages of this corpus",
            ))
            notes.append("synthetic-test uses LLM-written queries, which flatter a model trained on LLM-written queries; prefer a human-labelled --eval-set.")
        eval_sets += [self._cut_as_asked(evaluate_stage.load_beir(folder)) for folder in self.config.evaluate.eval_set]
        eval_sets += [self._cut_as_asked(replace(evaluate_stage.load_beir(folder, name=f"regression:{Path(folder).name}"), role="regression"))
                      for folder in self.config.evaluate.regression_set]
        models = [("base", self.config.base_model), ("fine-tuned", str(self.path(MODEL).resolve()))]
        train_entry = self.manifest["stages"].get("train", {})
        guard = dev_guard_note(train_entry.get("stats", {}).get("improved_on_dev"), labelled_sets=len(self.config.evaluate.eval_set))
        if guard:
            notes.append(guard)
        merge = merge_note(train_entry.get("stats", {}))
        if merge:
            notes.append(merge)
        train_rows = list(iter_jsonl(self.path(TRAIN_ROWS)))  # for the contamination check
        return evaluate_stage.evaluate(
            eval_sets, models, self.path(plan.name), self.cache, self.config.evaluate.bootstrap_resamples, self.config.seed,
            self.config.encode_batch_size, notes, train_rows=train_rows, prompts={self.config.base_model: encoder_prompts(self.config)},
            encode_backend=self.config.encode_backend, fine_tuned="fine-tuned", dev_improved=train_entry.get("stats", {}).get("improved_on_dev"),
            engine=engine_of(self.config),
        )

    def _cut_as_asked(self, eval_set):
        return cut_as_asked(eval_set, self.config, lambda: self.base_model)

    def record(self, plan: StagePlan, entry: dict) -> None:
        if process_rank() != 0:
            return
        self.manifest["stages"][plan.name] = entry
        write_json(self.manifest_path, self.manifest)


@dataclass(frozen=True)
class Stage:
    """One row of the stage table, in the spirit of a weasel project.yml command: what the stage
    reads (its inputs, hashed by content), what it writes, the config section it is configured by
    (minus runtime-only fields, and minus the file-valued fields, which count by content among the
    inputs), and the function that runs it. Adding a stage means a row and a function."""

    name: str
    version: int
    section: str
    inputs: Callable[[Run], dict[str, str]]
    outputs: tuple[str, ...]
    run: Callable[[Run, StagePlan], dict]
    file_fields: tuple[str, ...] = ()


# The user's files are keyed by the setting that names them, not by where they are: their contents
# count, and a checkout in another place (a CI job's fresh workspace) changes nothing.

def _generate_inputs(run: Run) -> dict[str, str]:
    config = run.config.generate
    files = {f"prompt[{index}]": path for index, path in enumerate(config.prompt)}
    files.update({setting: path for setting, path in (("held_out_prompt", config.held_out_prompt), ("examples", config.examples), ("queries", config.queries)) if path})
    return {**run.hash_inputs([run.path(CORPUS)]), **run.hash_files(files)}


def _evaluate_inputs(run: Run) -> dict[str, str]:
    hashes = run.hash_inputs([run.path(name) for name in (CORPUS, EVAL_QUERIES, TEST_QRELS, MODEL, TRAIN_ROWS)])
    evaluate = run.config.evaluate
    for setting, folders in (("eval_set", evaluate.eval_set), ("regression_set", evaluate.regression_set)):
        for index, folder in enumerate(folders):
            # The folder's name stays in the key: the report names the set by it.
            hashes.update({f"{setting}[{index}] {Path(folder).name}/{name}": digest for name, digest in evaluate_stage.eval_set_files(folder).items()})
    return hashes


STAGE_TABLE = {stage.name: stage for stage in (
    Stage("generate", generate_stage.STAGE_VERSION, "generate", _generate_inputs, (QUERIES, REJECTS, EVAL_QUERIES, DEV_QRELS, TEST_QRELS),
          Run._run_generate, file_fields=("prompt", "examples", "queries")),
    Stage("mine", mine_stage.STAGE_VERSION, "mine", lambda run: run.hash_inputs([run.path(CORPUS), run.path(QUERIES)]), (TRAIN_ROWS, MINE_STATS),
          Run._run_mine),
    Stage("train", train_stage.STAGE_VERSION, "train", lambda run: run.hash_inputs([run.path(name) for name in (CORPUS, TRAIN_ROWS, EVAL_QUERIES, DEV_QRELS)]),
          (MODEL,), Run._run_train),
    Stage("evaluate", evaluate_stage.STAGE_VERSION, "evaluate", _evaluate_inputs, (RESULTS, REPORT, CHART), Run._run_evaluate, file_fields=("eval_set", "regression_set")),
)}
STAGES = tuple(STAGE_TABLE)
STAGE_VERSIONS = {name: stage.version for name, stage in STAGE_TABLE.items()}


def llm_note(generate) -> str:
    """Where the training queries came from, for the model card: model cards get published, so never a credential."""
    if generate.llm_model == "none":
        return f"none: queries imported from {Path(generate.queries).name}" if generate.queries else "none"
    if generate.base_url:
        replicas = f" (and {len(generate.base_url) - 1} replicas)" if len(generate.base_url) > 1 else ""
        return f"{generate.llm_model} at {strip_credentials(generate.base_url[0])}{replicas}"
    return "local SmolLM2-135M-Instruct"


def load_cross_encoder(name_or_path: str):
    from sentence_transformers.cross_encoder import CrossEncoder

    from embedforge.embeddings import resolve_model

    try:
        return CrossEncoder(resolve_model(name_or_path))
    except Exception as error:  # any loader failure means the same thing to the user
        raise EmbedforgeError(f"Cannot load the cross-encoder {name_or_path!r} ({type(error).__name__})", where=name_or_path, fix="pass --cross-encoder with a local folder or an available model") from error


def select_stages(from_stage: str | None, to_stage: str | None) -> list[str]:
    start = STAGES.index(from_stage) if from_stage else 0
    end = STAGES.index(to_stage) if to_stage else len(STAGES) - 1
    return list(STAGES[start : end + 1])


def run(config: RunConfig, llm_factory: Callable | None = None, force: tuple[str, ...] = (), from_stage: str | None = None, to_stage: str | None = None,
        dry_run: bool = False, echo: Callable[[str], None] = print) -> Run:
    """Run the selected stages in order, skipping those that are up to date."""
    pipeline = Run(config, llm_factory=llm_factory, echo=echo)
    selected = select_stages(from_stage, to_stage)
    lock = contextlib.nullcontext()  # a dry run writes nothing; torchrun's other ranks work under rank 0's lock
    if not dry_run and process_rank() == 0:
        check_writable_folder(config.run, "--run")
        check_writable_folder(config.cache, "--cache")
        lock = FolderLock(config.run)
    with lock:
        pipeline.check_inputs(dry_run)
        corpus_changed = pipeline.prepare(dry_run)
        _run_stages(pipeline, selected, set(force) | ({from_stage} if from_stage else set()), dry_run, corpus_changed, echo)
    return pipeline


def _run_stages(pipeline: Run, selected: list[str], forced: set[str], dry_run: bool, corpus_changed: bool, echo: Callable[[str], None]) -> None:
    models_checked = False
    for stage in selected:
        if dry_run and corpus_changed:
            reason = "changed: input corpus.jsonl"  # a dry run does not write the new corpus.jsonl to compare against
        else:
            plan = pipeline.plan(stage)
            reason = pipeline.why_run(plan, stage in forced)
        if not reason:
            echo(f"{stage}: Skipping: nothing changed")
            continue
        if dry_run:
            echo(f"{stage}: would run ({reason})")
            # Later stages depend on this one's outputs, which a dry run does not produce.
            for later in selected[selected.index(stage) + 1 :]:
                echo(f"{later}: would run (after {stage})")
            break
        if process_rank() != 0 and stage != "train":
            raise EmbedforgeError(
                f"Stage {stage} is not up to date, and only train runs under torchrun", where=str(pipeline.dir),
                fix=f"run `embedforge run --to {STAGES[STAGES.index('train') - 1]}` first, then torchrun ... -m embedforge train",
            )
        if not models_checked:
            pipeline.check_models(selected[selected.index(stage) :])
            models_checked = True
        plan.reason = reason
        echo(f"{stage}: running ({reason})")
        started = time.time()
        try:
            stats = pipeline.execute(plan)
        except generate_stage.BatchExported:
            raise  # not a failure: the stage waits for the batch results
        except BaseException as error:
            pipeline.record(plan, {"status": "failed", "error": f"{type(error).__name__}: {error}"[:500], "fingerprint": plan.fingerprint,
                                   "inputs": plan.inputs, "config": plan.config, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            raise
        outputs = {name: sha256_path(pipeline.absolute(name)) for name in plan.outputs}
        seconds = round(time.time() - started, 2)
        pipeline.record(plan, {
            "status": "done", "fingerprint": plan.fingerprint, "inputs": plan.inputs, "config": plan.config, "outputs": outputs,
            "stats": stats, "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(), "device": _device(),
        })
        echo(f"{stage}: done in {seconds:.1f}s: {_summary(stats)}")
        for name, counts in stats.get("by_prompt", {}).items():
            echo(f"{stage}: {name}: {_prompt_line(counts)}")


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def dev_guard_note(improved_on_dev: bool | None, labelled_sets: int) -> str | None:
    """The report's word on the train stage's guard. The dev split holds queries written the same
    way as the training ones; with a human-labelled eval set beside it, that set is the better judge
    (on LegalSummarization, every run's LLM-written dev score fell while the human test score rose)."""
    if improved_on_dev is not False:
        return None
    if not labelled_sets:
        return "The fine-tuned model was NOT better than the base model on the dev split: keep the base model."
    return (
        "The fine-tuned model was NOT better than the base model on the dev split (queries written like the training ones). "
        "The human-labelled eval set decides: keep the base model unless its verdict below is 'better'."
    )


def cut_as_asked(eval_set, config: RunConfig, model: Callable):
    """With --chunk-tokens, a labelled eval set's documents are cut as the corpus is, by the
    tokens of `model()` (its qrels name documents: each scores what its best passage scores);
    without, they stay whole, as published baselines score them."""
    if not config.corpus.chunk_tokens:
        return eval_set
    encoder = model()
    return evaluate_stage.cut_documents(eval_set, lambda passages: cut_records(
        passages, config.corpus, encoder.tokenizer, encoder.max_seq_length, encoder_prompts(config).get("document", ""), {}))


def merge_note(train_stats: dict) -> str | None:
    """The report's word on --merge-alpha: which model "fine-tuned" is, and the dev sweep that chose it."""
    alpha = train_stats.get("merge_alpha")
    if alpha is None:
        return None
    sweep = train_stats.get("merge_dev_sweep")
    chosen = f" (chosen on dev NDCG@10: {', '.join(f'alpha {key} {value:.4f}' for key, value in sweep.items())})" if sweep else ""
    return (f"fine-tuned here is {alpha:g} x the fine-tuned model + {1 - alpha:g} x the base model, parameter by parameter{chosen}; "
            f"the unmerged fine-tuned model is in train/model-unmerged.")


def _prompt_line(counts: dict) -> str:
    """What one of several prompts added: its answers, and the share of them that became queries."""
    answers, train = counts.get("answers", 0), counts.get("accepted_train", 0)
    held_out = counts.get("accepted_dev", 0) + counts.get("accepted_test", 0)
    return f"{answers} answers, {train} training pairs and {held_out} held-out queries ({(train + held_out) / max(answers, 1):.2f} kept an answer)"


def _summary(stats: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in stats.items() if not isinstance(value, (dict, list)))[:300]


def status(config: RunConfig) -> dict[str, str]:
    """Per stage: up to date / stale (why) / never run / failed last time, without running anything."""
    pipeline = Run(config, echo=lambda _: None)
    states = {}
    blocked = None
    for stage in STAGES:
        entry = pipeline.manifest["stages"].get(stage)
        if entry is None:
            states[stage] = "never run"
            continue
        if blocked:
            states[stage] = f"stale (after {blocked})"
            continue
        try:
            reason = pipeline.why_run(pipeline.plan(stage), forced=False)
        except EmbedforgeError as error:
            reason = f"input missing ({error.where})"
        states[stage] = "up to date" if not reason else ("failed last time" if reason == "failed last time" else f"stale ({reason})")
        if reason:
            blocked = stage
    return states
