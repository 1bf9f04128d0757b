"""The embedded query writer on a tiny causal LM built here (a 2-layer Llama with grouped
key/value heads and a BPE tokenizer trained on a few lines): no weights are downloaded.

The decoding loop must give what transformers' own generate gives, one prompt at a time, while
it shares the prompt prefix, prefills each prompt once for all its samples and lets rows leave
the batch early.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch

from embedforge import decoding, llm
from embedforge.config import DEFAULT_PROMPT, GenerateConfig
from embedforge.errors import EmbedforgeError
from embedforge.files import iter_jsonl
from embedforge.generate import generate, in_flight
from embedforge.prompts import load_prompt, render_messages

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LINES = [
    "Remove and return an arbitrary element from the set.",
    "how do I take an item out of a python set",
    "Vitamin D is made in the skin after exposure to sunlight.",
    "Either party may end this agreement by giving thirty days notice.",
    "Write a short search query a user would type to find the passage.",
    "Passage:\n####\nsome text\n####",
]


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-causal-lm")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(LINES * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         tie_word_embeddings=True, initializer_range=0.5)  # weights big enough that the answer depends on the prompt
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def float32(monkeypatch):
    # bfloat16 rounds differently in a batch than alone; the comparisons below want exact argmaxes.
    monkeypatch.setattr(llm, "_fast_dtype", lambda device: torch.float32)


def messages_for(passages: list[str]) -> list[list[dict]]:
    prompt = load_prompt(DEFAULT_PROMPT)
    return [render_messages(prompt, passage, "", 1, "####abc####") for passage in passages]


def reference(model, tokenizer, messages, max_new_tokens: int, stop_tokens) -> list[int]:
    """transformers' greedy generate on the whole prompt alone, cut after the first stop token."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    tokens = output[0, ids.shape[1]:].tolist()
    stops = [index for index, token in enumerate(tokens) if stop_tokens[token]]
    return tokens[: stops[0] + 1] if stops else tokens


def test_greedy_answers_equal_transformers_generate_one_prompt_at_a_time(tiny_causal_lm, float32):
    model = llm.LocalChatModel(path=tiny_causal_lm)
    # Prompts of different lengths (padding), one asked three times (one prefill, three rows).
    conversations = messages_for(["short passage", "a much longer passage about vitamin D and the skin and sunlight " * 3, "the set"])
    batch = [(conversations[0], 0.0, 12), (conversations[1], 0.0, 12), (conversations[1], 0.0, 12), (conversations[2], 0.0, 5), (conversations[1], 0.0, 12)]
    answers = model._generate(batch)
    tokenizer, stop_tokens = model._tokenizer, model._stop_tokens
    for (messages, _, max_tokens), answer in zip(batch, answers):
        expected = reference(model._model, tokenizer, messages, max_tokens, stop_tokens)
        assert answer.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert answer.usage["completion_tokens"] == len(expected)
        assert answer.finish_reason == ("stop" if expected and stop_tokens[expected[-1]] else "length")
    assert answers[1].text == answers[2].text == answers[4].text


def test_a_row_that_stops_at_once_leaves_the_others_as_they_were(tiny_causal_lm, float32):
    model = llm.LocalChatModel(path=tiny_causal_lm)
    conversations = messages_for(["short passage", "the set", "thirty days notice"])
    model._generate([(conversations[0], 0.0, 1)])  # loads the model
    tokenizer = model._tokenizer
    # Make the first prompt's first greedy token a stop token: its row ends after one step.
    first = reference(model._model, tokenizer, conversations[0], 1, model._stop_tokens)[0]
    model._stop_tokens = model._stop_tokens.clone()
    model._stop_tokens[first] = True
    answers = model._generate([(messages, 0.0, 10) for messages in conversations])
    assert answers[0].usage["completion_tokens"] == 1 and answers[0].finish_reason == "stop"
    for messages, answer in zip(conversations[1:], answers[1:]):
        assert answer.text == tokenizer.decode(reference(model._model, tokenizer, messages, 10, model._stop_tokens), skip_special_tokens=True)


def test_grouped_attention_equals_transformers_eager_attention():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(0)
    batch, heads, kv_heads, queries, keys, dim = 3, 6, 2, 4, 9, 8
    query = torch.randn(batch, heads, queries, dim)
    key, value = torch.randn(batch, kv_heads, keys, dim), torch.randn(batch, kv_heads, keys, dim)
    mask = torch.zeros(batch, 1, queries, keys)
    mask[0, :, :, :3] = torch.finfo(torch.float32).min  # left padding of the first row
    mask[:, :, 0, -3:] = torch.finfo(torch.float32).min  # and a causal-looking corner

    class Module:
        num_key_value_groups = heads // kv_heads
        training = False

    ours, _ = decoding.grouped_attention(Module(), query, key, value, mask, scaling=dim**-0.5)
    theirs, _ = eager_attention_forward(Module(), query, key, value, mask, scaling=dim**-0.5)
    assert ours.shape == theirs.shape == (batch, queries, heads, dim)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_attention_over_a_shared_prefix_equals_attention_over_each_row_with_the_prefix_copied_in():
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(1)
    batch, heads, kv_heads, queries, own, shared, dim = 3, 6, 2, 2, 5, 7, 8
    query = torch.randn(batch, heads, queries, dim)
    key, value = torch.randn(batch, kv_heads, own, dim), torch.randn(batch, kv_heads, own, dim)
    prefix_key, prefix_value = torch.randn(1, kv_heads, shared, dim), torch.randn(1, kv_heads, shared, dim)
    mask = torch.zeros(batch, 1, queries, own)
    mask[0, :, :, :2] = torch.finfo(torch.float32).min  # left padding of the first row's own part

    class Module:
        num_key_value_groups = heads // kv_heads
        training = False
        layer_idx = 0

    prefix = decoding.Prefix(ids=torch.zeros(1, shared, dtype=torch.long), cache=SimpleNamespace(layers=[SimpleNamespace(keys=prefix_key, values=prefix_value)]))
    ours, _ = decoding.grouped_attention(Module(), query, key, value, mask, scaling=dim**-0.5, shared_prefix=prefix)
    copied_key = torch.cat([prefix_key.expand(batch, -1, -1, -1), key], dim=2)
    copied_value = torch.cat([prefix_value.expand(batch, -1, -1, -1), value], dim=2)
    full_mask = torch.cat([torch.zeros(batch, 1, queries, shared), mask], dim=-1)
    theirs, _ = eager_attention_forward(Module(), query, copied_key, copied_value, full_mask, scaling=dim**-0.5)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_samples_of_one_prompt_differ_and_a_seed_repeats_them(tiny_causal_lm, float32):
    model = llm.LocalChatModel(path=tiny_causal_lm)
    messages = messages_for(["Vitamin D is made in the skin"])[0]
    batch = [(messages, 1.0, 8)] * 4
    first = [answer.text for answer in model._generate(batch, seed=1)]
    assert len(set(first)) > 1  # four rows of one prefill, sampled apart
    assert [answer.text for answer in model._generate(batch, seed=1)] == first
    assert [answer.text for answer in model._generate(batch, seed=2)] != first


def test_the_stage_sends_a_passages_samples_in_one_batch(tiny_causal_lm, float32, tmp_path, monkeypatch):
    seen = []
    original = decoding.sample

    def recording(model, prompts, samples, *args, **options):
        seen.append(list(samples))
        return original(model, prompts, samples, *args, **options)

    monkeypatch.setattr(decoding, "sample", recording)
    passages = [{"_id": f"p{index}", "title": "", "text": f"passage number {index} about the set and vitamin D"} for index in range(24)]
    config = GenerateConfig(min_pairs=10_000, max_rounds=1, round_trip_k=0, samples_per_passage=3, concurrency=4, max_reasks=0)
    model = llm.LocalChatModel(path=tiny_causal_lm, batch_size=in_flight(config))
    with pytest.raises(EmbedforgeError):  # the tiny model's answers are noise: min_pairs is out of reach
        generate(passages, load_prompt(DEFAULT_PROMPT), tmp_path, config, model, seed=0)
    calls = list(iter_jsonl(tmp_path / "requests.jsonl"))
    train = {row["passage_id"] for row in calls if row["sample_index"] == 2}
    prefills = Counter(count for batch in seen for count in batch)  # samples asked of each prefilled prompt
    # Every training passage was prefilled once for its 3 samples; held-out passages ask one.
    assert prefills[3] == len(train) > 0 and set(prefills) <= {1, 3}
    assert 3 * prefills[3] + prefills[1] == len(calls)
    assert max(len(batch) for batch in seen if 3 in batch) == 4  # --concurrency passages at a time


def test_a_failure_inside_the_model_reaches_every_waiting_caller(tiny_causal_lm, float32, monkeypatch):
    model = llm.LocalChatModel(path=tiny_causal_lm, batch_size=4)

    def broken(*args, **options):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(decoding, "sample", broken)
    messages = messages_for(["the set"])[0]

    async def ask_three():
        return await asyncio.gather(*(model.complete(messages, temperature=0.7, max_tokens=8) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(ask_three())
    assert all(isinstance(result, RuntimeError) for result in results)
