"""Configuration: one frozen pydantic model per stage, and the run configuration that holds them.

A run is configured by `embedforge.toml` (sections `[corpus]`, `[generate]`, `[mine]`,
`[train]`, `[evaluate]`, plus top-level keys) and by CLI flags, which override the file. Field
names are unique across sections, so each flag (`--min-pairs`) maps to exactly one field
(`min_pairs`). Unknown keys are rejected. Fields listed in RUNTIME_ONLY change how fast a stage
runs, never what it produces, and are left out of stage fingerprints.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from embedforge.errors import EmbedforgeError

# Prompts are plain files at the repository root; the wheel carries them inside the package.
_PACKAGE = Path(__file__).resolve().parent
PROMPTS_DIR = next((d for d in (_PACKAGE / "prompts", _PACKAGE.parent / "prompts") if d.is_dir()), _PACKAGE / "prompts")
DEFAULT_PROMPT = PROMPTS_DIR / "question.toml"
DEFAULT_BASE_MODEL = "all-MiniLM-L6-v2"
# On 160 demo passages (round trip off), 1, 2, 4 and 8 samples a passage gave 88, 133, 195 and
# 310 accepted queries a minute: the samples share the prefill and fill the decode batch. On a
# bf16 CPU (2026-12-04), 8 instead of 4 wrote nfcorpus's 1,000 pairs in 527 s instead of 901 and
# LegalSummarization's 300 in 91 s instead of 149, with no difference on either human-labelled
# test set (paired +0.0015 [-0.0053, +0.0082] and +0.0074 [-0.0096, +0.0244] NDCG@10).
LOCAL_SAMPLES_PER_PASSAGE = 8
# On 100 nfcorpus passages (round trip on, 4 samples), cutting the passage in the prompt at ~128
# tokens instead of 2,048 gave 90-93 accepted queries instead of 66-84, in 101-105 s instead of
# 212-235 s: reading a ~330-token abstract was most of the small model's time, and its queries
# about the passage's start still find the whole passage.
LOCAL_PASSAGE_TOKENS = 128
ENDPOINT_PASSAGE_TOKENS = 2048
LOCAL_LLM = "SmolLM2-135M-Instruct"

RUNTIME_ONLY = {"engine", "ray_address", "ray_actors", "ray_gpus_per_actor", "ray_cpus_per_actor", "concurrency", "encode_batch_size", "timeout", "max_attempts", "max_wait_total", "export_batch", "import_batch", "keep_checkpoints"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CorpusConfig(_Frozen):
    corpus: Path | None = Field(None, description="BEIR folder; .jsonl/.csv/.parquet/.arrow file; saved datasets folder; folder or file of .txt/.md/.pdf/.html; empty = Python stdlib docs")
    id_field: str = "_id"
    text_field: str = "text"
    title_field: str = "title"
    chunk_tokens: int | None = Field(None, ge=0, description="cut longer records into passages of at most this many tokens of the base model, title and prompt included; empty = its max_seq_length; 0 = never cut (a BEIR corpus, and then every --eval-set, is cut only when this is set)")
    chunk_overlap_tokens: int = Field(0, ge=0, description="tokens a cut passage repeats from the end of the one before it")
    chunk_words: int | None = Field(None, ge=16, description="deprecated: cut into windows of this many words instead of by tokens")
    skip_bad_files: bool = Field(False, description="skip documents without usable text (encrypted or image-only PDF, HTML without text, not UTF-8) and list them, instead of stopping")
    max_passages: int | None = Field(None, ge=1, description="keep at most this many passages (chosen by id hash)")


class GenerateConfig(_Frozen):
    prompt: tuple[Path, ...] = Field(
        (DEFAULT_PROMPT,), description="prompt file (TOML); give it several times to mix query styles, each training and held-out passage asked with one of them (by a hash of its id, in --prompt-shares)"
    )
    prompt_shares: tuple[float, ...] = Field((), description="share of the passages for each --prompt, in order, e.g. 0.5,0.3,0.2 (normalised); unset: equal shares")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_or_several_prompts(cls, value: Any) -> Any:
        values = [value] if isinstance(value, (str, Path)) else list(value or ())
        if not values:
            raise ValueError("at least one prompt file is needed")
        if len(set(map(str, values))) != len(values):
            raise ValueError("a prompt file is given twice")
        return tuple(values)

    @field_validator("prompt_shares", mode="before")
    @classmethod
    def _comma_separated_shares(cls, value: Any) -> Any:
        return tuple(float(part) for part in value.split(",") if part.strip()) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _shares_match_prompts(self) -> "GenerateConfig":
        if self.prompt_shares and len(self.prompt_shares) != len(self.prompt):
            raise ValueError(f"prompt_shares gives {len(self.prompt_shares)} shares for {len(self.prompt)} prompt files: give one per --prompt, in order")
        if any(share <= 0 for share in self.prompt_shares):
            raise ValueError("every prompt share must be above 0 (leave a prompt out instead)")
        return self

    held_out_prompt: Path | None = Field(
        None, description="prompt file for the held-out (dev and synthetic test) passages instead of --prompt: a judge written in another query style than the training queries, which training on the --prompt style flatters less"
    )

    @model_validator(mode="after")
    def _held_out_prompt_differs(self) -> "GenerateConfig":
        if self.held_out_prompt is not None and str(self.held_out_prompt) in set(map(str, self.prompt)):
            raise ValueError(f"held_out_prompt {self.held_out_prompt} is also a --prompt: leave --held-out-prompt unset to judge with the training prompts")
        return self

    @property
    def prompt_files(self) -> tuple[Path, ...]:
        """Every prompt file the stage asks with: the training ones, then the held-out one if set."""
        return self.prompt + ((self.held_out_prompt,) if self.held_out_prompt is not None else ())

    @property
    def shares(self) -> tuple[float, ...]:
        """prompt_shares normalised to sum to 1, one per prompt (equal when unset)."""
        raw = self.prompt_shares or (1.0,) * len(self.prompt)
        return tuple(share / sum(raw) for share in raw)

    base_url: tuple[str, ...] = Field((), description="OpenAI-compatible endpoint; give it several times for replicas of one model (each call goes to the least-loaded, each with its own --concurrency; answers are keyed by the first, so replicas after it come and go without paying twice); unset = the local model")

    @field_validator("base_url", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any) -> Any:
        values = [value] if isinstance(value, str) else list(value or ())
        values = [url for url in values if not (isinstance(url, str) and not url.strip())]  # "" meant the local model, and still does
        if len(set(map(str, values))) != len(values):
            raise ValueError("an endpoint is given twice")
        return tuple(values)

    @property
    def samples(self) -> int:
        """samples_per_passage, its default resolved (from base_url, which is in this config too)."""
        if self.samples_per_passage is not None:
            return self.samples_per_passage
        return LOCAL_SAMPLES_PER_PASSAGE if not self.base_url else 1

    llm_model: str = Field(LOCAL_LLM, description="model name at the endpoint; 'none' = no LLM, only imported --queries")
    api_key_env: str = "OPENAI_API_KEY"
    min_pairs: int = Field(1000, ge=1)
    queries_per_passage: int = Field(1, ge=1, le=20)
    samples_per_passage: int | None = Field(
        None, ge=1, le=16, description="answers asked per training passage in each round, each a call of its own; every distinct one that passes the filters is kept. Unset: 8 on the local model (it encodes the passage once for all of them), 1 on an endpoint (each sample pays for the prompt again)"
    )
    max_rounds: int = Field(4, ge=1)
    barren_rounds: int = Field(2, ge=0, description="a passage whose answers gave no accepted training query in this many rounds is not asked in later ones (0: ask every round)")
    max_requests: int | None = Field(None, ge=1, description="stop after this many new LLM calls")
    max_cost: float | None = Field(None, gt=0, description="stop once new calls cost this many USD (from token usage and the prices below; calls in flight finish)")
    price_input_per_million: float = Field(0.0, ge=0, description="USD per million prompt tokens, for cost totals and max_cost")
    price_output_per_million: float = Field(0.0, ge=0, description="USD per million completion tokens")
    response_format: Literal["auto", "json_schema", "json_object", "text"] = Field(
        "auto", description="auto: JSON schema where the endpoint accepts it, else JSON mode, else text (the local model: text)"
    )
    max_reasks: int = Field(2, ge=0, description="re-ask a passage whose answer could not be parsed, at most this many times")
    examples: Path | None = Field(None, description="file of real user queries (one per line, or JSONL with 'text'), shown to the LLM for style")
    queries: Path | None = Field(None, description="existing pairs to import: JSONL of query + passage_id, or a BEIR folder (queries + qrels/train.tsv)")
    filter_imports: bool = Field(True, description="imported queries pass the same cheap filters as generated ones (length, instruction-like, copied); --no-filter-imports keeps them all")
    max_positives_per_query: int | None = Field(
        None, ge=1, description="imported queries: train on at most this many of a query's passages; the rest stay known positives that mining never uses as negatives"
    )
    export_batch: Path | None = Field(None, description="write the pending requests as OpenAI Batch API JSONL and stop")
    import_batch: Path | None = Field(None, description="load OpenAI Batch API results into the request ledger before generating")
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(32, ge=4)
    max_passage_tokens: int | None = Field(
        None, ge=16, description="passages longer than this (about 4 characters a token) are cut for the prompt; the stored passage is unchanged. Unset: 128 on the local model (it spends most of its time reading the passage), 2048 on an endpoint"
    )

    @property
    def passage_tokens(self) -> int:
        """max_passage_tokens, its default resolved (from base_url, as samples)."""
        if self.max_passage_tokens is not None:
            return self.max_passage_tokens
        return LOCAL_PASSAGE_TOKENS if not self.base_url else ENDPOINT_PASSAGE_TOKENS

    min_query_words: int = Field(2, ge=1)
    max_query_words: int = Field(24, ge=1)
    max_copy_overlap: float = Field(0.8, gt=0, le=1, description="reject a query whose tokens are mostly a span of the passage")
    round_trip_k: int = Field(10, ge=0, description="keep a training pair only if the base model ranks its passage this high; 0 = off")
    keep_per_passage: int | None = Field(
        None, ge=1, description="keep at most this many of a passage's training queries each round: those for which the base model ranks the passage highest (round-trip rank; needs --round-trip-k). Unset: every one that passes"
    )

    @model_validator(mode="after")
    def _ranked_by_round_trip(self) -> "GenerateConfig":
        if self.keep_per_passage is not None and not self.round_trip_k:
            raise ValueError("keep_per_passage ranks a passage's queries by the round trip: set round_trip_k above 0, or leave keep_per_passage unset")
        return self

    dev_fraction: float = Field(0.1, ge=0, lt=0.5)
    test_fraction: float = Field(0.1, ge=0, lt=0.5)
    max_dev_queries: int = Field(200, ge=0)
    max_test_queries: int = Field(300, ge=0)
    concurrency: int = Field(16, ge=1)
    timeout: float = Field(60.0, gt=0)
    max_attempts: int = Field(6, ge=1, description="attempts per request on 5xx, timeouts, dropped connections and broken bodies")
    max_wait_total: float = Field(900.0, gt=0, description="seconds a request keeps waiting out rate limits (429) before it is recorded as failed")


class MineConfig(_Frozen):
    cross_encoder: str | None = Field(None, description="rescore candidates with this cross-encoder and drop those it judges relevant")
    cross_encoder_threshold: float = Field(0.5, description="a candidate scoring at least this (sigmoid) with the cross-encoder is a false negative")
    num_negatives: int = Field(3, ge=0)
    range_min: int = Field(0, ge=0)
    range_max: int = Field(50, ge=1)
    relative_margin: float | None = Field(0.05, ge=0, lt=1)
    absolute_margin: float | None = None
    max_score: float | None = None
    duplicate_threshold: float = Field(0.98, gt=0, le=1)
    sampling: Literal["top", "random"] = "top"


class TrainConfig(_Frozen):
    loss: Literal["auto", "gist", "mnrl"] = Field(
        "auto",
        description="mnrl: MultipleNegativesRankingLoss; gist: the same, its in-batch negatives screened by the base model for false negatives (GISTEmbedLoss, ~2.5x slower); auto: gist when the base model scores at least 1 of a batch's other positives above a query's own on average (mine's others_above_positive), else mnrl",
    )
    mini_batch_size: int | None = Field(None, ge=1, description="use the cached (GradCache) loss with this mini-batch: large batches in small memory")
    matryoshka_dims: tuple[int, ...] = Field((), description="also train truncated embeddings of these sizes (MatryoshkaLoss), e.g. 384,256,128,64")
    epochs: int = Field(1, ge=1)
    min_steps: int = Field(32, ge=0, description="train at least this many steps: small data gets more epochs than --epochs (0 = exactly --epochs)")
    batch_size: int = Field(32, ge=2)
    keep_checkpoints: bool = Field(False, description="keep train/checkpoints/ after a successful training (by default only the final model is kept)")
    merge_alpha: Union[Literal["auto"], Annotated[float, Field(ge=0, le=1)]] = Field(
        1.0,
        description="save alpha x fine-tuned + (1 - alpha) x base model, parameter by parameter (1 = the fine-tuned model; the unmerged one is kept in train/model-unmerged); auto: the alpha of 0, 0.25, 0.5, 0.75, 1 that scores best on dev",
    )

    @field_validator("matryoshka_dims", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [int(part) for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    learning_rate: float = Field(5e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_length: int = Field(128, ge=8, description="token limit while training (the saved model keeps the base model's own limit for inference)")


class EvaluateConfig(_Frozen):
    eval_set: tuple[Path, ...] = ()
    regression_set: tuple[Path, ...] = Field((), description="BEIR folders of other domains the base model served: base vs fine-tuned on each, 'forgets' when the NDCG@10 difference is significantly below zero (CI below zero and p < 0.05)")
    bootstrap_resamples: int = Field(10_000, ge=100)


class RunConfig(_Frozen):
    run: Path = Path("runs/demo")
    cache: Path = Path("cache")
    base_model: str = DEFAULT_BASE_MODEL
    seed: int = 0
    encode_batch_size: int = Field(64, ge=1, description="most texts per encoding batch; on a CPU, long texts go in smaller batches (about 2,048 tokens each)")
    # backends.BACKENDS written out: importing it would lift the config, and every stage, a level
    # (tests/test_architecture.py); tests/test_backends.py holds the two lists equal.
    encode_backend: Literal["auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-int8"] = Field(
        "auto", description="what runs the encoder for corpus and query vectors: auto = the fastest installed backend whose vectors agree with torch's (checked once per model), torch on a GPU; onnx-int8 / openvino-int8 = quantized (other vectors, so other caches)"
    )
    engine: Literal["local", "ray"] = Field("local", description="where corpus encodings run (the base model's corpus cache, the evaluations, reindex): this machine, or a Ray cluster through ray.data; same vectors either way")
    ray_address: str = Field("auto", description="the Ray cluster for engine = ray: auto (started by `ray start` on this machine or its cluster), host:port, ray://host:10001, or local (Ray in this process)")
    ray_actors: int = Field(2, ge=1, description="encoding actors on Ray, one model each")
    ray_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs each Ray actor holds (0: CPU actors)")
    ray_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each Ray actor holds (and the torch threads of a CPU actor)")
    index: Literal["auto", "flat", "ivf", "hnsw"] = Field("auto", description="FAISS index over the base model's corpus embeddings: auto = exact up to exact_max passages, else IVF")
    exact_max: int = Field(1_000_000, ge=1, description="largest corpus searched exactly when index = auto")
    nprobe: int = Field(32, ge=1, description="IVF lists probed per query (HNSW: efSearch = 4 x nprobe)")
    query_prompt: str | None = Field(None, description="text the base model puts before each query, e.g. BGE's 'Represent this sentence for searching relevant passages: '; unset = the model's own")
    passage_prompt: str | None = Field(None, description="text the base model puts before each passage; unset = the model's own")
    corpus: CorpusConfig = CorpusConfig()
    generate: GenerateConfig = GenerateConfig()
    mine: MineConfig = MineConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("base_model")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> "RunConfig":
        if self.generate.test_fraction == 0 and not self.evaluate.eval_set:
            raise ValueError("test_fraction 0 leaves nothing to evaluate: pass a human-labelled --eval-set, or set --test-fraction above 0 (default 0.1)")
        return self


def encoder_prompts(config: RunConfig) -> dict[str, str]:
    """The prompts set for the base model, in sentence-transformers' names ("query", "document")."""
    prompts = {"query": config.query_prompt, "document": config.passage_prompt}
    return {name: text for name, text in prompts.items() if text is not None}


SECTIONS = ("corpus", "generate", "mine", "train", "evaluate")


def _section_of_field() -> dict[str, str | None]:
    owner: dict[str, str | None] = {name: None for name in RunConfig.model_fields if name not in SECTIONS}
    for section in SECTIONS:
        for name in RunConfig.model_fields[section].annotation.model_fields:
            if name in owner:
                raise RuntimeError(f"config field {name!r} is defined twice")  # a programming error
            owner[name] = section
    return owner


FIELD_SECTION = _section_of_field()


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read `embedforge.toml` (if given) and apply flag overrides (`field -> value`, None = not given)."""
    data: dict[str, Any] = {}
    where = "command-line flags"
    if path is not None:
        where = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise EmbedforgeError("Config file not found", where=str(path), fix="check the --config path, or run `embedforge init`") from error
        except tomllib.TOMLDecodeError as error:
            raise EmbedforgeError(f"The config file is not valid TOML ({error})", where=str(path), fix="fix the TOML syntax") from error
        base = Path(path).resolve().parent
        data = _resolve_paths(data, base)
    for name, value in (overrides or {}).items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        section = FIELD_SECTION[name]
        if section is None:
            data[name] = value
        else:
            data.setdefault(section, {})[name] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in issue['loc'])}: {issue['msg']}" for issue in error.errors())
        raise EmbedforgeError(f"Invalid configuration: {problems}", where=where, fix="see `embedforge init` for every key with its default") from error


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    # Paths in a config file are relative to the file, so a run is reproducible from anywhere.
    def resolve(value: Any) -> Any:
        return str((base / value).resolve()) if isinstance(value, str) and value else value

    data = {key: (dict(value) if isinstance(value, dict) else value) for key, value in data.items()}
    for key in ("run", "cache"):
        if key in data:
            data[key] = resolve(data[key])
    path_keys = [("corpus", "corpus")] + [("generate", key) for key in ("prompt", "held_out_prompt", "examples", "queries", "export_batch", "import_batch")]
    for section, key in path_keys:
        if key in data.get(section, {}):
            value = data[section][key]
            data[section][key] = [resolve(item) for item in value] if isinstance(value, list) else resolve(value)
    for key in ("eval_set", "regression_set"):
        if key in data.get("evaluate", {}):
            data["evaluate"][key] = [resolve(value) for value in data["evaluate"][key]]
    return data


def fingerprint_fields(config: BaseModel) -> dict[str, Any]:
    """The config as JSON, minus fields that change speed but never results."""
    return {key: value for key, value in config.model_dump(mode="json").items() if key not in RUNTIME_ONLY}


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def commented_toml(prompt_path: str = "prompts/question.toml") -> str:
    """A starting `embedforge.toml`: every key with its default and meaning; unset keys commented out."""
    lines = [
        "# embedforge configuration. Every key is also a command-line flag of the same name",
        "# (min_pairs <-> --min-pairs); flags override this file. Paths are relative to this file.",
        "# The API key is never stored here: it is read from the environment variable named by api_key_env.",
        "",
    ]

    def emit(model_fields: dict, defaults: BaseModel) -> None:
        for name, info in model_fields.items():
            if isinstance(getattr(defaults, name), BaseModel):
                continue  # a section, emitted below
            value = getattr(defaults, name)
            if name == "prompt":
                value = prompt_path
            if info.description:
                lines.append(f"# {info.description}")
            if value is None or (isinstance(value, tuple) and not value):
                lines.append(f"# {name} = ...")
            else:
                lines.append(f"{name} = {toml_literal(value)}")

    emit(RunConfig.model_fields, RunConfig())
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        emit(RunConfig.model_fields[section].annotation.model_fields, getattr(RunConfig(), section))
    return "\n".join(lines) + "\n"
