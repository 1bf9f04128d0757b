"""Shared pytest fixtures."""


# --- fake OpenAI server fixture (see tests/fake_openai.py) -------------------
import pytest as _fo_pytest

try:
    from .fake_openai import FakeOpenAI as _FakeOpenAI
except ImportError:
    try:
        from fake_openai import FakeOpenAI as _FakeOpenAI
    except ImportError:
        from tests.fake_openai import FakeOpenAI as _FakeOpenAI


@_fo_pytest.fixture
def fake_openai():
    """A started FakeOpenAI (any model, no key check, no latency); stopped after the test."""
    with _FakeOpenAI() as fake:
        yield fake


# --- a tiny sentence-transformers model and a small corpus, built offline ----------------------
import json
import re
from pathlib import Path

TOPICS = [
    "apple", "river", "engine", "violin", "glacier", "tax", "protein", "satellite", "bakery", "volcano",
    "harbor", "compiler", "vaccine", "orchard", "thunder", "ledger", "falcon", "quartz", "tunnel", "lantern",
    "meadow", "piston", "sonnet", "canyon", "ferment", "magnet", "beacon", "copper", "rhythm", "saddle",
    "turbine", "walnut", "pigment", "anchor", "blizzard", "cactus", "dolphin", "ember", "fossil", "granite",
]
FILLER = "the of and describes how works in practice with details about its history uses care and common problems".split()


def make_passages(count: int = 40) -> list[dict]:
    passages = []
    for index, topic in enumerate(TOPICS[:count]):
        other = TOPICS[(index * 7 + 3) % len(TOPICS)]
        text = f"The {topic} {FILLER[index % len(FILLER)]} {topic} {other} describes how the {topic} works in practice with details about its history uses care and common problems of every {topic}"
        passages.append({"_id": f"doc{index:03d}", "title": topic, "text": text})
    return passages


def write_corpus(path: Path, passages: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in passages), encoding="utf-8")
    return path


def passage_responder(body: dict) -> str:
    """A fake LLM answer: 'what about <topic> ...' from the passage between the delimiters."""
    lines = body["messages"][-1]["content"].splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith("####")]
    words = re.findall(r"[a-z]+", " ".join(lines[marks[0] + 1 : marks[-1]]).lower())
    return f"what about {words[1]} {words[4]} history"


def build_tiny_model(folder: Path, words: list[str]) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    (raw / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(raw / "vocab.txt"), do_lower_case=True)  # transformers 5 ignores vocab_file=
    tokenizer.save_pretrained(raw)
    import torch

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocabulary), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")], device="cpu")
    model.save(str(folder / "model"))
    return folder / "model"


@_fo_pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    words = set(re.findall(r"[a-z]+", " ".join(p["text"] + " " + p["title"] for p in make_passages()).lower()))
    words |= {"what", "about", "is", "how", "history", "query"}
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny"), sorted(words)))


@_fo_pytest.fixture
def corpus_file(tmp_path) -> Path:
    return write_corpus(tmp_path / "data" / "corpus.jsonl", make_passages())
