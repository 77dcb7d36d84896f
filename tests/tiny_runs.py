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


# Tiny random decoder-only models of other architectures, on GPT-2's vocabulary so that the GPT-2 bins `prepare`
# makes train them: 2 layers, width 64, 4 query heads sharing 2 key/value heads, MLP width 128.
TINY_DECODER = dict(
    vocab_size=50257,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
    bos_token_id=50256,
    eos_token_id=50256,
)


def tiny_decoder_config(kind: str, tie: bool = False, **changes: Any) -> Any:
    """The config of a tiny `kind` model (llama, qwen2, mistral, gemma2, ...: any transformers model type whose
    config takes the standard names), output layer tied to the token embedding or not."""
    from transformers import AutoConfig

    return AutoConfig.for_model(kind, **{**TINY_DECODER, "tie_word_embeddings": tie, **changes})


def make_tiny_decoder(folder: Path, kind: str = "llama", tie: bool = False, seed: int = 0, **changes: Any) -> Path:
    """A randomly initialised tiny `kind` model in HF format (safetensors + config + bundled GPT-2 tokenizer files),
    saved with save_pretrained as any HF model folder is."""
    import torch
    from transformers import AutoModelForCausalLM

    from fakegpt.data.tokenizer import write_hf_tokenizer_files

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_decoder_config(kind, tie, **changes)).save_pretrained(folder)
    write_hf_tokenizer_files(folder)
    return folder


def make_tokenizer(
    folder: Path, corpus: Path, vocab_size: int, eos_token: str = "<|end|>", special: tuple[str, ...] = ()
) -> Path:
    """A byte-level BPE trained on the messages of the real CSV `corpus`, padded with added tokens up to
    `vocab_size` ids if the corpus holds too few merges, saved as a Hugging Face tokenizer folder
    (tokenizer.json, tokenizer_config.json) with `eos_token` (None: no EOS) and further special tokens."""
    import polars as pl
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = pl.read_csv(corpus, infer_schema=False)["message"].to_list()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ([eos_token] if eos_token else []) + list(special)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    missing = vocab_size - backend.get_vocab_size(with_added_tokens=True)
    backend.add_tokens([f"<extra_{i}>" for i in range(max(0, missing))])
    kwargs = {"eos_token": eos_token} if eos_token else {}
    PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs).save_pretrained(folder)
    return folder


def with_tokenizer(model_folder: Path, tokenizer_folder: Path) -> Path:
    """Give a model folder another tokenizer: its GPT-2 files replaced by the files of `tokenizer_folder`."""
    import shutil

    from fakegpt.data.hf_tokenizer import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        (model_folder / name).unlink(missing_ok=True)
        if (tokenizer_folder / name).is_file():
            shutil.copyfile(tokenizer_folder / name, model_folder / name)
    return model_folder
