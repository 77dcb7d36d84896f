"""`--method lora` / `qlora`: low-rank adapters (peft's LoRA) on a frozen causal LM, saved merged as a plain HF
model. QLoRA holds the frozen base in 4-bit NF4 (bitsandbytes, double-quantized constants) and computes in the
run's dtype; its merged checkpoint is the dequantized base plus the adapters, in that dtype.

`wrap` puts peft adapters on the modules named by `--lora-targets` (`resolve_targets`): `auto` is GPT-2's
c_attn,c_proj,c_fc (attention qkv/out, MLP in/out: fakegpt's choice, wider than peft's c_attn alone) and, for
other architectures, the modules peft adapts by default (q_proj,v_proj for Llama and Qwen2); `all-linear` is
every Linear (GPT-2: Conv1D) layer but the output layer; or a comma-separated list of module names. GPT-2's
Conv1D layers store their weight (in, out), hence `fan_in_fan_out=True` there. Every other weight is frozen, so
the optimizer (which takes only parameters that require grad) sees the adapters alone. What is saved:
- the resume state's model.pt holds only the adapter tensors (`adapter_state`); on resume the base model is
  loaded again from the run's init_from, checked against the shape and a checksum of its weights saved with
  the state (`check_base`, `check_base_sum`), and the adapters are put back (`load_adapter_state`);
- the best model OUT/checkpoint/ is written merged, W + (alpha/r)·B·A, with the architecture's plain key names
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

from fakegpt.errors import FakegptError, one_line
from fakegpt.files import atomic_dir
from fakegpt.finetune.checks import lora_targets
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.models.architecture import describe, hf_model
from fakegpt.models.checkpoint import ADAPTER_DIR, TrainingInfo

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name
BASE_SUM_KEY = "lora_base_sum"  # in state.json's extra keys
AUTO, ALL_LINEAR = "auto", "all-linear"  # --lora-targets' two words
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")  # fakegpt's GPT-2 default: attention qkv/out, MLP in/out
# The shape a LoRA resume compares with the one saved in the state: GPT-2's config names and the standard ones
# of the other architectures (a config dict holds its own names, not the aliases of its attribute_map).
SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "max_position_embeddings",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


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


def _linear_modules(model: torch.nn.Module) -> dict[str, type]:
    """The names (last component) of the layers LoRA adapts under `all-linear`, in model order, with their class:
    every Linear and GPT-2 Conv1D but the output layer (peft's rule too)."""
    from transformers.pytorch_utils import Conv1D

    hf = hf_model(model)
    head = hf.get_output_embeddings()
    found: dict[str, type] = {}
    for name, module in hf.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            found.setdefault(name.rsplit(".", 1)[-1], type(module))
    return found


def resolve_targets(model: torch.nn.Module, cfg: FinetuneConfig) -> list[str]:
    """The module names `--lora-targets` means for this model (`auto`, `all-linear` or a list; see the module
    docstring); a name no module of the model has is a one-line error listing those it has."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    hf = hf_model(model)
    names = lora_targets(cfg)
    linear = _linear_modules(hf)
    if (AUTO in names or ALL_LINEAR in names) and len(names) > 1:
        raise FakegptError(f"--lora-targets {cfg.lora_targets}: {AUTO} and {ALL_LINEAR} stand alone, not in a list")
    if names == [AUTO]:
        model_type = hf.config.model_type
        if model_type == "gpt2":
            return list(GPT2_TARGETS)
        if model_type in PEFT_DEFAULTS:
            return list(PEFT_DEFAULTS[model_type])
        log.info("--lora-targets auto: peft has no default for %s; adapting every linear layer", describe(hf.config))
        names = [ALL_LINEAR]
    if names == [ALL_LINEAR]:
        return list(linear)
    present = {name.rsplit(".", 1)[-1] for name, _ in hf.named_modules()}
    missing = [t for t in names if t not in present]
    if missing:
        raise FakegptError(
            f"--lora-targets: no module named {', '.join(missing)} in the model ({describe(hf.config)} has "
            f"{', '.join(linear)})"
        )
    return names


def wrap(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """`model` (a causal LM) with LoRA adapters on the target modules; only the adapters train."""
    _import_peft()
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = resolve_targets(model, cfg)
    adapted = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        # GPT-2's Conv1D stores weights (in, out); a Linear (out, in)
        fan_in_fan_out=bool(adapted) and all(isinstance(m, Conv1D) for m in adapted),
        bias="none",
    )
    log.info("LoRA adapters on %s (--lora-targets %s)", ", ".join(targets), cfg.lora_targets)
    with torch.random.fork_rng(devices=[]):  # lora_A's random init from --seed: the same run twice is the same
        torch.manual_seed(cfg.seed)
        try:
            return get_peft_model(model, config, adapter_name=ADAPTER)
        except ValueError as exc:  # a module peft cannot adapt (a norm, a whole block)
            raise FakegptError(f"--lora-targets {cfg.lora_targets}: {one_line(exc)}") from None


def is_lora(model: Any) -> bool:
    """True for a model wrapped by `wrap` (a peft PeftModel)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model: Any) -> Any:
    """The HF model inside a PeftModel (its config is the plain HF one; its save_pretrained writes HF)."""
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


def require_4bit(device: torch.device) -> None:
    """`--method qlora` needs bitsandbytes able to quantize to 4-bit NF4 on `device`: a one-line error if not,
    before any weights are loaded."""
    from fakegpt.finetune.optim import require_bitsandbytes

    require_bitsandbytes()
    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(torch.ones(256, device=device), quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as exc:  # its backends fail in many ways (no kernel for this device, a CUDA mismatch)
        raise FakegptError(
            f"--method qlora: bitsandbytes cannot hold weights in 4-bit on {device.type} here ({one_line(exc)}); "
            "use --method lora"
        ) from None


def prepare_quantized(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """A 4-bit base made ready for adapters (peft's prepare_model_for_kbit_training: the layers that stay in
    full precision, norms and embeddings, in float32 for stable training; input gradients on for checkpointing)."""
    _import_peft()
    from peft import prepare_model_for_kbit_training

    for module in model.modules():
        # bitsandbytes' CPU backend re-lays a 4-bit weight out in its own packing on the first no-grad forward
        # (an evaluation), in place: the bytes that the resume check sums and that dequantize_4bit reads would
        # then change under the run. The base stays in the one layout that is read back as it was written.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)


def _is_4bit(module: Any) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and getattr(weight, "quant_state", None) is not None


def _dequantized(module: Any) -> torch.Tensor:
    """A 4-bit layer's weight in its compute dtype."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(module.compute_dtype or torch.float32)


@torch.no_grad()
def merged_state(model: Any) -> dict[str, torch.Tensor]:
    """The weights W + (alpha/r)·B·A with the architecture's plain key names, computed without changing `model`.

    Unchanged weights are the model's own tensors (no copy; a tied embedding / lm_head stays one tensor); each
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
    # QLoRA: a 4-bit layer's entries (packed weight, quantization constants) become its plain weight
    quantized = {name.replace(".base_layer", ""): m for name, m in base.named_modules() if _is_4bit(m)}
    for name, module in quantized.items():
        for key in [k for k in out if k.startswith(f"{name}.weight.")]:
            del out[key]
        out[f"{name}.weight"] = _dequantized(module).to("cpu")
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            layer = module.get_base_layer()
            # Linear: (out, in); GPT-2's Conv1D: (in, out)
            weight = _dequantized(layer) if name in quantized else layer.weight
            delta = module.get_delta_weight(ADAPTER)  # the weight's layout (transposed for fan_in_fan_out), scaled
            out[f"{name}.weight"] = (weight + delta.to(weight.dtype)).to("cpu")
    if quantized:  # one dtype for the whole checkpoint: the compute dtype (bf16 on a GPU), not float32 norms
        dtype = next(iter(quantized.values())).compute_dtype or torch.float32
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
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
    "resolve_targets",
    "state_extra",
    "wrap",
    "write_adapter",
]
