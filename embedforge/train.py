"""Stage 3, train: fine-tune the base model on mined tuples with an in-batch ranking loss.

Reads:  mine/train.jsonl, corpus.jsonl and the dev split of generate/eval (never test).
Writes: train/model/ (SentenceTransformer.save() output with a model card),
        train/checkpoints/ (resumable Trainer checkpoints),
        train/model-unmerged/ (with --merge-alpha other than 1: the fine-tuned model before it was
        merged with the base model; train/model is the merge).
Keeps:  the checkpoints while training: a killed run resumes from the newest complete one (a
        half-saved one is removed). After a successful training only the final model is kept,
        unless keep_checkpoints.

Hard negatives are extra columns. Rows are grouped by how many negatives mining found, one
dataset per group, so a shortfall query still trains with what it has. The best state on
dev NDCG@10 is kept; when it is no better than the base model, the stats say so.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
from collections import defaultdict
from functools import partial
from pathlib import Path

from embedforge.config import TrainConfig
from embedforge.embeddings import load_model, passage_text
from embedforge.errors import EmbedforgeError
from embedforge.files import process_rank, replace_folder
from embedforge.hardware import native_bfloat16
from embedforge.merging import check_mergeable, merged_state
from embedforge.progress import progress_bar

STAGE_VERSION = 5  # 2: --loss auto decides by masked_per_anchor (1: by known positives per query); 3: no known positive of an anchor among its in-batch negatives; 4: and every row of an epoch trained when that makes extra batches; 5: but a row alone in a batch with nothing to compare is left out
DEV_METRIC = "dev_cosine_ndcg@10"
MERGE_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
UNMERGED = "model-unmerged"
logger = logging.getLogger(__name__)


def remove_incomplete_checkpoints(checkpoints: Path) -> list[str]:
    """Remove checkpoints whose save never finished (killed mid-save, or the disk filled up).

    The Trainer writes trainer_state.json last, so a checkpoint without a readable one is partial;
    resuming from it fails on every later run. Returns the names removed."""
    removed = []
    for folder in sorted(Path(checkpoints).glob("checkpoint-*")):
        state = folder / "trainer_state.json"
        try:
            json.loads(state.read_text(encoding="utf-8"))
            continue
        except (OSError, ValueError):
            pass
        logger.warning("removing %s: its save did not finish (no readable trainer_state.json)", folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def step_progress_callback():
    """The Trainer's step bar through `progress_bar`: its own tqdm rewrites one line with '\\r', so a
    nightly log file held a single 13-minute line. Its metric dicts (printed on stdout every
    logging step) go to the debug log: the stats keep what matters."""
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        bar = None
        step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.step = state.global_step  # a resumed run starts where its checkpoint was
                self.bar = progress_bar(total=state.max_steps, initial=self.step, desc="train", unit="step", show=not args.disable_tqdm)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.step)
                self.step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            logger.debug("%s", logs)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return StepProgress()


def replace_trainer_progress(trainer) -> None:
    """The Trainer's own bar (or, under Jupyter, its notebook bar) and metric printer out, ours in."""
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback, DEFAULT_PROGRESS_CALLBACK):
        trainer.remove_callback(callback)
    trainer.add_callback(step_progress_callback())


def training_datasets(rows: list[dict]):
    from datasets import Dataset, DatasetDict

    groups: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        count = len(row["negative_ids"])
        groups[count].append({"anchor": row["anchor"], "positive": row["positive"], **{f"negative_{i}": row[f"negative_{i}"] for i in range(1, count + 1)}})
    return DatasetDict({f"negatives_{count}": Dataset.from_list(group) for count, group in sorted(groups.items())})


def column_prompts(model, datasets) -> dict[str, str] | None:
    """Train with the prompts the model encodes with: its query prompt on anchors, its document prompt on the rest."""
    query, document = model.prompts.get("query", ""), model.prompts.get("document", "")
    if not query and not document:
        return None
    columns = {column for dataset in datasets.values() for column in dataset.column_names}
    return {column: query if column == "anchor" else document for column in sorted(columns)}


def dev_evaluator(passages: list[dict], dev_queries: dict[str, str], dev_qrels: dict[str, set[str]], batch_size: int):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    if not dev_queries:
        return None
    return InformationRetrievalEvaluator(
        queries=dev_queries,
        corpus={p["_id"]: passage_text(p) for p in passages},
        relevant_docs=dev_qrels,
        name="dev",
        score_functions={"cosine": cos_sim},
        batch_size=batch_size,
        write_csv=False,
        show_progress_bar=False,
    )


# GIST pays when its guide has false in-batch negatives to mask: at least this many per anchor.
# Measured (benchmarks/README): nfcorpus's human queries 7.0 per anchor at batch 32 (GIST
# +0.013 NDCG@10, MNRL nothing); the local LLM's queries 0.01 (nfcorpus) and 0.10 (Legal), where
# GIST did no better than MNRL (+0.0037 [-0.0101, +0.0175]) at 1.2-2.5x the train time.
GIST_MASKED_PER_ANCHOR = 1.0


def masked_per_anchor(rows: list[dict], batch_size: int) -> float:
    """How many of a batch's other positives the base model scores above a query's own positive,
    on average: mine's `others_above_positive` share times the batch's other rows."""
    if not rows:
        return 0.0
    return sum(row.get("others_above_positive", 0.0) for row in rows) / len(rows) * (batch_size - 1)


def resolve_loss(loss: str, rows: list[dict], batch_size: int) -> str:
    """`auto` decides from the corpus, not from who wrote the queries: GIST when the base model
    ranks at least GIST_MASKED_PER_ANCHOR of a batch's other positives above a query's own
    (in-batch false negatives, which plain MNRL trains against), else MNRL."""
    if loss != "auto":
        return loss
    return "gist" if masked_per_anchor(rows, batch_size) >= GIST_MASKED_PER_ANCHOR else "mnrl"


def epochs_for(config: TrainConfig, rows: int) -> int:
    """`epochs`, or more when that many would train fewer than `min_steps` steps. With 329
    LegalSummarization pairs (11 steps an epoch), 3 epochs of MNRL gave +0.032 NDCG@10 where one
    gave +0.022: warm-up and decay over a dozen steps barely move the model."""
    per_epoch = max(1, math.ceil(rows / config.batch_size))
    return max(config.epochs, math.ceil(config.min_steps / per_epoch))


def make_loss(model, config: TrainConfig, base_model: str, loss_name: str, distributed: bool = False, prompts: dict[str, str] | None = None):
    """The training loss (`loss_name`: gist or mnrl, as resolve_loss gives): in-batch + hard
    negatives ranking, cached for big batches, GIST, Matryoshka."""
    from sentence_transformers.sentence_transformer import losses

    # Across several GPUs, gathering embeddings makes every device's batch a negative for all.
    options = {"gather_across_devices": distributed}
    if loss_name == "gist":
        # The cached variant: the plain GISTEmbedLoss takes at most one hard negative per row, and
        # rows carry up to num_negatives. Without --mini-batch-size, the whole batch is one mini-batch.
        # Its defaults measured (nfcorpus, human queries, benchmarks/README): without the
        # positive-positive terms -0.0136 NDCG@10, without the query-query terms -0.0040,
        # temperature 0.05 or 0.005 instead of 0.01 about -0.004 each.
        guide = load_model(base_model, max_seq_length=config.max_seq_length, prompts=prompts)
        loss = losses.CachedGISTEmbedLoss(model, guide=guide, mini_batch_size=config.mini_batch_size or config.batch_size, **options)
    elif config.mini_batch_size:
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size, **options)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, **options)
    if config.matryoshka_dims:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=list(config.matryoshka_dims))
    return loss


def train(
    rows: list[dict],
    passages: list[dict],
    dev_queries: dict[str, str],
    dev_qrels: dict[str, set[str]],
    base_model: str,
    out_dir: Path,
    config: TrainConfig,
    seed: int,
    encode_batch_size: int = 64,
    model_card_notes: dict | None = None,
    prompts: dict[str, str] | None = None,
    encode_backend: str = "torch",
) -> dict:
    import torch
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from embedforge.batching import KnownPositivesBatchSampler, known_positive_texts, left_out_by_epoch  # imports torch and sentence-transformers

    datasets = training_datasets(rows)
    known_positives = known_positive_texts(rows, passages)
    # The trainer's batches, worked out here only to count them (so without log lines of their own).
    counting_sampler = partial(KnownPositivesBatchSampler, batch_size=config.batch_size, drop_last=False, seed=seed, known_positives=known_positives, log=False)
    # Rows with hard negatives always make a batch; without them, checked before the model loads
    # (the trainer would stop later, with "args.max_steps must be set").
    if known_positives and list(datasets) == ["negatives_0"] and not len(counting_sampler(datasets["negatives_0"])):
        raise EmbedforgeError(
            f"No training batch can be made from these {len(rows)} rows: no two of them can share a batch (each pair shares a text, "
            "or one's passage is a known positive of the other's query), and no row has hard negatives to compare its positive with",
            where="mine/train.jsonl (known_positive_ids)",
            fix="import queries whose relevant passages differ (--queries), or let mining find hard negatives (--num-negatives above 0, wider --range-max)")
    out_dir = Path(out_dir)
    checkpoints = out_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    model = load_model(base_model, prompts=prompts)
    # Train on truncated texts (all-MiniLM-L6-v2 itself was trained at 128 tokens: about twice as
    # fast as 256 on a CPU); the saved model keeps the base model's limit for inference.
    inference_length = model.max_seq_length
    model.max_seq_length = config.max_seq_length
    evaluator = dev_evaluator(passages, dev_queries, dev_qrels, encode_batch_size)
    base_dev = evaluator(model).get(DEV_METRIC) if evaluator else None

    # Only where the labels know more positives than the rows train on (imported queries): elsewhere
    # the two samplers keep the same batches apart, and the plain one keeps earlier runs' batches.
    left_out: dict[tuple[int, int], int] = {}
    batch_sampler = partial(KnownPositivesBatchSampler, known_positives=known_positives, left_out=left_out) if known_positives else BatchSamplers.NO_DUPLICATES
    loss_name = resolve_loss(config.loss, rows, config.batch_size)
    epochs = epochs_for(config, len(rows))
    logger.info("training loss: %s, %d epoch(s)", loss_name, epochs)
    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu_bfloat16 = not cuda and native_bfloat16("cpu")
    arguments = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio (transformers 5 retired warmup_ratio)
        batch_sampler=batch_sampler,  # a duplicate, or a known positive of another anchor, is a false in-batch negative
        seed=seed,
        # accelerate sets up multi-CPU DDP only when told the run is on CPU (gloo); on GPUs it picks NCCL.
        # (and transformers takes bf16 on a CPU only when told so).
        use_cpu=(distributed or cpu_bfloat16) and not cuda,
        ddp_backend="gloo" if distributed and not cuda else None,
        # Mixed precision where the hardware has it: on a CPU with AVX512-BF16 a step of
        # all-MiniLM-L6-v2 (160 texts of 128 tokens) took 6.4-6.9 s instead of 9.9-12.2 s.
        bf16=native_bfloat16("cuda") if cuda else cpu_bfloat16,
        fp16=cuda and not torch.cuda.is_bf16_supported(),
        eval_strategy="epoch" if evaluator else "no",
        save_strategy="epoch",
        save_total_limit=2,
        # sentence-transformers evaluates on rank 0 only, so under torchrun the other ranks have no
        # dev metric to select on: there the last state is kept and rank 0 reports its dev score.
        load_best_model_at_end=evaluator is not None and not distributed,
        metric_for_best_model=f"eval_{DEV_METRIC}" if evaluator and not distributed else None,
        greater_is_better=True,
        logging_steps=10,
        report_to="none",
        disable_tqdm=os.environ.get("EMBEDFORGE_PROGRESS") == "0",
        dataloader_pin_memory=cuda,  # pinned memory helps only a GPU; on a CPU torch warns about it on every epoch
        prompts=column_prompts(model, datasets),
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=arguments,
        train_dataset=datasets,
        loss=make_loss(model, config, base_model, loss_name, distributed=distributed, prompts=prompts),
        evaluator=evaluator,
    )
    replace_trainer_progress(trainer)
    remove_incomplete_checkpoints(checkpoints)
    last = get_last_checkpoint(str(checkpoints))
    if last:
        logger.info("resuming training from %s", last)
    try:
        result = trainer.train(resume_from_checkpoint=last)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        removed = remove_incomplete_checkpoints(checkpoints)
        raise EmbedforgeError(
            "No space left on the device while saving a training checkpoint" + (f" ({', '.join(removed)} was removed half-saved)" if removed else ""),
            where=str(checkpoints), fix="free disk space, then rerun: training resumes from the newest complete checkpoint",
        ) from error
    if known_positives:
        # A resumed run's samplers worked out only the epochs it ran; the others' batches are the
        # same for the same seed and epoch, so the stats count every epoch.
        done = {epoch for epoch, _ in left_out}
        for epoch in sorted(set(range(epochs)) - done):
            for dataset in datasets.values():
                sampler = counting_sampler(dataset, left_out=left_out)
                sampler.set_epoch(epoch)
                len(sampler)  # works the epoch's batches out, which records its rows left out
    # The trainer scored the state it kept on dev already; evaluating again would re-encode the corpus.
    tuned_dev = trainer.state.best_metric if arguments.load_best_model_at_end else None
    if tuned_dev is None and evaluator:
        tuned_dev = evaluator(model).get(DEV_METRIC)

    def save_unmerged() -> None:
        model.max_seq_length = inference_length
        try:  # torch only: the unmerged model is for the user, nothing here encodes with it
            save_model(model, out_dir / UNMERGED, base_model, config, {"merged": "no: train/model is this model merged with the base model"},
                       model_card_notes or {}, "torch")
        finally:
            model.max_seq_length = config.max_seq_length

    merge = {}
    if config.merge_alpha != 1.0 and process_rank() == 0:
        merge = merge_with_base(model, base_model, config.merge_alpha, evaluator, base_dev, tuned_dev, prompts, save_unmerged)
    else:
        shutil.rmtree(out_dir / UNMERGED, ignore_errors=True)  # an older run's, which this model is not
    saved_dev = merge.get("merged_dev_ndcg@10", tuned_dev)
    improved = None if base_dev is None or saved_dev is None else saved_dev > base_dev
    stats = {
        "pairs": len(rows),
        "loss": loss_name,
        "masked_per_anchor": round(masked_per_anchor(rows, config.batch_size), 4),  # what --loss auto decided by
        "batch_sampler": "known-positives" if known_positives else "no-duplicates",
        # Per epoch, the rows that could only be alone in a batch with nothing to compare (known-positive batches only).
        "rows_left_out_by_epoch": left_out_by_epoch(left_out) if known_positives else None,
        "epochs": epochs,
        "steps": int(result.global_step),
        "train_loss": round(float(result.training_loss), 6),
        "resumed_from": Path(last).name if last else None,
        "base_dev_ndcg@10": None if base_dev is None else round(float(base_dev), 6),
        "tuned_dev_ndcg@10": None if tuned_dev is None else round(float(tuned_dev), 6),
        **merge,
        "improved_on_dev": improved,
    }
    model.max_seq_length = inference_length
    if process_rank() == 0:  # under torchrun, only rank 0 writes the model
        save_model(model, out_dir / "model", base_model, config, stats, model_card_notes or {}, encode_backend)
        if not config.keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)  # with optimizer state: a finished 34-pair run kept 520 MB
    if improved is False:
        logger.warning(
            "FINE-TUNING DID NOT HELP: dev NDCG@10 %.4f (fine-tuned) vs %.4f (base). Keep the base model; see README 'When fine-tuning does not help'.",
            saved_dev,
            base_dev,
        )
    return stats


def merge_with_base(model, base_model: str, merge_alpha, evaluator, base_dev, tuned_dev, prompts, save_unmerged) -> dict:
    """Load the merge of the fine-tuned `model` with the base model into `model`; with "auto",
    the alpha of MERGE_GRID that scores best on dev (the larger alpha on a tie). Dev only: the
    test split is never read here. Returns the stats of the merge."""
    tuned = {name: value.detach().clone() for name, value in model.state_dict().items()}
    base = load_model(base_model, prompts=prompts).state_dict()
    check_mergeable(base, tuned, base_model)
    save_unmerged()  # the unmerged model stays available
    sweep = {}
    if merge_alpha == "auto":
        if evaluator is None:
            logger.warning("--merge-alpha auto needs dev queries to choose alpha; the fine-tuned model is saved unmerged")
            alpha = 1.0
        else:
            sweep = {0.0: base_dev, 1.0: tuned_dev}
            for candidate in MERGE_GRID:
                if candidate not in sweep:
                    model.load_state_dict(merged_state(base, tuned, candidate))
                    sweep[candidate] = evaluator(model).get(DEV_METRIC)
            alpha = max(sweep, key=lambda candidate: (round(float(sweep[candidate]), 6), candidate))
            logger.info("merge: dev NDCG@10 by alpha %s; alpha %g chosen", {key: round(float(value), 4) for key, value in sorted(sweep.items())}, alpha)
    else:
        alpha = float(merge_alpha)
    model.load_state_dict(merged_state(base, tuned, alpha))
    stats = {"merge_alpha": alpha}
    if sweep:
        stats["merge_dev_sweep"] = {f"{key:g}": round(float(value), 6) for key, value in sorted(sweep.items())}
        stats["merged_dev_ndcg@10"] = round(float(sweep[alpha]), 6)
    elif evaluator is not None and alpha != 1.0:
        stats["merged_dev_ndcg@10"] = round(float(base_dev if alpha == 0.0 else evaluator(model).get(DEV_METRIC)), 6)
    return stats


def save_model(model, folder: Path, base_model: str, config: TrainConfig, stats: dict, notes: dict, encode_backend: str = "torch") -> None:
    """Save into a temporary folder and rename it into place, so a crash never leaves half a model.

    With an ONNX backend, the model ships its ONNX export (`onnx/model.onnx`), checked against
    torch: evaluation and reindex encode with it, and a user can serve it the same way."""
    with replace_folder(folder) as temporary:
        model.save(str(temporary))
        lines = ["", "## embedforge", "", f"- base model: `{base_model}`"]
        export = _ship_onnx_export(model, temporary, encode_backend)
        if export:
            lines.append(f"- ONNX export: `onnx/model.onnx` (inputs {', '.join(export['inputs'])}; output last_hidden_state, before pooling; "
                         f"max |difference| to torch's vectors {export['max_abs_diff']:.1e}, {export['speedup']:.2f}x its speed on the training machine)")
        lines += [f"- {key}: `{value}`" for key, value in notes.items()]
        lines += [f"- training argument {key}: `{value}`" for key, value in config.model_dump(mode="json").items()]
        lines += [f"- {key}: `{value}`" for key, value in stats.items()]
        with open(temporary / "README.md", "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


def _ship_onnx_export(model, folder: Path, encode_backend: str) -> dict | None:
    from embedforge.backends import AGREEMENT, agrees, installed, save_with_model

    if encode_backend not in ("auto", "onnx", "onnx-int8") or not installed("onnx") or str(model.device) != "cpu":
        return None  # the runs that would use it encode on torch: it would only be exported for nothing
    try:
        # From the saved folder, not the trained object: after mixed-precision training, accelerate
        # leaves its forward wrapped in bf16 autocast, and the export would be checked against
        # bf16 vectors (nfcorpus: max |difference| 1.52e-03, refused; 1.94e-07 from the folder).
        check = save_with_model(load_model(str(folder), device="cpu"), folder)
        if not agrees(check):
            shutil.rmtree(folder / "onnx", ignore_errors=True)  # never ship what evaluation would refuse
            raise EmbedforgeError(f"The ONNX export of the fine-tuned model disagrees with torch (max |difference| {check['max_abs_diff']:.2e} > {AGREEMENT:g})",
                                  where=str(folder), fix="use --encode-backend torch, and report the model")
        return check
    except EmbedforgeError as error:
        if encode_backend != "auto":
            raise
        logger.warning("the fine-tuned model is saved without an ONNX export (%s); it encodes with torch", error)
        return None
