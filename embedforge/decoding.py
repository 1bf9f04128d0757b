"""Sampling short answers from a small causal LM on a CPU, without the waste of a general generate.

The embedded query writer answers thousands of prompts that share their instructions and
few-shot turns, asks several samples of the same prompt, and wants one line back. So: the shared
prefix is encoded once and attended to once per step for the whole batch (the rows' caches hold
their own tokens only), each distinct prompt is prefilled once
however many samples it is asked for, only the last position's logits are computed, a row leaves
the batch as soon as it writes a newline or the end token (the others no longer wait on it), and
attention runs over grouped key/value heads without copying them per query head.

Pure torch over a transformers model; nothing here knows about prompts, passages or the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUPED_ATTENTION = "embedforge_grouped"
TOP_K = 50


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_prefix=None, **kwargs):
    """Attention for grouped-query models (several query heads per key/value head), as matmuls.

    transformers' eager path copies each key/value head once per query head, and torch's CPU
    scaled_dot_product_attention took 10.9 ms where this takes 1.1 ms for one decode step of
    SmolLM2 (64 rows, 330 cached positions, bfloat16, 2 cores): decoding spent most of its time
    there. Same arithmetic as eager attention: softmax in float32, additive float mask.

    `shared_prefix` (a Prefix): keys and values that every row sees before its own (the shared
    instructions), held once for the whole batch instead of copied into each row's cache. At 64
    rows a copied prefix of ~230 positions was two thirds of the cache that every decode step reads
    and appends to.
    """
    batch, heads, query_length, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else head_dim**-0.5
    # Query head h reads key/value head h // groups (transformers' repeat_kv order).
    grouped = query.reshape(batch, kv_heads, groups * query_length, head_dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        mask = attention_mask[:, :, None, :, : key.shape[-2]]  # (batch, 1, 1, query, keys)
        scores = (scores.view(batch, kv_heads, groups, query_length, -1) + mask).view(batch, kv_heads, groups * query_length, -1)
    if shared_prefix is None:
        probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(probabilities, value)
    else:
        layer = shared_prefix.cache.layers[module.layer_idx]
        prefix_keys, prefix_values = layer.keys[0], layer.values[0]  # (kv_heads, prefix, head_dim)
        length = prefix_keys.shape[-2]
        prefix_scores = _across_rows(grouped, prefix_keys.transpose(-1, -2)) * scale
        probabilities = torch.softmax(torch.cat([prefix_scores, scores], dim=-1), dim=-1, dtype=torch.float32).to(query.dtype)
        output = _across_rows(probabilities[..., :length], prefix_values) + torch.matmul(probabilities[..., length:], value)
    output = output.reshape(batch, heads, query_length, head_dim)
    return output.transpose(1, 2).contiguous(), None


def _across_rows(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """`left` (batch, kv_heads, n, k) times one `right` (kv_heads, k, m) shared by every row, as one
    matmul per key/value head over all rows together: `right` is never copied per row."""
    batch, kv_heads, n, k = left.shape
    product = torch.matmul(left.transpose(0, 1).reshape(kv_heads, batch * n, k), right)
    return product.view(kv_heads, batch, n, -1).transpose(0, 1)


def register_grouped_attention() -> str:
    """Make `attn_implementation=GROUPED_ATTENTION` loadable (with eager's float mask); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_ATTENTION, eager_mask)
    return GROUPED_ATTENTION


def stop_token_mask(tokenizer, vocabulary_size: int) -> torch.Tensor:
    """True for every token id whose text holds a newline: the answer is one line, so it ends there."""
    texts = tokenizer.batch_decode([[index] for index in range(vocabulary_size)])
    mask = torch.tensor(["\n" in text for text in texts], dtype=torch.bool)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id < vocabulary_size:
        mask[tokenizer.eos_token_id] = True
    return mask


@dataclass(frozen=True)
class Prefix:
    """The encoded shared start of every prompt (system turn and few-shot examples)."""

    ids: torch.Tensor  # (1, length)
    cache: object  # transformers Cache for those ids


def encode_prefix(model, ids: torch.Tensor) -> Prefix:
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    return Prefix(ids=ids, cache=cache)


def sample(
    model,
    prompts: list[list[int]],
    samples: list[int],
    max_new_tokens: list[int],
    stop_tokens: torch.Tensor,
    pad_token_id: int,
    temperature: float,
    top_p: float = 0.9,
    prefix: Prefix | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """New tokens for `samples[i]` continuations of each prompt (token ids after `prefix`).

    Rows come out grouped by prompt, in order. A row ends at a stop token (kept in its output) or
    after `max_new_tokens[i]` tokens. temperature 0 is greedy.
    """
    if prefix is not None and model.config._attn_implementation != GROUPED_ATTENTION:
        # Any other attention would drop the `shared_prefix` argument and answer without the prefix.
        raise ValueError(f"a shared prefix needs the model loaded with attn_implementation={GROUPED_ATTENTION!r}")
    device = model.device
    count = len(prompts)
    start = prefix.ids.shape[1] if prefix is not None else 0
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode():
        # One prompt at a time: a padded batch computes its padding too (2.4x the real tokens on
        # a batch of demo passages), and on a CPU one prompt of ~100 tokens is as fast per token.
        # The rows' caches hold their own tokens only; the prefix is attended to from `prefix`.
        caches, last = [], []
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            positions = torch.arange(start, start + len(prompt), device=device)[None]
            output = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1, shared_prefix=prefix)
            caches.append(output.past_key_values)
            last.append(output.logits[:, -1])
        # One batch for decoding: each row's cache left-padded to the longest, the mask hides it.
        lengths = [len(prompt) for prompt in prompts]
        width = max(lengths)
        cache = _stack_caches(caches, [width - length for length in lengths])
        logits = torch.cat(last)
        mask = torch.tensor([[0] * (width - length) + [1] * length for length in lengths], dtype=torch.long, device=device)
        # Each prompt was encoded once; its samples share that work from here on.
        rows = torch.repeat_interleave(torch.arange(count, device=device), torch.tensor(samples, device=device))
        cache.batch_select_indices(rows)
        logits, mask = logits[rows], mask[rows]
        next_position = mask.sum(-1) + start
        limits = torch.tensor(max_new_tokens, device=device)
        alive = torch.arange(len(rows), device=device)
        written: list[list[int]] = [[] for _ in range(len(rows))]
        stop_tokens = stop_tokens.to(device)
        for step in range(int(limits.max())):
            token = _pick(logits, temperature, top_p, generator)
            for row, value in zip(alive.tolist(), token.tolist()):
                written[row].append(value)
            done = stop_tokens[token] | (limits[alive] <= step + 1)
            if bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                alive, token, mask, next_position = alive[keep], token[keep], mask[keep], next_position[keep]
            mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=device)], dim=1)
            output = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None], cache=cache, use_cache=True, shared_prefix=prefix)
            cache, logits = output.past_key_values, output.logits[:, -1]
            next_position = next_position + 1
    return written


def _stack_caches(caches: list, pads: list[int]):
    """One batch cache from single-row caches of different lengths, each left-padded with zeros."""
    merged = caches[0]
    for index, layer in enumerate(merged.layers):
        layer.keys = torch.cat([torch.nn.functional.pad(c.layers[index].keys, (0, 0, pad, 0)) for c, pad in zip(caches, pads)])
        layer.values = torch.cat([torch.nn.functional.pad(c.layers[index].values, (0, 0, pad, 0)) for c, pad in zip(caches, pads)])
    return merged


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    # The 50 most likely tokens (transformers' default top_k), then the nucleus of mass top_p.
    top, order = logits.float().topk(min(TOP_K, logits.shape[-1]), dim=-1)
    ordered = torch.softmax(top / temperature, dim=-1)
    outside = ordered.cumsum(-1) - ordered > top_p
    ordered = ordered.masked_fill(outside, 0.0)
    choice = torch.multinomial(ordered, 1, generator=generator)
    return order.gather(-1, choice).squeeze(1)
