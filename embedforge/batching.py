"""Training batches that hold no known false negatives.

In-batch losses treat every other row's passages as negatives of an anchor. When the labels say
one of those passages is relevant to the anchor (imported queries with many positives: nfcorpus
train queries have ~43 each), the loss pushes the anchor away from a passage it should find.
A random batch of 32 nfcorpus rows puts 0.76 such passages in front of the average anchor, and
in front of 35% of the anchors at least one (measured on mine/train.jsonl of a 2-positive run).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler

from embedforge.text import passage_text

logger = logging.getLogger(__name__)


class KnownPositivesBatchSampler(DefaultBatchSampler):
    """Batches with no text twice (as sentence-transformers' NoDuplicatesBatchSampler) and no
    passage that `known_positives` lists as relevant to another anchor of the batch.

    `known_positives` maps an anchor text to the texts of every passage known to be relevant to
    it. A row that would break either rule waits for a later batch, in its shuffled order; the
    last batches of an epoch can come out smaller when rows conflict with each other. A row left
    alone in a batch, without negatives of its own, is left out of the epoch: its loss has nothing
    to compare the positive with, so the step would only move the weights by the optimizer's
    momentum (82 of 217 steps on nfcorpus with human queries: 29 passages each relevant to ~350 queries)."""

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator: torch.Generator | None = None,
                 seed: int = 0, *, known_positives: Mapping[str, frozenset[str]], left_out: dict[tuple[int, int], int] | None = None,
                 log: bool = True) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        # Not texts the loss compares: the trainer's dataset-name column and the label columns it names.
        excluded = {"dataset_name", *(valid_label_columns or ())}
        columns = [list(dataset[column]) for column in dataset.column_names if column not in excluded]
        self.texts = [frozenset(map(str, values)) for values in zip(*columns)]
        # An anchor's own positive is in its known set too; it can only meet itself in a batch as a
        # duplicate text, which is refused anyway. So the sets are shared per anchor, not copied per row.
        nothing: frozenset[str] = frozenset()
        self.forbidden = [known_positives.get(anchor, nothing) for anchor in dataset["anchor"]]
        self.columns = len(columns)  # anchor, positive, then the hard negatives: one training dataset's mark
        self._batches_of: tuple[tuple, list[list[int]]] = ((None, None), [])
        # (epoch, columns) -> rows left out, for the train stats (a log line alone is easy to miss). A
        # plain dict given by the caller: the trainer builds the sampler, and pickles its arguments.
        self.left_out = {} if left_out is None else left_out
        self.log = log  # off for the samplers train() builds to count, so a line means an epoch being trained

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._epoch_batches()

    def __len__(self) -> int:
        # The exact count: the trainer's multi-dataset sampler draws only len() batches from each
        # sampler, so an estimate of rows / batch_size would leave the rows of the extra, smaller
        # batches that conflicts make out of the epoch without a word.
        return len(self._epoch_batches())

    def _epoch_batches(self) -> list[list[int]]:
        """This epoch's batches, worked out once: the same for the same seed and epoch."""
        key = (self.seed, self.epoch)
        if self._batches_of[0] != key:
            # A generator of its own, seeded as the shared one would be: len() must not draw from the
            # trainer's generator, and the batches stay those that sampler would have drawn.
            generator = torch.Generator().manual_seed((self.seed or 0) + self.epoch)
            batches = self._partition(torch.randperm(len(self.texts), generator=generator).tolist())
            left_out = len(self.texts) - sum(map(len, batches))
            if not self.drop_last:  # with drop_last, the rows of a short last batch are missing too
                self.left_out[(self.epoch, self.columns)] = left_out
                if left_out and self.log:
                    logger.info("epoch %d: %d of %d training rows left out, each alone in a batch with nothing to compare it with "
                                "(its passage is a known positive of every anchor still unplaced, or theirs of it)", self.epoch, left_out, len(self.texts))
            self._batches_of = (key, batches)
        return self._batches_of[1]

    def _partition(self, remaining: list[int]) -> list[list[int]]:
        batches = []
        while remaining:
            batch, texts, forbidden, deferred = [], set(), set(), []
            for position, index in enumerate(remaining):
                if len(batch) == self.batch_size:
                    deferred.extend(remaining[position:])
                    break
                own, known = self.texts[index], self.forbidden[index]
                if own & texts or own & forbidden or known & texts:
                    deferred.append(index)
                    continue
                batch.append(index)
                texts |= own
                forbidden |= known
            if len(batch) < self.batch_size and self.drop_last:
                break
            if len(batch) > 1 or self.columns > 2:  # a row with hard negatives has something to compare
                batches.append(batch)
            remaining = deferred
        return batches


def left_out_by_epoch(left_out: dict[tuple[int, int], int]) -> list[int]:
    """Rows left out in each epoch worked out, over every training dataset, from the samplers' `left_out`."""
    return [sum(count for (epoch, _), count in left_out.items() if epoch == wanted) for wanted in sorted({epoch for epoch, _ in left_out})]


def known_positive_texts(rows: list[dict], passages: list[dict]) -> dict[str, frozenset[str]]:
    """Anchor text -> the texts of its known positives, from mine rows' `known_positive_ids`.
    Only anchors with a known positive besides their rows' own are kept: the others cannot conflict,
    and only those passages' texts are built (none for generated queries, one positive each)."""
    known: dict[str, set[str]] = {}
    trained: dict[str, set[str]] = {}
    for row in rows:
        known.setdefault(row["anchor"], set()).update(row.get("known_positive_ids", ()))
        trained.setdefault(row["anchor"], set()).add(row["positive_id"])
    kept = {anchor: ids for anchor, ids in known.items() if ids - trained[anchor]}
    if not kept:
        return {}
    needed = set().union(*kept.values())
    text_of = {p["_id"]: passage_text(p) for p in passages if p["_id"] in needed}
    return {anchor: frozenset(text_of[identifier] for identifier in ids) for anchor, ids in kept.items()}
