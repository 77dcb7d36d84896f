"""Benchmark: fakegpt's batched KV-cache sampler vs the original one-prompt-one-sample-no-cache loop.

    python tools/bench_sample.py                 # CPU, the default sizes
    python tools/bench_sample.py --device cuda   # same grid on a GPU (bf16 for fakegpt's sampler)

Both run in this process on the same scratch weights (4 layers, 4 heads, 256 embedding, context 512) over a
grid of 12 prompts x 3 samples x 64 new tokens at temperature 0.8, top-k 200, and print new tokens/s and the
ratio. Neither stops at end-of-text, so both produce exactly the same number of tokens. Add `--generate` to
also time transformers' `model.generate` on all sequences at once.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fakegpt.data.tokenizer import EOT_TOKEN, get_encoding
from fakegpt.measure.generate import sample_batch
from fakegpt.models.device import resolve_device, resolve_dtype, torch_dtype

PROMPTS = [
    "As vacinas contra a COVID-19 são",
    "Is it true that the vaccines",
    "Dizem que a vacina altera o DNA, mas",
    "The death counts during the pandemic",
    "A vacina tem um chip?",
    "Vaccines do not cause cancer:",
    "Quem se beneficia com a vacinação",
    "The new vaccines were tested",
    "É verdade que as vacinas causam",
    "Scientists agree that",
    "O governo quer",
    "Bill Gates and the vaccine",
]


def original_loop(
    model: GPT2LMHeadModel,
    prompts: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
) -> int:
    """The study's loop (nanoGPT's `generate`): whole context re-run each step, full-vocabulary softmax.

    Like nanoGPT's model at inference, only the last position goes through the vocabulary projection.
    """
    produced = 0
    for prompt in prompts:
        for _ in range(num_samples):
            idx = torch.tensor([prompt], dtype=torch.long)
            for _ in range(max_new_tokens):
                logits = model(idx, logits_to_keep=1).logits[:, -1, :] / temperature
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
                probs = torch.softmax(logits, dim=-1)
                idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
                produced += 1
    return produced


def fakegpt_grid(
    model: GPT2LMHeadModel,
    prompts: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    batch_size: int,
) -> int:
    rows = [p for p in prompts for _ in range(num_samples)]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    produced = 0
    for start in range(0, len(rows), batch_size):
        # never stop early at end-of-text, so the token count equals the original loop's
        out = sample_batch(
            model,
            rows[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            generator=gen,
            stop_at_eot=False,
        )
        produced += sum(len(c.tokens) for c in out)
    return produced


def hf_generate(
    model: GPT2LMHeadModel,
    prompts: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
) -> int:
    rows = [p for p in prompts for _ in range(num_samples)]
    width = max(len(p) for p in rows)
    ids = torch.tensor([[EOT_TOKEN] * (width - len(p)) + p for p in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=model.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        pad_token_id=EOT_TOKEN,
    )
    return (out.shape[1] - width) * out.shape[0]


def timed(fn, *args) -> tuple[int, float]:
    start = time.perf_counter()
    n = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=36)
    parser.add_argument("--skip-original", action="store_true", help="only time fakegpt's sampler")
    parser.add_argument("--generate", action="store_true", help="also time transformers' model.generate")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each figure shows up as soon as it is measured
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=512, vocab_size=50257)
    base = GPT2LMHeadModel(config).eval().to(device)
    dtype = torch_dtype(resolve_dtype("auto", device))
    fast = base if device.type == "cpu" else GPT2LMHeadModel(config).to(device, dtype).eval()
    if fast is not base:
        fast.load_state_dict(base.state_dict())
    enc = get_encoding()
    prompts = [enc.encode(p) for p in PROMPTS]
    grid = (args.samples, args.max_new_tokens, 0.8, 200)
    print(
        f"device={device} threads={torch.get_num_threads()} grid={len(prompts)} prompts x {args.samples} "
        f"samples x {args.max_new_tokens} new tokens, T=0.8, top-k 200, batch {args.batch_size}"
    )
    with torch.inference_mode():
        fakegpt_grid(fast, prompts[:2], 1, 4, 0.8, 200, args.batch_size)  # warm-up (allocator, kernels)
        n_fast, t_fast = timed(fakegpt_grid, fast, prompts, *grid, args.batch_size)
        report("fakegpt grid sampler (KV cache, top-k first)", n_fast, t_fast)
        if args.generate:
            report("transformers generate (all rows at once)", *timed(hf_generate, fast, prompts, *grid))
        if args.skip_original:
            return
        n_orig, t_orig = timed(original_loop, base, prompts, *grid)
        report("original loop (no cache, one at a time)", n_orig, t_orig)
        # time fakegpt's sampler again after the long original run and pool both runs: on a shared machine
        # the load drifts, and bracketing the original run in time keeps the ratio fair
        n_again, t_again = timed(fakegpt_grid, fast, prompts, *grid, args.batch_size)
        report("fakegpt grid sampler, second run", n_again, t_again)
        pooled = (n_fast + n_again) / (t_fast + t_again)
        print(
            f"speed-up: {pooled / (n_orig / t_orig):.1f}x (fakegpt {pooled:,.0f} new tokens/s over both runs, "
            f"original {n_orig / t_orig:,.0f})"
        )


def report(name: str, tokens: int, seconds: float) -> None:
    print(f"{name + ':':<48}{tokens} tokens in {seconds:6.2f}s = {tokens / seconds:8,.0f} new tokens/s")


if __name__ == "__main__":
    main()
