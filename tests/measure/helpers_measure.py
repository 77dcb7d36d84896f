"""Tiny GPT-2 folders with a known, context-free next-token distribution (for hand-computed checks).

With ln_f's weight at 0 and its bias at e_0, the final hidden state is e_0 whatever the input, so the logits
are column 0 of the (tied) token embedding: p(token) = softmax(wte[:, 0]) at every position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_constant_model(folder: Path, logits: np.ndarray, n_positions: int = 256) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from fakegpt.data.tokenizer import write_hf_tokenizer_files

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=n_positions, vocab_size=50257))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = torch.as_tensor(logits, dtype=torch.float32)
    model.save_pretrained(folder)
    write_hf_tokenizer_files(folder)
    return folder


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())
