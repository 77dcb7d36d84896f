"""Loading and saving GPT-2 models (transformers' GPT2LMHeadModel) without surprises offline.

A model spec is a hub name (`gpt2` ... `gpt2-xl`), or a local HF-format folder. A hub name with no local cache
and no network fails within seconds with a message saying what to do, instead of transformers' ~23 s of
retries per file. Checkpoint folders always carry the bundled tokenizer files, so they load anywhere.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from fakegpt.errors import FakegptError
from fakegpt.tokenizer import VOCAB_SIZE

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Files a checkpoint folder holds (weights, config, generation defaults, bundled tokenizer).
CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "model.safetensors",
    "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
    "training_info.json",  # written by `fakegpt finetune`: init_from, config, data meta.json, iter, val_loss
)


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
        return str(path)
    if spec not in HUB_MODELS and "/" not in spec:
        raise FakegptError(
            f"{spec!r} is neither a local model folder nor a known hub name ({', '.join(HUB_MODELS)})"
        )
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "generation_config.json", "*.safetensors", "vocab.json", "merges.txt",
                "tokenizer_config.json", "tokenizer.json"]
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


def load_model(spec: str, dtype: Any = None, device: str | None = None, **kwargs: Any):
    """GPT2LMHeadModel from a hub name or local folder, with SDPA attention."""
    from transformers import GPT2LMHeadModel

    folder = resolve_pretrained(spec)
    try:
        model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise FakegptError(f"{spec}: cannot load model ({exc})") from None
    if device is not None:
        model.to(device)
    return model


def save_checkpoint(model: Any, folder: str | Path, extra_json: dict[str, Any] | None = None) -> Path:
    """Save `model` as an HF-format folder (safetensors + config + tokenizer files), atomically.

    `extra_json` maps file names to JSON-able data written inside the same folder before it is swapped in
    (finetune's training_info.json), so the folder and its description never disagree.
    """
    import json

    from transformers.utils import logging as hf_logging

    from fakegpt.io import atomic_dir
    from fakegpt.tokenizer import write_hf_tokenizer_files

    folder = Path(folder)
    unwrapped = getattr(model, "module", model)  # DDP
    unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)  # torch.compile
    with atomic_dir(folder) as tmp:
        # mkdtemp makes the folder private (0700); a checkpoint is shared like any other output
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        hf_logging.disable_progress_bar()  # "Writing model shards" at every save would flood the log
        try:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
        finally:
            hf_logging.enable_progress_bar()
        write_hf_tokenizer_files(tmp)
        for name, data in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    return folder


def dropout_overrides(dropout: float) -> dict[str, float]:
    """GPT2Config fields that set every dropout rate (pretrained GPT-2 configs ship 0.1; fine-tunes use 0)."""
    return {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}


def scratch_model(n_layer: int, n_head: int, n_embd: int, block_size: int, dropout: float = 0.0, dtype: Any = None):
    """A randomly initialised GPT2LMHeadModel (GPT-2 vocabulary, SDPA attention) for tests, demos, benchmarks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise FakegptError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
        **dropout_overrides(dropout),
    )
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config)
    return model.to(dtype) if dtype is not None else model


def use_fused_gelu(model: Any) -> Any:
    """Swap GPT-2's "gelu_new" (a Python formula: ~8 elementwise kernels forward, more backward) for PyTorch's
    one-kernel tanh GELU. Both compute 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), so the weights and the
    saved config are unchanged; only the number of passes over the MLP activations drops."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for block in model.transformer.h:
        if isinstance(block.mlp.act, NewGELUActivation):
            block.mlp.act = GELUTanh()
    return model


def num_params(model: Any, non_embedding: bool = True) -> int:
    """Parameter count; without the position embeddings when `non_embedding` (the token embedding is tied to
    the output layer and does compute, so it stays in, as in nanoGPT's estimate)."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.transformer.wpe.weight.numel()
    return n


def flops_per_token(model: Any, block_size: int) -> float:
    """Training FLOPs per token (forward + backward): 6N + 12·L·H·Q·T (PaLM appendix B, as nanoGPT)."""
    cfg = model.config
    return 6 * num_params(model) + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * block_size


class _LinearCrossEntropy:
    """Output layer + mean cross-entropy in one autograd node (defined lazily so importing model.py is cheap)."""

    fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.fn is None:
            cls.fn = _make_linear_cross_entropy()
        return cls.fn


def _make_linear_cross_entropy() -> Any:
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """loss = mean CE(h @ W.T, y), keeping one (N, V) float buffer instead of four.

        The stock path writes the logits, then log_softmax's output, then in backward a one-hot gradient and
        log_softmax's gradient: four passes over N x 50257 floats, which dominate a small model's step on CPU.
        Here the logits buffer is turned in place into dloss/dlogits = (softmax - onehot) / N during the
        forward pass and saved for backward, which is then just the two matmuls.
        """

        @staticmethod
        def forward(ctx, h, weight, targets):  # h (N, C), weight (V, C), targets (N,)
            logits = h @ weight.t()  # (N, V)
            if logits.dtype != torch.float32:
                logits = logits.float()
            n = logits.shape[0]
            rows = torch.arange(n, device=logits.device)
            target_logit = logits[rows, targets]  # (N,)
            peak = logits.amax(dim=1, keepdim=True)  # (N, 1) for a stable softmax
            logits.sub_(peak).exp_()
            total = logits.sum(dim=1)  # (N,)
            loss = (total.log() + peak.squeeze(1) - target_logit).mean()
            grad = logits.mul_((1.0 / (total * n)).unsqueeze(1))  # softmax / N, in one pass
            grad[rows, targets] -= 1.0 / n
            ctx.save_for_backward(h, weight, grad.to(h.dtype))
            return loss

        @staticmethod
        def backward(ctx, grad_out):
            h, weight, grad = ctx.saved_tensors
            # grad_out is a scalar (1/accumulation steps, or a scaler's factor): scale the small results only
            dh = (grad @ weight) * grad_out.to(h.dtype)  # (N, C)
            dw = (grad.t() @ h) * grad_out.to(h.dtype)  # (V, C)
            return dh, dw, None

    return LinearCrossEntropy


def causal_lm_loss(model: Any, x: Any, y: Any, fused: bool = True) -> Any:
    """Mean next-token cross-entropy of GPT2LMHeadModel `model` on inputs x (B, T), targets y (B, T).

    x and y come pre-shifted (windows of block_size + 1 tokens), so no label shifting or -100 masking is
    needed. `fused` uses the one-buffer output layer + loss above (eager mode); otherwise the plain
    logits + F.cross_entropy, which torch.compile fuses on its own.
    """
    import torch.nn.functional as F

    core = getattr(model, "module", model)
    h = core.transformer(input_ids=x, use_cache=False).last_hidden_state  # (B, T, C)
    h = h.reshape(-1, h.shape[-1])  # (B*T, C)
    weight = core.lm_head.weight  # (V, C), tied to the token embedding
    if fused and core.training:
        return _LinearCrossEntropy.get().apply(h, weight, y.reshape(-1))
    logits = h @ weight.t()  # (B*T, V)
    return F.cross_entropy(logits.float(), y.reshape(-1))
