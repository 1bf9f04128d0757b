"""Command line: parse flags into a config, call the run machinery. Nothing else lives here.

Every config field is a flag of the same name (`min_pairs` is `--min-pairs`), generated from
the pydantic models so the two can never drift apart. Heavy libraries are imported inside the
commands, so `--help` is instant.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from embedforge.config import FIELD_SECTION, RunConfig, encoder_prompts, load_config
from embedforge.errors import EmbedforgeError

# rich_markup_mode=None: plain click help wraps long descriptions instead of cutting them with "…".
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Turn raw domain passages into a fine-tuned embedding model, and proof that it is better.")
_VERBOSE = {"traceback": False}


@app.callback()
def _options(verbose: bool = typer.Option(False, "-v", "--verbose", help="print the traceback of an unexpected error (a bug)")) -> None:
    _VERBOSE["traceback"] = verbose


def _field_info(name: str):
    section = FIELD_SECTION[name]
    model = RunConfig if section is None else RunConfig.model_fields[section].annotation
    return model.model_fields[name]


def _flag_type(annotation: Any) -> Any:
    """Typer-friendly type for a config annotation: Optional[...] everywhere, Literal as str, tuples as lists."""
    origin = typing.get_origin(annotation)
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return Optional[str]
    if origin in (tuple, list):
        # Numbers are given comma-separated (--matryoshka-dims 384,256); paths one flag each.
        return Optional[str] if arguments[0] in (int, float) else Optional[list[arguments[0]]]
    if arguments and origin is not None:
        return _flag_type(arguments[0])
    return Optional[annotation]


def config_parameters() -> list[inspect.Parameter]:
    parameters = []
    for name in FIELD_SECTION:
        info = _field_info(name)
        help_text = (info.description or "") + f" (config: {FIELD_SECTION[name] + '.' if FIELD_SECTION[name] else ''}{name}; default: {info.default})"
        flag = "--" + name.replace("_", "-")
        names = [f"{flag}/--no-{flag[2:]}"] if info.annotation is bool else [flag]
        option = typer.Option(None, *names, help=help_text, show_default=False)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=_flag_type(info.annotation)))
    return parameters


def with_config_flags(function):
    """Add every config field as a flag; the wrapped function gets `overrides` (field -> value or None)."""
    own = list(inspect.signature(function, eval_str=True).parameters.values())
    own = [p for p in own if p.name != "overrides"]

    def wrapper(**kwargs):
        overrides = {name: kwargs.pop(name) for name in FIELD_SECTION}
        return function(overrides=overrides, **kwargs)

    wrapper.__name__ = function.__name__
    wrapper.__doc__ = function.__doc__
    wrapper.__signature__ = inspect.Signature(own + config_parameters())
    return wrapper


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "sentence_transformers", "transformers", "datasets", "filelock", "urllib3", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_other_progress_bars()


def _llm_factory(generate_config, seed: int):
    from embedforge.generate import in_flight
    from embedforge.llm import make_chat_model

    return make_chat_model(generate_config.base_url, generate_config.llm_model, generate_config.api_key_env,
                           generate_config.timeout, generate_config.max_attempts, generate_config.concurrency, seed, generate_config.max_wait_total,
                           local_batch_size=in_flight(generate_config))


def _pipeline(overrides: dict, config_file: Optional[Path], **options) -> None:
    from embedforge import runs

    _setup_logging()
    config = load_config(config_file, overrides)
    pipeline = runs.run(config, llm_factory=_llm_factory, **options)
    report = pipeline.path(runs.REPORT)
    if not options.get("dry_run") and report.exists() and "evaluate" in runs.select_stages(options.get("from_stage"), options.get("to_stage")):
        typer.echo("\n" + report.read_text(encoding="utf-8"))
        typer.echo(f"Fine-tuned model: {pipeline.path(runs.MODEL).resolve()}")


ConfigFile = typer.Option(None, "--config", help="embedforge.toml; flags override it")
Force = typer.Option(None, "--force", help="rerun this stage even if nothing changed (repeatable)")


@app.command()
@with_config_flags
def run(overrides: dict, config_file: Optional[Path] = ConfigFile, force: Optional[list[str]] = Force,
        from_stage: Optional[str] = typer.Option(None, "--from", help="start at this stage (and rerun it)"),
        to_stage: Optional[str] = typer.Option(None, "--to", help="stop after this stage"),
        dry_run: bool = typer.Option(False, "--dry-run", help="say what would run, and why, without running it")) -> None:
    """Run generate -> mine -> train -> evaluate in a run directory, redoing only what changed."""
    from embedforge.runs import STAGES  # the stage table; imported here so --help stays instant

    for stage in [*(force or []), from_stage, to_stage]:
        if stage is not None and stage not in STAGES:
            raise EmbedforgeError(f"Unknown stage {stage!r}", where="--force/--from/--to", fix=f"use one of {', '.join(STAGES)}")
    _pipeline(overrides, config_file, force=tuple(force or ()), from_stage=from_stage, to_stage=to_stage, dry_run=dry_run)


def _stage_command(stage: str, help_text: str) -> None:
    """`embedforge STAGE`: bring that stage up to date (and what comes before it)."""

    def command(overrides: dict, config_file: Optional[Path] = ConfigFile) -> None:
        _pipeline(overrides, config_file, to_stage=stage)

    command.__name__, command.__doc__ = stage, help_text
    app.command(name=stage)(with_config_flags(command))


_stage_command("generate", "Stage 1: write queries for the corpus with an LLM (and anything before it that is out of date).")
_stage_command("mine", "Stage 2: mine hard negatives (runs earlier stages first if they are out of date).")
_stage_command("train", "Stage 3: fine-tune the base model; resumes from the last complete checkpoint after a kill.")


@app.command()
@with_config_flags
def evaluate(overrides: dict, config_file: Optional[Path] = ConfigFile,
             model: Optional[list[str]] = typer.Option(None, "--model", help="standalone mode: a model to evaluate (repeatable; the first is the reference)"),
             out: Optional[Path] = typer.Option(None, "--out", help="standalone mode: where to write results.json, report.md and report.png"),
             decide: bool = typer.Option(False, "--decide", help="recommend off-the-shelf / generate more data first / fine-tune / fine-tune + hybrid retrieval from the run's evaluation (needs --target)"),
             target: Optional[float] = typer.Option(None, "--target", help="with --decide: the NDCG@10 the application needs, e.g. 0.55")) -> None:
    """Stage 4: compare base and fine-tuned models; or, with --model and --out, evaluate models on --eval-set folders."""
    import functools

    from embedforge import evaluate as evaluate_stage
    from embedforge import runs
    from embedforge.embeddings.cluster import connect, engine_of
    from embedforge.embeddings import load_model

    if decide:
        # Reads the run's finished evaluation; it never starts the (possibly long) pipeline itself.
        if target is None or not 0 < target <= 1:
            raise EmbedforgeError("--decide needs --target, the NDCG@10 to reach (between 0 and 1)", where="embedforge evaluate --decide", fix="add e.g. --target 0.55")
        if model:
            raise EmbedforgeError("--decide works on a run directory, not on standalone --model evaluations", where="embedforge evaluate --decide", fix="pass --run DIR instead of --model")
        _setup_logging()
        config = load_config(config_file, overrides)
        decision = evaluate_stage.decide_for_run(config.run, target, batch_size=config.encode_batch_size, seed=config.seed,
                                                  encode_backend=config.encode_backend, cache_dir=config.cache)
        typer.echo(decision.render())
        return
    if not model:
        _pipeline(overrides, config_file, to_stage="evaluate")
        return
    _setup_logging()
    config = load_config(config_file, overrides)
    if out is None or not config.evaluate.eval_set:
        raise EmbedforgeError("Standalone evaluation needs --eval-set DIR and --out DIR", where="embedforge evaluate --model", fix="add --eval-set and --out")
    # With --chunk-tokens, documents are cut by the first model's tokens and rank at their best passage, for every model alike.
    reference = functools.lru_cache(maxsize=1)(lambda: load_model(model[0]))
    eval_sets = [runs.cut_as_asked(evaluate_stage.load_beir(folder), config, reference) for folder in config.evaluate.eval_set]
    labels = [Path(name).name if Path(name).exists() else name for name in model]
    # A folder's name is a readable label; folders with the same name (run1/model, run2/model) keep their paths.
    labels = [label if labels.count(label) == 1 else name for label, name in zip(labels, model)]
    if len(set(labels)) != len(labels):
        raise EmbedforgeError("The same model is given twice", where="--model", fix="pass each model once")
    # Standalone, --query-prompt/--passage-prompt apply to every --model (a model's own prompts otherwise).
    prompts = {name: encoder_prompts(config) for name in model}
    engine = engine_of(config)
    if engine is not None:
        connect(engine)
    evaluate_stage.evaluate(eval_sets, list(zip(labels, model)), out, config.cache, config.evaluate.bootstrap_resamples, config.seed, config.encode_batch_size,
                            prompts=prompts, encode_backend=config.encode_backend, engine=engine)
    typer.echo((Path(out) / "report.md").read_text(encoding="utf-8"))


@app.command()
def status(run_dir: Path = typer.Option(..., "--run", help="the run directory"), config_file: Optional[Path] = ConfigFile) -> None:
    """Per stage: up to date, stale (and why), never run, or failed last time."""
    from embedforge import runs

    config_path = config_file or run_dir / "config.toml"
    config = load_config(config_path if config_path.exists() else None, {"run": run_dir})
    for stage, state in runs.status(config).items():
        typer.echo(f"{stage:9} {state}")


@app.command()
def init(directory: Path = typer.Argument(Path("."), help="where to write embedforge.toml and prompts/")) -> None:
    """Write a commented embedforge.toml and a copy of the shipped prompts to edit."""
    import shutil

    from embedforge.config import PROMPTS_DIR, commented_toml
    from embedforge.files import write_text

    target = directory / "embedforge.toml"
    if target.exists():
        raise EmbedforgeError("embedforge.toml already exists", where=str(target), fix="edit it, or choose another directory")
    (directory / "prompts").mkdir(parents=True, exist_ok=True)
    for prompt in sorted(PROMPTS_DIR.glob("*.toml")):
        if not (directory / "prompts" / prompt.name).exists():
            shutil.copyfile(prompt, directory / "prompts" / prompt.name)
    write_text(target, commented_toml("prompts/question.toml"))
    typer.echo(f"Wrote {target} and {directory / 'prompts'}/. Edit them, then: embedforge run --config {target}")
    typer.echo("To know whether the fine-tuned model is better, and what it forgets, set under [evaluate]: eval_set, a human-labelled "
               "BEIR folder of your domain, and regression_set, one of a domain the base model already serves (e.g. a BEIR dataset).")


@app.command()
def reindex(model: str = typer.Option(..., "--model", help="the model to embed with: a sentence-transformers folder (e.g. runs/NAME/train/model) or a name"),
            corpus: Path = typer.Option(..., "--corpus", help=_field_info("corpus").description),
            out: Path = typer.Option(..., "--out", help="the index folder: shards, FAISS index, manifest"),
            shard_size: int = typer.Option(10_000, "--shard-size", min=1, help="passages per shard, the unit of resuming after a kill"),
            dtype: str = typer.Option("float32", "--dtype", help="stored vectors: float32 or float16"),
            index: str = typer.Option("auto", "--index", help="auto (flat up to 1M passages, IVF up to 5M, then IVF-PQ), flat, ivf, ivfpq or hnsw"),
            batch_size: int = typer.Option(64, "--batch-size", min=1, help="passages per encoding batch"),
            devices: Optional[str] = typer.Option(None, "--devices", help="comma-separated devices, one encoding process each: cuda:0,cuda:1 or cpu,cpu"),
            encode_backend: str = typer.Option("auto", "--encode-backend", help=_field_info("encode_backend").description),
            cache: Path = typer.Option(Path("cache"), "--cache", help="where an exported encoder is kept (a fine-tuned model ships its own)"),
            engine: str = typer.Option("local", "--engine", help=_field_info("engine").description),
            ray_address: str = typer.Option("auto", "--ray-address", help=_field_info("ray_address").description),
            ray_actors: int = typer.Option(2, "--ray-actors", help=_field_info("ray_actors").description),
            ray_gpus_per_actor: float = typer.Option(0.0, "--ray-gpus-per-actor", help=_field_info("ray_gpus_per_actor").description),
            ray_cpus_per_actor: float = typer.Option(1.0, "--ray-cpus-per-actor", help=_field_info("ray_cpus_per_actor").description),
            dry_run: bool = typer.Option(False, "--dry-run", help="time a sample and print the estimated encoding time; write nothing")) -> None:
    """Embed a corpus with a (fine-tuned) model into an index folder: resumable, and incremental on rerun."""
    from embedforge import reindex as reindexing
    from embedforge.embeddings.cluster import ENGINES, RaySettings
    from embedforge.config import CorpusConfig
    from embedforge.corpus import describe as describe_corpus
    from embedforge.corpus import check_source, read_corpus
    from embedforge.embeddings import load_model

    _setup_logging()
    if engine not in ENGINES:
        raise EmbedforgeError(f"Unknown engine {engine!r}", where="--engine", fix=f"use one of {', '.join(ENGINES)}")
    ray = RaySettings(ray_address, ray_actors, ray_gpus_per_actor, ray_cpus_per_actor) if engine == "ray" else None
    settings = reindexing.ReindexSettings(shard_size=shard_size, dtype=dtype, index=index, batch_size=batch_size, devices=reindexing.parse_devices(devices),
                                          encode_backend=encode_backend, cache=cache, engine=ray)
    settings.check()  # before the corpus is read (and, on Ray, joins the cluster): a typo should not cost a corpus load
    check_source(corpus)
    # The model that encodes is loaded once, and its tokenizer cuts a raw corpus as a run cuts it;
    # several --devices load their own copies, so then it serves for the tokenizer only.
    several = len(settings.devices) > 1
    encoder = load_model(model, device=None if several or not settings.devices else settings.devices[0],
                         backend="torch" if several else encode_backend, cache_dir=cache)
    passages, report = read_corpus(CorpusConfig(corpus=corpus), encoder.tokenizer, encoder.max_seq_length, encoder.prompts.get("document", ""))
    for line in describe_corpus(report):
        typer.echo(f"corpus: {line}")
    given = None if several else encoder
    if dry_run:
        typer.echo(reindexing.estimate(model, passages, out, settings, model=given).render())
        return
    typer.echo(reindexing.reindex(model, passages, out, settings, model=given).render(out))


@app.command()
def search(query: str = typer.Argument(..., help="the query text"),
           index_dir: Path = typer.Option(..., "--index", help="a folder written by embedforge reindex"),
           k: int = typer.Option(10, "-k", "--k", min=1, help="how many passages to show"),
           cache: Path = typer.Option(Path("cache"), "--cache", help="where an exported encoder is kept, for an index built with an int8 --encode-backend")) -> None:
    """Search an index folder with the model that built it: rank, id, score and passage text."""
    from embedforge import reindex as reindexing

    _setup_logging()
    for hit in reindexing.search(index_dir, query, k, cache_dir=cache):
        text = " ".join(hit.text.split())
        typer.echo(f"{hit.rank:>3}  {hit.id}  {hit.score:.4f}  {text[:200] + ('…' if len(text) > 200 else '')}")


def quiet_other_progress_bars() -> None:
    """Off a terminal (a nightly job's stderr in a file), other libraries' bars (the Hugging Face
    libraries' "Loading weights", the GGUF conversion, sentence-transformers' model card) write
    every redraw into the log, joined by '\r'; ours log a line a minute instead
    (embedforge.progress). Each library reads its switch once, when first imported, so this runs
    before anything imports them (tests check the CLI modules import none); a value the user set wins."""
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        for switch in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
            os.environ.setdefault(switch, "1")


def main() -> None:
    """Every failure that reaches the user ends here as what / where / fix and exit 1 (130 for
    Ctrl-C); only a bug prints a traceback, and then only with -v."""
    quiet_other_progress_bars()
    from embedforge.generate import BatchExported

    try:
        app()
    except SystemExit as exit:
        if exit.code == 130:  # typer's word for Ctrl-C
            typer.echo("interrupted: finished stages and every LLM answer received (generate/requests.jsonl) are kept; "
                       "rerun the same command to resume.", err=True)
        raise
    except BatchExported as error:
        typer.echo(error.message)
    except EmbedforgeError as error:
        _fail(error)
    except OSError as error:
        _fail(os_error(error))
    except Exception as error:
        if _VERBOSE["traceback"]:
            raise
        _fail(EmbedforgeError(f"Unexpected error ({type(error).__name__}: {str(error)[:300]}); this is a bug in embedforge", where="embedforge",
                              fix="rerun with `embedforge -v ...` for the traceback, and report it"))


def os_error(error: OSError) -> EmbedforgeError:
    """An operating-system failure (permissions, a full disk, a file where a folder belongs) in user terms."""
    import errno

    fixes = {
        errno.ENOSPC: "free disk space and rerun; finished stages are kept",
        errno.EROFS: "choose a writable --run / --cache folder",
        errno.EACCES: "fix the permissions, or choose another --run / --cache folder",
        errno.EPERM: "fix the permissions, or choose another --run / --cache folder",
        errno.ENOTDIR: "a file stands where a folder is needed: check --run, --cache and the input paths",
        errno.EEXIST: "a file stands where a folder is needed: check --run, --cache and the input paths",
        errno.ENOENT: "check that the path exists",
    }
    where = error.filename or "the file system"
    return EmbedforgeError(f"{error.strerror or type(error).__name__}", where=str(where), fix=fixes.get(error.errno, "check the path and its permissions"))


def _fail(error: EmbedforgeError) -> None:
    typer.echo(f"error: {error.message}", err=True)
    sys.exit(1)
