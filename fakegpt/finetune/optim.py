"""The optimizer of `fakegpt finetune`: AdamW with fp32 states (torch) or 8-bit states (bitsandbytes).

`--optimizer adamw8bit` keeps AdamW's two moments as uint8 codes with an fp32 scale per 256-element block
(bitsandbytes' blockwise dynamic quantisation): about 2 bytes per parameter instead of 8, which is what lets a
full gpt2-xl fine-tune fit a 24 GB card with gradient checkpointing (`fakegpt finetune --plan`). Tensors with
fewer than `MIN_8BIT_SIZE` elements (biases, LayerNorm gains) keep fp32 moments, as bitsandbytes decides.
Its state dict holds plain tensors and numbers, so the resume state saves and loads it like torch's.
bitsandbytes is the optional extra `fakegpt[lowmem]`; it is imported only when asked for.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from fakegpt.errors import FakegptError

MISSING = "--optimizer adamw8bit needs bitsandbytes, which is not installed: pip install 'fakegpt[lowmem]'"
MIN_8BIT_SIZE = 4096  # bitsandbytes' default min_8bit_size: smaller tensors keep fp32 states
BLOCK = 256  # bitsandbytes' blockwise quantisation block (one fp32 absmax per block per moment)
QMAP_BYTES = 2 * 256 * 4  # the two 256-entry fp32 code maps, shared by all 8-bit tensors of an optimizer


def require_bitsandbytes() -> None:
    """A one-line error when bitsandbytes is not installed (found without importing it: that takes seconds)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FakegptError(MISSING)


def _bitsandbytes() -> Any:
    require_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError:
        raise FakegptError(MISSING) from None
    return bitsandbytes


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weight decay on matrices only (nanoGPT), not on biases/LayerNorm."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build(
    model: torch.nn.Module, name: str, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW (`adamw`) or bitsandbytes' AdamW8bit (`adamw8bit`) over the model's trainable parameters."""
    groups = param_groups(model, weight_decay)
    if name == "adamw8bit":
        bnb = _bitsandbytes()
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, min_8bit_size=MIN_8BIT_SIZE)
    if name != "adamw":
        raise FakegptError(f"--optimizer: expected adamw | adamw8bit, got {name!r}")
    # fused: one kernel over all parameters, on CUDA and (torch >= 2.4) on the CPU, where it is several times
    # faster than the default multi-tensor loop (tools/bench_train.py).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def state_bytes(numels: list[int], name: str) -> int:
    """Bytes of optimizer state for trainable tensors of these sizes, as the optimizer allocates them after its
    first step: AdamW two fp32 moments (8 B/element); AdamW8bit two uint8 moments + two fp32 absmax per
    256-element block for tensors of >= 4096 elements (fp32 moments below that), plus its two shared code maps.
    The step counters (Python numbers, or one scalar per tensor) are left out."""
    if name == "adamw":
        return 8 * sum(numels)
    total, any_8bit = 0, False
    for n in numels:
        if n >= MIN_8BIT_SIZE:
            total += 2 * n + 2 * 4 * -(-n // BLOCK)
            any_8bit = True
        else:
            total += 8 * n
    return total + (QMAP_BYTES if any_8bit else 0)
