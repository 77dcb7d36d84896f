"""The batched decoder and the scorer on rotary-position architectures as on GPT-2: greedy output equals
transformers' own `generate` prompt by prompt, and token log-probabilities equal the model's own logits."""

from __future__ import annotations

import pytest
import torch

from fakegpt.measure.generate import sample_batch, token_logprobs

VOCAB = 1000


def _model(kind: str):
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=64, n_positions=128))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**small, **heads, tie_word_embeddings=False))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**small, **heads, tie_word_embeddings=True))
    else:  # logit soft-capping: the scorer takes the model's own logits
        model = Gemma2ForCausalLM(Gemma2Config(**small, **heads, head_dim=16, final_logit_softcapping=5.0))
    model.config._attn_implementation = "eager" if kind == "gemma2" else "sdpa"  # SDPA has no attention softcap
    return model.eval()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(5, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "gemma2"])
def test_greedy_batched_decoding_with_left_padding_equals_generate_prompt_by_prompt(kind):
    model = _model(kind)
    prompts = _prompts()
    got = sample_batch(model, prompts, max_new_tokens=12, temperature=0.0, eot=0, stop_at_eot=False)
    for prompt, completion in zip(prompts, got, strict=True):
        ids = torch.tensor([prompt])
        want = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert completion.tokens == want


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "gemma2"])
def test_token_logprobs_equal_the_model_s_own_logits(kind):
    model = _model(kind)
    sequences = [p + [7, 8] for p in _prompts()]  # different lengths: right padding inside the batch
    got = token_logprobs(model, sequences, batch_size=3)
    for seq, logp in zip(sequences, got, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, :-1].float()
        want = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
        assert torch.allclose(logp, want, atol=1e-4)
