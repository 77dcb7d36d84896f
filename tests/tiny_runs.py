"""The tiny fine-tune the tests run: a 2-layer, 64-wide GPT-2 from scratch on 32-token windows, on the CPU.

Importable from any test (pytest puts tests/ on sys.path with its conftest.py): `tiny_config(data, out, **changes)`,
`make_tiny_model(folder)`. (Not in a conftest.py: two of them, tests/ and tests/finetune/, make `from conftest
import ...` ambiguous.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fakegpt.finetune.config import FinetuneConfig

# two CPU processes under torchrun (gloo): append a script, or `-m fakegpt finetune ...`
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TINY_SHAPE = dict(init_from="scratch", n_layer=2, n_head=2, n_embd=64, block_size=32)


def tiny_config(data_dir: str | Path, out_dir: str | Path, **changes: Any) -> FinetuneConfig:
    """A seconds-long finetune configuration: 25 iterations of 2 x 2 windows, evaluated every 10."""
    values: dict[str, Any] = dict(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        **TINY_SHAPE,
        batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        max_iters=25,
        eval_interval=10,
        eval_iters=2,
        device="cpu",
        seed=0,
    )
    values.update(changes)
    return FinetuneConfig(**values)


def make_tiny_model(
    folder: Path, n_layer: int = 2, n_head: int = 2, n_embd: int = 64, n_positions: int = 256, seed: int = 0
) -> Path:
    """A randomly initialised GPT-2 in HF format (safetensors + config + bundled tokenizer files)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from fakegpt.data.tokenizer import write_hf_tokenizer_files

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(folder)
    write_hf_tokenizer_files(folder)
    return folder
