"""`--method lora`: low-rank adapters (peft's LoRA) on a frozen GPT-2, saved merged as a plain HF model.

`wrap` puts peft adapters on the modules named by `--lora-targets` (GPT-2's Conv1D layers, whose weight is
stored (in, out), hence `fan_in_fan_out=True`); every other weight is frozen, so the optimizer (which takes only
parameters that require grad) sees the adapters alone. What is saved:
- the resume state's model.pt holds only the adapter tensors (`adapter_state`); on resume the base model is
  loaded again from the run's init_from, checked against the shape and a checksum of its weights saved with
  the state (`check_base`, `check_base_sum`), and the adapters are put back (`load_adapter_state`);
- the best model OUT/checkpoint/ is written merged, W + (alpha/r)·(B·A)ᵀ, with plain GPT-2 key names
  (`merged_state`), so `sample`, `score`, `chat` and transformers load it unchanged. The merge is computed
  into new tensors: the model being trained is never modified (peft's `merge_and_unload` would);
- OUT/adapter/ (`ADAPTER_DIR`) beside it: the same iteration's adapters in peft's `save_pretrained` format
  (adapter_config.json + adapter_model.safetensors, loadable with `PeftModel.from_pretrained(base, folder)`),
  plus its training_info.json.

peft is imported inside the functions: a full fine-tune never pays for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fakegpt.errors import FakegptError
from fakegpt.files import atomic_dir
from fakegpt.finetune.checks import lora_targets
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.models.checkpoint import ADAPTER_DIR, TrainingInfo

ADAPTER = "default"  # peft's adapter name
BASE_SUM_KEY = "lora_base_sum"  # in state.json's extra keys
SHAPE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


def _import_peft() -> None:
    """Import peft with the warnings of its optional back-ends silenced (bitsandbytes' and torchao's kernels,
    which a LoRA run never uses, log several lines at import)."""
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import peft  # noqa: F401
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def wrap(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """`model` (a GPT2LMHeadModel) with LoRA adapters on the target modules; only the adapters train."""
    _import_peft()
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(cfg)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise FakegptError(
            f"--lora-targets: no module named {', '.join(missing)} in the model (GPT-2 has c_attn, c_proj, c_fc)"
        )
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights (in, out)
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):  # lora_A's random init from --seed: the same run twice is the same
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, config, adapter_name=ADAPTER)


def is_lora(model: Any) -> bool:
    """True for a model wrapped by `wrap` (a peft PeftModel)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model: Any) -> Any:
    """The GPT2LMHeadModel inside a PeftModel (its config is the plain GPT-2 one; its save_pretrained writes HF)."""
    return model.get_base_model() if is_lora(model) else model


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable tensors (the adapters) by their names in the PeftModel: what the resume state holds."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def state_extra(model: Any) -> dict[str, Any]:
    """What a LoRA resume state records beside the adapters: a checksum of the frozen base weights ([float64 sum,
    sum of absolute values] over every frozen tensor), so a resume on a base model that changed on disk is
    refused. {} for a full fine-tune."""
    if not is_lora(model):
        return {}
    total = magnitude = 0.0
    for p in model.parameters():  # one tensor at a time: a float64 copy of all of gpt2-xl would be 12 GB
        if not p.requires_grad:
            x = p.detach().double()
            total += float(x.sum())
            magnitude += float(x.abs().sum())
    return {BASE_SUM_KEY: [total, magnitude]}


def check_base_sum(model: Any, extra: dict[str, Any], spec: str, state_folder: Path) -> None:
    """On resume: the base model loaded again must be the one the adapters were trained on."""
    saved = extra.get(BASE_SUM_KEY)
    now = state_extra(model).get(BASE_SUM_KEY)
    # the tolerance covers summation order (CPU vs GPU), relative to the sum of magnitudes, not to the sum
    if saved and now and abs(now[0] - saved[0]) > 1e-9 * max(1.0, saved[1]):
        raise FakegptError(
            f"{state_folder}: the LoRA adapters were trained on another version of the base model {spec} (its "
            f"weights changed since: checksum {saved[0]!r}, now {now[0]!r}); resume with the original base model"
        )


def load_adapter_state(model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Put saved adapters back; they must be exactly this model's trainable tensors (names and shapes)."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        extra, lost = sorted(set(weights) - expected), sorted(expected - set(weights))
        raise ValueError(
            f"adapter tensors differ from this model's ({len(extra)} unexpected, e.g. {extra[:1]}; "
            f"{len(lost)} missing, e.g. {lost[:1]})"
        )
    model.load_state_dict(weights, strict=False)  # RuntimeError on a shape mismatch


@torch.no_grad()
def merged_state(model: Any) -> dict[str, torch.Tensor]:
    """The weights W + (alpha/r)·(B·A)ᵀ with plain GPT-2 key names, computed without changing `model`.

    Unchanged weights are the model's own tensors (no copy; the tied wte / lm_head stay one tensor); each
    adapted weight is a new tensor of the base weight's dtype, moved to the CPU as soon as it is made, so that the
    GPU never holds a second copy of all adapted weights at once (4.7 GB at gpt2-xl; one module's is 41 MB).
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            weight = module.get_base_layer().weight  # Conv1D: (in, out)
            delta = module.get_delta_weight(ADAPTER)  # (in, out): transposed for fan_in_fan_out, scaled
            out[f"{name}.weight"] = (weight + delta.to(weight.dtype)).to("cpu")
    return out


def check_base(model: Any, saved_config: dict[str, Any], spec: str, state_folder: Path) -> None:
    """On resume: the base model loaded again from `spec` must have the shape saved with the state."""
    now = model.config.to_dict()
    differ = [k for k in SHAPE_KEYS if k in saved_config and now.get(k) != saved_config[k]]
    if differ:
        k = differ[0]
        raise FakegptError(
            f"{state_folder}: the LoRA run was trained on {spec} with {k}={saved_config[k]}, but {spec} now has "
            f"{k}={now.get(k)}; the adapters need the same base model"
        )


def adapter_snapshot(model: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(peft-format adapter tensors copied to the CPU, the adapter's LoraConfig): what `write_adapter` saves."""
    from peft import get_peft_model_state_dict

    weights = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}, model.peft_config[ADAPTER]


def write_adapter(folder: str | Path, snapshot: tuple[dict[str, torch.Tensor], Any], info: TrainingInfo) -> Path:
    """OUT/adapter/: peft's save_pretrained layout, from a snapshot (so it can run in a background thread)."""
    from safetensors.torch import save_file

    weights, config = snapshot
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        config.save_pretrained(str(tmp))
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        info.write(tmp)
    return folder


__all__ = [
    "ADAPTER_DIR",
    "adapter_snapshot",
    "adapter_state",
    "base_model",
    "check_base",
    "check_base_sum",
    "is_lora",
    "load_adapter_state",
    "merged_state",
    "state_extra",
    "wrap",
    "write_adapter",
]
