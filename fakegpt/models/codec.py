"""Text to ids and back for one model: the measuring stages encode prompts and statements with the model's own
tokenizer, and decode its samples with it.

A model whose tokenizer files are GPT-2's (every fakegpt GPT-2 checkpoint, the hub's gpt2..gpt2-xl), or which
has none, is encoded by the bundled tiktoken GPT-2 BPE: the ids are the same, and it is what prepare and every
GPT-2 figure were made with. Any other model is encoded by the tokenizer in its folder (transformers' fast
tokenizer, which also carries the chat template an instruction-tuned model was trained with).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from fakegpt.data import hf_tokenizer
from fakegpt.data.tokenizer import EOT_TOKEN, VOCAB_SIZE, get_encoding
from fakegpt.errors import FakegptError, one_line

GPT2_SPECIAL = {"<|endoftext|>"}


class Codec:
    """The GPT-2 codec (tiktoken); `HFCodec` is any other tokenizer."""

    name = "gpt2"
    chat_template = False

    def __init__(self) -> None:
        self._enc = get_encoding()
        self.eos = EOT_TOKEN
        self.vocab_size = VOCAB_SIZE

    def encode(self, text: str, special: bool = False) -> list[int]:
        """The ids of `text`, no special tokens added; `special` reads "<|endoftext|>" in it as that token."""
        return self._enc.encode(text, allowed_special=GPT2_SPECIAL if special else set())

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The UTF-8 bytes the ids stand for (what bits per byte counts)."""
        return self._enc.decode_bytes(ids)

    def token_bytes(self, ids: list[int]) -> list[int]:
        """How many bytes of the text each id stands for (byte-level BPE: each token's own bytes)."""
        return [len(self._enc.decode_bytes([t])) for t in ids]

    @property
    def start(self) -> list[int]:
        """What a text is scored after: the document boundary the model was trained with (GPT-2: end-of-text)."""
        return [self.eos]

    def chat(self, text: str) -> list[int]:
        raise FakegptError(f"tokenizer {self.name}: no chat template")


class HFCodec(Codec):
    """A model's own Hugging Face tokenizer (the folder's tokenizer.json and tokenizer_config.json)."""

    def __init__(self, folder: Path, name: str) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # transformers raises many types for a broken folder
            raise FakegptError(f"{folder}: cannot load its tokenizer ({one_line(exc)})") from None
        if self._tok.eos_token_id is None:
            raise FakegptError(f"{folder}: the tokenizer has no EOS token (eos_token in tokenizer_config.json)")
        self.name = name
        self.eos = int(self._tok.eos_token_id)
        self.vocab_size = len(self._tok)
        self.chat_template = bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, special: bool = False) -> list[int]:
        if special:
            return list(self._tok.encode(text, add_special_tokens=False))
        # special-token text in a prompt or statement is text, as it is for GPT-2 by default
        return list(self._tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def token_bytes(self, ids: list[int]) -> list[int]:
        """How many bytes each id adds to the decoded text: differences of the growing prefix's decoding, since
        a sentencepiece token's leading space only appears after another token."""
        sizes, before = [], 0
        for i in range(1, len(ids) + 1):
            now = len(self.decode_bytes(ids[:i]))
            sizes.append(now - before)
            before = now
        return sizes

    @property
    def start(self) -> list[int]:
        """BOS where the tokenizer has one (Llama, Gemma: documents start with it), else EOS (GPT-2-like)."""
        bos = self._tok.bos_token_id
        return [int(bos)] if bos is not None else [self.eos]

    def chat(self, text: str) -> list[int]:
        """`text` as the user's turn of a conversation, ready for the assistant's answer (its chat template)."""
        if not self.chat_template:
            raise FakegptError(f"tokenizer {self.name}: no chat template")
        ids = self._tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@functools.lru_cache(maxsize=8)
def _codec(folder: str, name: str) -> Codec:
    identity = hf_tokenizer.identify(folder, name, f"model {name}")
    return Codec() if identity.is_gpt2 else HFCodec(Path(folder), name)


def codec_for(folder: str | Path, name: str = "") -> Codec:
    """The codec of the model in `folder` (`name` is how messages name it)."""
    return _codec(str(folder), name or str(folder))


def describe(codec: Codec) -> dict[str, Any]:
    """The tokenizer as runs are tagged with it."""
    return {"tokenizer": codec.name, "vocab_size": codec.vocab_size, "eos": codec.eos}
