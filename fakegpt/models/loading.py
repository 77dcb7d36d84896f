"""Loading and saving causal language models (what transformers' AutoModelForCausalLM builds) without surprises
offline.

A model spec is a hub name (`gpt2` ... `gpt2-xl`, or `owner/name` of any causal LM), or a local HF-format
folder. A hub name with no local cache and no network fails within seconds with a message saying what to do,
instead of transformers' ~23 s of retries per file. Checkpoint folders always carry the bundled tokenizer
files, so they load anywhere. An architecture fakegpt cannot train (an encoder, an encoder-decoder) is a
one-line error naming the folder and the architecture (`fakegpt.models.architecture.check_trainable`), before
any weights are read. `scratch` is a tiny random GPT-2 (`scratch_model`).

transformers and huggingface_hub are imported inside the functions that use them: importing transformers
costs about 2 s, which `fakegpt STAGE --help` and a stage's up-front checks should not pay.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from fakegpt.data.tokenizer import VOCAB_SIZE, write_hf_tokenizer_files
from fakegpt.errors import FakegptError, one_line
from fakegpt.files import atomic_dir, read_json_object
from fakegpt.models.architecture import build_config, causal_lm_class, check_trainable, describe, dropout_fields
from fakegpt.models.checkpoint import TrainingInfo
from fakegpt.models.checkpoint_io import fsync_files
from fakegpt.models.weights import WEIGHTS_NAME, WeightsFile, write_safetensors

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def tokenizer_spec(init_from: str) -> str:
    """prepare's --tokenizer for a model: `gpt2` (the bundled BPE) for a scratch model and the GPT-2 family
    (which need no tokenizer files in the cache before they are downloaded), else the model itself."""
    return "gpt2" if init_from == "scratch" or init_from in HUB_MODELS else init_from


log = logging.getLogger(__name__)


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = os.environ.get("FAKEGPT_HF_HOST", "huggingface.co")
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def resolve_pretrained(spec: str) -> str:
    """Return a local folder for `spec` (a folder path, or a hub name found in the cache or downloadable).

    Raises FakegptError within seconds when `spec` is a hub name that is neither cached nor reachable.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FakegptError(f"{spec}: not an HF model folder (no config.json)")
        check_model_files(path)
        return str(path)
    if spec not in HUB_MODELS and "/" not in spec:
        raise FakegptError(
            f"{spec!r} is neither a local model folder nor a hub name ({', '.join(HUB_MODELS)} or owner/name)"
        )
    from huggingface_hub import snapshot_download

    patterns = [
        "config.json",
        "generation_config.json",
        "*.safetensors",
        "*.safetensors.index.json",  # the map of a model sharded over several weight files
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "tokenizer.json",
    ]
    try:
        return snapshot_download(spec, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass  # not cached: download if we may and can
    if _offline() or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face hub is unreachable"
        raise FakegptError(
            f"model {spec!r} is not in the local Hugging Face cache and {why}; download it once on a machine "
            "with network (`huggingface-cli download " + spec + "`) and copy ~/.cache/huggingface, "
            "or pass a local model folder"
        )
    try:
        return snapshot_download(spec, allow_patterns=patterns)
    except Exception as exc:
        raise FakegptError(f"model {spec!r}: download from the Hugging Face hub failed ({exc})") from None


def model_config(folder: str | Path) -> dict[str, Any]:
    """FOLDER/config.json as a mapping, with the numbers fakegpt relies on checked; a one-line error otherwise."""
    path = Path(folder) / "config.json"
    data = read_json_object(path)
    if not data:
        raise FakegptError(f"{path}: missing or empty (not an HF model folder)")
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise FakegptError(f"{path}: {key} must be a positive integer, got {value!r}")
    return data


def check_model_files(folder: str | Path) -> None:
    """Read config.json and the header of every *.safetensors file in `folder` (no weights are loaded), so an
    interrupted copy or a damaged file is a one-line error naming it before any work starts."""
    folder = Path(folder)
    model_config(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("*.bin")):
        raise FakegptError(f"{folder}: no model weights (model.safetensors)")
    from safetensors import safe_open

    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # SafetensorError and OSError: truncated, garbled header, unreadable
            raise FakegptError(
                f"{path}: damaged or incomplete model weights ({one_line(exc)}); copy or save the model again"
            ) from None


def load_config(folder: str | Path) -> Any:
    """The transformers config of a model folder, checked to be an architecture fakegpt can train."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # an unknown model_type, a config that needs remote code, a damaged file
        raise FakegptError(f"{folder}: cannot read the model's config ({one_line(exc)})") from None
    check_trainable(config, str(folder))
    return config


def attention_for(model_class: type[Any]) -> str:
    """SDPA attention where the architecture has it; eager (logged) where transformers has no SDPA for it
    (Gemma2's soft-capped attention scores, for example)."""
    if getattr(model_class, "_supports_sdpa", False):
        return "sdpa"
    log.info("%s has no SDPA attention in transformers: using eager attention", model_class.__name__)
    return "eager"


def load_model(
    spec: str, dtype: Any = None, device: str | None = None, dropout: float | None = None, four_bit: Any = None
):
    """The causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...) of a hub name or local folder, with SDPA attention
    where the architecture has it. `dropout`: every dropout rate of the config set to this (pretrained configs
    ship 0.1 for GPT-2; fine-tunes use 0). `four_bit`: the compute dtype of a base held in 4-bit NF4 by
    bitsandbytes (QLoRA: every linear layer but the output layer quantized as it loads, on `device`)."""
    folder = resolve_pretrained(spec)
    config = load_config(folder)
    if dropout is not None:
        for name, value in dropout_overrides(dropout, config).items():
            setattr(config, name, value)
    model_class = causal_lm_class(config)
    extra: dict[str, Any] = {}
    if four_bit is not None:
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # the quantization constants quantized too: ~0.4 bits/weight less
            bnb_4bit_compute_dtype=four_bit,
        )
        extra["device_map"] = {"": device or "cpu"}  # bitsandbytes quantizes the weights where they are put
    try:
        model = model_class.from_pretrained(
            folder, config=config, attn_implementation=attention_for(model_class), dtype=dtype, **extra
        )
    except FakegptError:
        raise
    except Exception as exc:  # damaged weights or config, shapes that do not match the config, ...
        raise FakegptError(f"{folder}: cannot load the model {describe(config)} ({one_line(exc)})") from None
    if device is not None and four_bit is None:  # a quantized model is placed as it loads, and cannot move
        model.to(device)
    return model


def save_checkpoint(
    model: Any,
    folder: str | Path,
    info: TrainingInfo | None = None,
    state_dict: dict | None = None,
    durable: bool = False,
    tokenizer_from: str | Path | None = None,
) -> WeightsFile:
    """Save `model` as an HF-format folder (safetensors + config + tokenizer files), atomically; returns its
    weights file (final path, size, CRC-32).

    The folder is what `save_pretrained` writes (config.json and generation_config.json by transformers itself,
    tied weights left out by its own rule), but the weights go straight to the disk through
    `fakegpt.models.weights` (byte-identical to safetensors' file; see there for why). `info` (finetune's
    training_info.json) is written inside the same folder before it is swapped in, so the weights and their
    description never disagree. `state_dict`: save these weights (a snapshot taken earlier) with `model`'s
    configuration, instead of the model's current ones. `durable`: fsync the small files and the folder too
    (the weights file always is), so the folder survives a machine crash, not only a killed process.
    `tokenizer_from`: a folder whose tokenizer files the checkpoint carries (the model's own tokenizer); none,
    or GPT-2's, means the bundled GPT-2 files.
    """
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    folder = Path(folder)
    unwrapped = getattr(model, "module", model)  # DDP
    unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)  # torch.compile
    # a shallow copy: transformers deletes the tied names from the dict it is given (the caller's snapshot stays)
    weights = remove_tied_weights_from_state_dict(
        dict(unwrapped.state_dict() if state_dict is None else state_dict), unwrapped
    )
    with atomic_dir(folder) as tmp:
        written = write_safetensors(weights, tmp / WEIGHTS_NAME, {"format": "pt"})
        # what save_pretrained records beside the weights
        config = copy.deepcopy(unwrapped.config)
        floats = [t for t in weights.values() if t.is_floating_point()]
        config.dtype = str(floats[0].dtype if floats else unwrapped.dtype).split(".")[1]
        config.architectures = [type(unwrapped).__name__]
        if hasattr(config, "quantization_config"):  # a QLoRA base: the merged checkpoint is a plain model
            del config.quantization_config
        config.save_pretrained(tmp)
        if unwrapped.can_generate():
            unwrapped.generation_config.save_pretrained(tmp)
        copy_tokenizer_files(tokenizer_from, tmp)
        if info is not None:
            info.write(tmp)
        if durable:
            fsync_files(tmp)
    return WeightsFile(folder / WEIGHTS_NAME, written.size, written.crc32)


def copy_tokenizer_files(source: str | Path | None, folder: Path) -> None:
    """Put a model's tokenizer into `folder`: the files of `source` when it holds a tokenizer other than GPT-2's,
    else the bundled GPT-2 files (what every fakegpt checkpoint of a GPT-2 has carried)."""
    from fakegpt.data import hf_tokenizer

    if source is not None and Path(source).is_dir():
        if not hf_tokenizer.identify(source, str(source), "the model's tokenizer").is_gpt2:
            for name in hf_tokenizer.TOKENIZER_FILES:
                if (Path(source) / name).is_file():
                    shutil.copyfile(Path(source) / name, folder / name)
            return
    write_hf_tokenizer_files(folder)


def dropout_overrides(dropout: float, config: Any = None) -> dict[str, float]:
    """The config fields that set every dropout rate of `config`'s architecture (`architecture.dropout_fields`);
    without a config, GPT2Config's (pretrained GPT-2 configs ship 0.1; fine-tunes use 0)."""
    names = dropout_fields(config) if config is not None else ["resid_pdrop", "embd_pdrop", "attn_pdrop"]
    return dict.fromkeys(names, dropout)


def scratch_model(n_layer: int, n_head: int, n_embd: int, block_size: int, dropout: float = 0.0, dtype: Any = None):
    """A randomly initialised GPT2LMHeadModel (GPT-2 vocabulary, SDPA attention) for tests, demos, benchmarks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise FakegptError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=block_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        **dropout_overrides(dropout),
    )
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config)
    return model.to(dtype) if dtype is not None else model


def model_from_config(hf_config: dict[str, Any], where: str = "the model's config"):
    """The model's own causal-LM class (GPT2LMHeadModel, LlamaForCausalLM, ...) of the shape an HF config dict
    describes, weights to be loaded after (resume, the meta device of --plan), SDPA attention where the
    architecture has it. A dict without model_type is GPT-2's. `where`: what the error names."""
    config = build_config(hf_config, where)
    check_trainable(config, where)
    model_class = causal_lm_class(config)
    config._attn_implementation = attention_for(model_class)
    return model_class(config)


def use_fused_gelu(model: Any) -> Any:
    """Swap transformers' "gelu_new" (GPT-2's; a Python formula: ~8 elementwise kernels forward, more backward)
    for PyTorch's one-kernel tanh GELU wherever the model has it. Both compute
    0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), so the weights and the saved config are unchanged; only the
    number of passes over the MLP activations drops."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
    return model


def load_tokenizer(folder: str | Path) -> Any:
    """The HF tokenizer of a checkpoint folder (its bundled tokenizer files), for libraries that want one
    (MLflow's transformers flavour); fakegpt itself tokenizes with tiktoken."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise FakegptError(f"{folder}: cannot load its tokenizer ({one_line(exc)})") from None
