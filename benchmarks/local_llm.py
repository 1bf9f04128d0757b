"""Accepted queries per minute from the embedded local model (SmolLM2-135M-Instruct) on a CPU.

The generate stage over the same passages twice, alternating over --rounds: once with the
package's local model with the stage's defaults (LocalChatModel over embedforge.decoding: the
shared prefix encoded once, each passage prefilled once for its 4 samples, rows leave the batch at
their first newline, grouped-query attention without copies, bf16 where the CPU has it), once
with a plain baseline written here (one `model.generate` per batch of 16 prompts, greedy, float32,
no prefix cache, no stop string, one sample a passage). Both answer through the same stage and
the same filters; the round trip is off on both sides (`--round-trip-k 0`), so the figure is
about writing queries, not ranking them.
Each side makes one round over the passages (held-out passages included, as a run does).
Corpora: 300 passages of the demo corpus (the Python standard library docs, cut by
all-MiniLM-L6-v2's tokens as `embedforge run` cuts them) and 300 of nfcorpus (when present).
Default size: 300 passages per corpus, 1 round.
Ends with `RESULT accepted_per_minute=<ours> baseline_accepted_per_minute=<b> ratio=<ours/b>`
over both corpora, after one line per corpus; goal (issue #17): ratio >= 2.5 on both corpora.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from embedforge.config import DEFAULT_PROMPT, CorpusConfig, GenerateConfig
from embedforge.corpus import read_corpus
from embedforge.embeddings import load_model
from embedforge.errors import EmbedforgeError
from embedforge.files import iter_jsonl, read_jsonl
from embedforge.generate import generate, in_flight
from embedforge.llm import Completion, LocalChatModel
from embedforge.prompts import load_prompt

NFCORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nfcorpus" / "corpus.jsonl"


class PlainLocalModel(LocalChatModel):
    """The baseline: what a plain transformers script does with the same model."""

    def __init__(self) -> None:
        super().__init__(batch_size=16, seed=0)
        self.identity = {"model": self.path.name + "+plain", "base_url": "local"}

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(self.path.parent), self.path.name
        self._tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        self._tokenizer.padding_side = "left"
        self._model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()

    def _generate(self, batch, seed: int = 0) -> list[Completion]:
        import torch

        if self._model is None:
            self._load()
        started = time.monotonic()
        texts = [self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) for messages, _, _ in batch]
        encoded = self._tokenizer(texts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            output = self._model.generate(**encoded, max_new_tokens=max(item[2] for item in batch), do_sample=False,
                                          pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id)
        latency = time.monotonic() - started
        completions = []
        for row in output:
            generated = row[encoded["input_ids"].shape[1]:]
            stopped = bool((generated == self._tokenizer.eos_token_id).any())
            completions.append(Completion(text=self._tokenizer.decode(generated, skip_special_tokens=True), finish_reason="stop" if stopped else "length",
                                          usage={}, latency=latency))
        return completions


def sample(passages: list[dict], count: int) -> list[dict]:
    return random.Random(0).sample(passages, min(count, len(passages)))


OURS = GenerateConfig(min_pairs=10**6, max_rounds=1, round_trip_k=0)  # the defaults: 4 samples a passage on the local model
BASELINE = GenerateConfig(min_pairs=10**6, max_rounds=1, round_trip_k=0, samples_per_passage=1)


def one_side(passages: list[dict], llm, folder: Path, config: GenerateConfig) -> tuple[int, int, float]:
    """(accepted queries, calls, seconds) of one round of the generate stage over `passages`."""
    started = time.perf_counter()
    try:
        generate(passages, load_prompt(DEFAULT_PROMPT), folder, config, llm, seed=0)
    except EmbedforgeError:
        pass  # min_pairs is out of reach on purpose: the round runs over every passage, and what it accepted is on disk
    seconds = time.perf_counter() - started
    return len(read_jsonl(folder / "queries.jsonl")), sum(1 for _ in iter_jsonl(folder / "requests.jsonl")), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=1)
    arguments = parser.parse_args()
    encoder = load_model("all-MiniLM-L6-v2")
    demo, _ = read_corpus(CorpusConfig(), encoder.tokenizer, encoder.max_seq_length)
    corpora = {"demo": sample(demo, arguments.passages)}
    if NFCORPUS.exists():
        corpora["nfcorpus"] = sample(list(iter_jsonl(NFCORPUS)), arguments.passages)
    del encoder
    ours_model, plain_model = LocalChatModel(batch_size=in_flight(OURS), seed=0), PlainLocalModel()
    for model in (ours_model, plain_model):
        model._load()  # loading (seconds) is neither side's work per query
    totals = {"ours": [0, 0.0], "baseline": [0, 0.0]}
    ratios = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, passages in corpora.items():
            sides = {"ours": [0, 0, 0.0], "baseline": [0, 0, 0.0]}
            for round_number in range(arguments.rounds):
                order = ("ours", "baseline") if round_number % 2 == 0 else ("baseline", "ours")
                for side in order:
                    llm = ours_model if side == "ours" else plain_model
                    config = OURS if side == "ours" else BASELINE
                    accepted, calls, seconds = one_side(passages, llm, Path(scratch) / f"{name}-{side}-{round_number}", config)
                    print(f"round {round_number + 1} {name} {side}: {accepted} accepted of {calls} calls in {seconds:.1f}s "
                          f"({accepted / seconds * 60:.1f} a minute)", flush=True)
                    for index, value in enumerate((accepted, calls, seconds)):
                        sides[side][index] += value
            rates = {side: accepted / seconds * 60 for side, (accepted, _, seconds) in sides.items()}
            ratios[name] = rates["ours"] / rates["baseline"]
            print(f"{name}: ours {rates['ours']:.1f} accepted a minute ({sides['ours'][0]} of {sides['ours'][1]} calls), "
                  f"baseline {rates['baseline']:.1f} ({sides['baseline'][0]} of {sides['baseline'][1]} calls): ratio {ratios[name]:.2f}")
            for side in totals:
                totals[side][0] += sides[side][0]
                totals[side][1] += sides[side][2]
    ours, baseline = (totals[side][0] / totals[side][1] * 60 for side in ("ours", "baseline"))
    per_corpus = " ".join(f"{name}_ratio={value:.2f}" for name, value in ratios.items())
    print(f"RESULT accepted_per_minute={ours:.1f} baseline_accepted_per_minute={baseline:.1f} ratio={ours / baseline:.2f} {per_corpus}")


if __name__ == "__main__":
    main()
