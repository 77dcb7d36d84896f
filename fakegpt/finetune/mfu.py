"""Model-FLOPs utilisation (MFU): training FLOPs per token, and the peak dense FLOP/s of the card in use.

Figures are the vendors' dense (no sparsity) tensor-core peaks. An unknown card gives None (MFU is then not
logged rather than computed against a wrong peak); FAKEGPT_PEAK_TFLOPS overrides the table.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fakegpt.models.architecture import head_dim, hf_model, lookup_embeddings

# (substring of torch.cuda.get_device_name(), bf16/fp16 TFLOP/s, tf32 TFLOP/s); most specific first.
_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.0, 494.0),
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.0, 494.0),  # SXM
    ("GH200", 989.0, 494.0),
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
    ("A10G", 70.0, 35.0),  # AWS variant of the A10
    ("A10", 125.0, 62.5),
    ("A6000", 155.0, 77.4),
    ("V100", 125.0, 15.7),  # fp16 tensor cores; no bf16/tf32 (fp32 given)
    ("T4", 65.0, 8.1),
    ("4090", 165.0, 82.6),
    ("3090", 71.0, 35.6),
)


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Dense peak FLOP/s of `device` for training in `dtype` (bfloat16/float16 or float32 via TF32)."""
    override = os.environ.get("FAKEGPT_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in _PEAKS:
        if key in name:
            return (half if dtype in ("bfloat16", "float16") else tf32) * 1e12
    return None


def num_params(model: Any, non_embedding: bool = True) -> int:
    """Parameter count; without the embeddings that are only looked up when `non_embedding` (learned position
    embeddings, and a token embedding not tied to the output layer: `architecture.lookup_embeddings`). A tied
    token embedding is the output layer's matmul and stays in, as in nanoGPT's estimate."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= sum(p.numel() for p in lookup_embeddings(model))
    return n


def flops_per_token(model: Any, block_size: int) -> float:
    """Training FLOPs per token (forward + backward): 6N + 12·L·H·Q·T (PaLM appendix B, as nanoGPT), from the
    model's own config (num_hidden_layers, num_attention_heads, head_dim: GPT-2's n_layer, n_head,
    n_embd / n_head). A frozen weight (--method lora's base) costs 4 per token, not 6: forward and input
    gradient, no weight gradient. A sliding attention window (Mistral, Gemma2) is not counted: the attention
    term is that of full attention."""
    cfg = hf_model(model).config
    lookups = lookup_embeddings(model)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen -= sum(p.numel() for p in lookups if not p.requires_grad)  # not counted in N either
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim(cfg) * block_size
    return 6 * num_params(model) - 2 * frozen + attention
