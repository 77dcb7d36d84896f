"""Batched sampling and scoring over a causal LM's KV cache (GPT-2, Llama, Qwen and the like).

Why a loop of our own instead of `model.generate`: at the sizes this project samples, `generate` runs a chain
of logits processors over the full 50,257-word vocabulary at every step, which costs more than the model.
Here top-k is applied to the raw logits first (`torch.topk`), so temperature, softmax, top-p and the draw
only ever touch k numbers per row. Prompts are left-padded with end-of-text; the attention mask hides the
padding and position ids start at 0 on each row's first real token, so a prompt's text does not depend on
how long its neighbours in the batch are (only the random stream does, hence "same seed and batch size").
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from fakegpt.data.tokenizer import EOT_TOKEN
from fakegpt.errors import FakegptError
from fakegpt.models import architecture


@functools.cache
def _cache_kwarg(model_cls: type[Any]) -> str:
    # transformers 5 renamed `past_key_values` to `cache`; accept either so a minor upgrade doesn't break us.
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(model: Any, cache: Any, **kwargs: Any) -> torch.Tensor:
    """Run the model with `cache` (a DynamicCache filled in place); return the last position's logits (B, V)."""
    # a class is hashable; typeshed's type[Any] is not Hashable to mypy, so functools.cache's key is cast to Any
    out = model(**{_cache_kwarg(cast(Any, type(model))): cache}, use_cache=True, logits_to_keep=1, **kwargs)
    return out.logits[:, -1, :]


def next_tokens(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one token per row from (B, V) logits. Temperature 0 is greedy; top_k 0 / top_p 1 disable them.

    Temperature, top-k and top-p work on float32 logits whatever the model's dtype: in bfloat16 (8 bits of
    mantissa) near-tied logits collapse, which changes which tokens survive top-k and their probabilities.
    """
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        # (B, k); top-p needs them sorted, plain top-k sampling does not (a little cheaper)
        values, index = torch.topk(logits, top_k, dim=-1, sorted=top_p < 1.0)
    elif top_p < 1.0:
        values, index = torch.sort(logits, dim=-1, descending=True)
    else:
        values, index = logits, None
    probs = torch.softmax(values / temperature, dim=-1)
    if top_p < 1.0:
        # keep the smallest prefix of the sorted distribution whose mass reaches top_p (always >= 1 token)
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1) positions within `values`
    if index is None:
        return choice.squeeze(-1)
    return index.gather(-1, choice).squeeze(-1)


@dataclass
class Completion:
    """One sampled continuation: its new tokens and whether end-of-text stopped it."""

    tokens: list[int]  # new tokens, without the end-of-text that stopped it
    stopped: bool  # True when the model emitted end-of-text before max_new_tokens


def left_pad(
    prompts: list[list[int]], device: torch.device, pad: int = EOT_TOKEN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (B, T), prompts aligned to the right edge."""
    if any(len(p) == 0 for p in prompts):
        raise FakegptError("cannot sample from an empty prompt (it encodes to no tokens)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # 0 at each row's first real token
    return ids.to(device), mask.to(device), positions.to(device)


@torch.inference_mode()
def sample_batch(
    model: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 200,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eot: int = EOT_TOKEN,
    stop_at_eot: bool = True,
    stop: Sequence[int] = (),
) -> list[Completion]:
    """Sample one completion per prompt (repeat a prompt in `prompts` for several samples), all in one batch.

    `eot` pads and ends a completion; `stop` are further ids that end one (a chat model's end of turn).
    `stop_at_eot=False` keeps sampling past end-of-text (benchmarks that need a fixed token count).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask, positions = left_pad(prompts, device, pad=eot)
    batch = ids.shape[0]
    cache = DynamicCache(config=model.config)
    logits = _forward(model, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max(max_new_tokens, 0)), eot, dtype=torch.long, device=device)
    one = torch.ones((batch, 1), dtype=mask.dtype, device=device)
    stops = torch.tensor(sorted({eot, *stop}), device=device)
    for step in range(max_new_tokens):
        token = next_tokens(logits, temperature, top_k, top_p, generator)
        out[:, step] = token
        if stop_at_eot:
            token = token.masked_fill(finished, eot)  # rows already done emit padding
            out[:, step] = token
            finished |= torch.isin(token, stops)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, one], dim=1)
        logits = _forward(model, cache, input_ids=token[:, None], attention_mask=mask, position_ids=next_pos)
        next_pos = next_pos + 1
    results = []
    ends = set(stops.tolist())
    for row in out.tolist():
        end = next((i for i, t in enumerate(row) if t in ends), len(row)) if stop_at_eot else len(row)
        results.append(Completion(tokens=row[:end], stopped=end < len(row)))
    return results


def output_layer(model: Any) -> tuple[Any, Any] | None:
    """(decoder, output layer) of a causal LM whose logits are the output layer applied to the decoder's last
    hidden state; None where the architecture does more (Gemma's logit soft-capping, a logit scale), whose
    logits then come from the model's own forward."""
    if architecture.logits_processing(architecture.hf_model(model).config) is not None:
        return None
    return architecture.decoder(model), architecture.output_layer(model)


@torch.inference_mode()
def token_logprobs(model: Any, sequences: list[list[int]], batch_size: int = 16) -> list[torch.Tensor]:
    """log p(token_i | tokens_<i) for i >= 1 of every sequence (float32, length len(seq) - 1).

    Sequences are right-padded within a batch (GPT-2's end-of-text, or id 0 in a smaller vocabulary: any valid
    id does); the causal mask means a real token never sees padding. The vocabulary projection runs one row at
    a time, in float32 even for a bf16 model (score differences are small numbers), so memory stays at one
    (T, V) matrix.
    """
    device = next(model.parameters()).device
    pad = EOT_TOKEN if architecture.hf_model(model).config.vocab_size > EOT_TOKEN else 0
    parts = output_layer(model)
    if parts is not None:
        decoder, head = parts
        weight = head.weight.float()  # (V, C)
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    results: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    for start in range(0, len(sequences), max(1, batch_size)):
        chunk = sequences[start : start + batch_size]
        if any(len(s) < 2 for s in chunk):
            raise FakegptError("a scored sequence needs at least one token after its context")
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        if parts is not None:
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, C)
        else:
            full = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V), the architecture's own logits
        for row, s in enumerate(chunk):
            n = len(s)
            if parts is not None:
                logits = hidden[row, : n - 1].float() @ weight.T  # (n-1, V)
                if bias is not None:
                    logits = logits + bias
            else:
                logits = full[row, : n - 1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[row, 1:n, None]).squeeze(-1)
            results[start + row] = logp.cpu()
    return results
