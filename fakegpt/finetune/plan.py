"""`fakegpt finetune --plan`: the GPU memory a configuration needs, per GPU, and which common cards it fits.

No training, no data folder, no MLflow, no weights read. The model's shape comes from its config.json (a local
folder, the Hugging Face cache, the resume state) or, for gpt2 ... gpt2-xl not in the cache, from `HUB_SHAPES`.
The model is then built as its own class (GPT2LMHeadModel, LlamaForCausalLM, ...) on PyTorch's `meta` device
(shapes only, no memory) and, for `--method lora`, wrapped by peft as training would, so parameter counts are
exact. The bytes per GPU:

- weights: fp32 masters, 4 B per parameter (autocast computes in bf16/fp16 but keeps fp32 weights);
- gradients: 4 B per trainable parameter;
- optimizer states: AdamW 8 B per trainable parameter; bitsandbytes' AdamW8bit 2 B + two fp32 scales per
  256-element block for tensors of >= 4096 elements, 8 B below that (`optim.state_bytes`);
- under `--parallel fsdp` these three are divided over the world size (FSDP2 shards them), plus two gathered
  blocks' weights (the one computing and the one prefetched);
- half-precision weight copies: autocast keeps a bf16/fp16 copy of each trainable weight for the forward pass
  (2 B per parameter; for LoRA's frozen weights only as long as a block's activations are kept);
- activations, an **estimate** per architecture family (`activation_bytes`; e = 2 bytes under bf16/fp16, 4 in
  fp32; h the width, k the key/value width, m the MLP's inner width):
  - GPT-2-like layers (LayerNorm, a two-matrix MLP): per layer b·s·(e·(6h + 2k + 2m) + 2h·[dropout]) bytes,
    which is b·s·h·(16·e + 2·[dropout]) for GPT-2 (k = h, m = 4h): Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", eq. 1 without its s² attention-score term, which SDPA / flash
    attention does not keep, and with its dropout masks only when dropout > 0;
  - Llama-like layers (RMSNorm, a gated MLP: down(act(gate(x)) · up(x))): per layer b·s·(16h + e·(4h + 2k +
    4m) + [half precision] e·4h) bytes: each RMSNorm keeps its fp32 input and normalised value, attention its
    input, queries, keys, values and output, the MLP its input and four m-wide tensors; under autocast each
    projection keeps its own half-precision copy of a shared input (three for q/k/v, two for gate/up) and the
    output projection a copy of the attention output (measured against autograd's saved tensors);
  With gradient checkpointing only each block's fp32 input is kept, plus one block recomputed in backward. Plus
  the logits for the loss: b·s·vocab·(e + 4 + 4) (the logits, their fp32 copy and gradient; 4 B in fp32, where
  the fused loss keeps one buffer).

A card fits when the total plus `RESERVE_GIB` (CUDA context, allocator fragmentation) is at most its memory.
`--nproc-per-node N` (else `WORLD_SIZE`, what torchrun sets) is the number of GPUs; `--nproc-per-node 4` plans for 4.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fakegpt.data.tokenizer import VOCAB_SIZE
from fakegpt.errors import FakegptError
from fakegpt.finetune import checks
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.config import ADAPTER_METHODS, FinetuneConfig
from fakegpt.models import architecture
from fakegpt.models.loading import HUB_MODELS, model_config

GIB = 1024**3
CARDS_GIB = (16, 24, 40, 80)  # V100/T4-class, RTX 4090/A10/L4, A100 40GB, A100/H100 80GB
RESERVE_GIB = 1.0  # CUDA context + allocator fragmentation, kept free on every card
FSDP_SIZES = (2, 4, 8)
# The released GPT-2 shapes, used when a hub name is not in the local cache: (n_layer, n_head, n_embd).
HUB_SHAPES = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}

GPT2_LIKE = "GPT-2-like (LayerNorm, two-matrix MLP)"
LLAMA_LIKE = "Llama-like (RMSNorm, gated MLP)"

log = logging.getLogger(__name__)

# bytes per 4-bit NF4 weight: half a byte, plus its block's constant (one per 64 weights, itself quantized to 8
# bits by double quantization, with a float32 constant per 256 blocks)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class Memory:
    """Bytes per GPU, by kind; `activations` and `logits` are estimates, the rest exact."""

    weights: int
    gradients: int
    optimizer: int
    gathered: int  # FSDP: unsharded blocks in flight
    weight_copies: int  # bf16/fp16 copies autocast makes
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


@dataclass
class Plan:
    """One configuration's memory per GPU, with what it was computed for."""

    model: str
    # n_layer, n_head, n_embd (the width), vocab_size, n_positions, n_kv_head, n_kv (their width), n_mlp
    shape: dict[str, int]
    cfg: FinetuneConfig
    world_size: int
    act_dtype: str  # the dtype activations are computed in
    n_params: int
    n_trainable: int
    memory: Memory
    family: str = GPT2_LIKE  # the architecture family whose activations are estimated
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the model was built from

    def fits(self, card_gib: float) -> bool:
        return self.memory.total + RESERVE_GIB * GIB <= card_gib * GIB


def model_shape(cfg: FinetuneConfig) -> tuple[str, dict[str, Any]]:
    """(what the shape was read from, the HF config dict) for `cfg.init_from`, without reading any weights."""
    if cfg.init_from == "scratch":
        return "scratch", dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.block_size)
    if cfg.init_from == "resume":
        folder = state_mod.latest(cfg.out_dir)
        if folder is None:
            raise FakegptError(f"--init-from resume: no resume state in {Path(cfg.out_dir) / state_mod.STATE_DIR}")
        return str(folder), state_mod.model_config(folder)
    path = Path(cfg.init_from).expanduser()
    if path.is_dir():
        return str(path), model_config(path)
    if cfg.init_from not in HUB_MODELS and "/" not in cfg.init_from:
        raise FakegptError(
            f"--init-from {cfg.init_from!r}: not a local model folder nor a known hub name ({', '.join(HUB_MODELS)})"
        )
    cached = _cached_config(cfg.init_from)
    if cached is not None:
        return f"{cfg.init_from} ({cached.parent})", model_config(cached.parent)
    if cfg.init_from in HUB_SHAPES:
        n_layer, n_head, n_embd = HUB_SHAPES[cfg.init_from]
        shape = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024, vocab_size=VOCAB_SIZE)
        return f"{cfg.init_from} (built-in shape; not in the local cache)", shape
    raise FakegptError(f"--init-from {cfg.init_from}: its config.json is not in the local Hugging Face cache")


def _cached_config(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json")
    except Exception:  # a malformed name, an unreadable cache: fall back to the built-in shapes
        return None
    return Path(found) if isinstance(found, str) else None


def meta_model(hf: dict[str, Any], cfg: FinetuneConfig) -> Any:
    """The model as training builds it (its own class, peft-wrapped for LoRA), on the meta device: exact
    parameter shapes, no memory. `hf`: its config dict (one without model_type is GPT-2's)."""
    import torch

    from fakegpt.models.loading import model_from_config

    if hf.get("model_type", "gpt2") == "gpt2":
        hf = {"vocab_size": VOCAB_SIZE, "n_positions": 1024, **hf}
    # transformers and peft import their optional backends (torchao, bitsandbytes) on first use, and these log
    # warnings about kernels a plan does not need
    with torch.device("meta"), _quiet():
        try:
            model = model_from_config(hf, f"--init-from {cfg.init_from}")
        except (ValueError, TypeError) as exc:
            raise FakegptError(
                f"--init-from {cfg.init_from}: not a model shape transformers can build ({exc})"
            ) from None
        if cfg.method in ADAPTER_METHODS:
            model = lora_wrap(model, cfg)
    return model


def shape_of(model: Any) -> dict[str, int]:
    """The numbers the plan shows and its estimates use, through the config's standard names (GPT-2's n_layer,
    n_head, n_embd, n_positions are aliases of them)."""
    config = architecture.hf_model(model).config
    return {
        "n_layer": config.num_hidden_layers,
        "n_head": config.num_attention_heads,
        "n_embd": config.hidden_size,
        "vocab_size": config.vocab_size,
        "n_positions": architecture.context_length(config),
        "n_kv_head": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "n_kv": architecture.kv_width(config),
        "n_mlp": architecture.mlp_width(config),
    }


def lora_wrap(model: Any, cfg: FinetuneConfig) -> Any:
    """`model` with LoRA adapters exactly as training puts them (`fakegpt.finetune.lora.wrap`), quietly."""
    from fakegpt.finetune import lora

    # peft's optional backends announce themselves on import; its deprecation warnings are for peft's maintainers
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), _quiet():
        return lora.wrap(model, cfg)


@contextlib.contextmanager
def _quiet():
    """No warnings and no log records below ERROR while the block runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(before)


def _act_dtype(cfg: FinetuneConfig) -> str:
    return "bfloat16" if cfg.dtype == "auto" else cfg.dtype  # auto: bf16 on the cards planned for


def plan(cfg: FinetuneConfig, world_size: int | None = None, given: frozenset[str] | None = None) -> Plan:
    """The memory per GPU of `cfg` on `world_size` GPUs (default: $WORLD_SIZE, else 1). For `--init-from resume`
    the saved configuration, with the flags in `given` that resume would apply (`fakegpt.finetune.resume`)."""
    if cfg.init_from == "resume":
        from fakegpt import config as config_mod
        from fakegpt.finetune import resume

        cfg = resume.resolve(cfg, config_mod.non_default_keys(cfg) if given is None else given).cfg
    checks.check_numbers(cfg, 1)  # the choices and ranges training checks (the world size is the plan's own)
    if world_size is None:  # --nproc-per-node N starts N processes; else torchrun's WORLD_SIZE
        world_size = cfg.nproc_per_node if cfg.nproc_per_node > 1 else _env_world_size()
    world = world_size
    source, hf = model_shape(cfg)
    model = meta_model(hf, cfg)
    shape = shape_of(model)
    if cfg.block_size > shape["n_positions"]:
        raise FakegptError(f"--block-size {cfg.block_size} is larger than the model's context ({shape['n_positions']})")
    return plan_for_model(model, cfg, world, source, shape, hf)


def _env_world_size() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise FakegptError(f"WORLD_SIZE={raw!r}: expected a positive number of GPUs")
    return value


def plan_for_model(
    model: Any,
    cfg: FinetuneConfig,
    world: int,
    source: str,
    shape: dict[str, int],
    hf_config: dict[str, Any] | None = None,
) -> Plan:
    """The memory of training `model` (real or on the meta device) per `cfg` on `world` GPUs."""
    params = list(model.parameters())  # tied weights once (lm_head is the token embedding)
    trainable = [p.numel() for p in params if p.requires_grad]
    n_params, n_trainable = sum(p.numel() for p in params), sum(trainable)
    weight_bytes = sum(p.numel() * p.element_size() for p in params) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    if cfg.method == "qlora":  # the frozen linear layers in 4-bit NF4 instead of float32
        quantized = quantized_params(model)
        weight_bytes += int(quantized * (NF4_BYTES - 4))
    from fakegpt.finetune.optim import state_bytes

    grads, opt = 4 * n_trainable, state_bytes(trainable, cfg.optimizer)
    act_dtype = _act_dtype(cfg)
    e = 4 if act_dtype == "float32" else 2
    b, s, h, n_layer = cfg.batch_size, cfg.block_size, shape["n_embd"], shape["n_layer"]
    block_params = _block_params(model)
    shards = world if cfg.parallel == "fsdp" else 1
    gathered = 2 * block_params * 4 if shards > 1 else 0
    family = LLAMA_LIKE if architecture.gated_mlp(model) else GPT2_LIKE
    per_layer = activation_bytes(family, shape, b * s, e, cfg.dropout > 0)
    if cfg.gradient_checkpointing:
        activations = n_layer * b * s * h * 4 + per_layer  # fp32 block inputs + one block recomputed
    else:
        activations = n_layer * per_layer
    activations += 2 * b * s * h * 4  # embedding output, final norm input
    # finetune's one-buffer loss: eager fp32 (compile unset: on CUDA), for an architecture whose logits it computes
    processed = architecture.logits_processing(architecture.hf_model(model).config)
    fused_loss = e == 4 and cfg.compile is False and processed is None
    logits = b * s * shape["vocab_size"] * (4 if fused_loss else e + 8)
    if e == 4:
        copies = 0
    elif cfg.method in ADAPTER_METHODS:  # frozen weights: a block's copies live as long as its saved activations
        copies = e * block_params * (1 if cfg.gradient_checkpointing else n_layer) + e * n_trainable
    elif shards > 1:
        copies = e * 2 * block_params
    else:
        copies = e * n_trainable  # autocast's cache of casts of leaf weights, for the whole forward pass
    memory = Memory(
        weights=-(-weight_bytes // shards),
        gradients=-(-grads // shards),
        optimizer=-(-opt // shards),
        gathered=gathered,
        weight_copies=copies,
        activations=activations,
        logits=logits,
    )
    hf = dict(hf_config or {})
    return Plan(source, shape, cfg, world, act_dtype, n_params, n_trainable, memory, family, hf)


def quantized_params(model: Any) -> int:
    """Parameters QLoRA holds in 4-bit: the weights of every frozen linear layer but the output layer (what
    transformers' bitsandbytes quantizer converts)."""
    import torch

    head = architecture.output_layer(model)
    return sum(
        m.weight.numel()
        for m in architecture.hf_model(model).modules()
        if isinstance(m, torch.nn.Linear) and m is not head and not m.weight.requires_grad
    )


def activation_bytes(family: str, shape: dict[str, int], tokens: int, e: int, dropout: bool) -> int:
    """Bytes one decoder layer keeps for backward over `tokens` tokens (b·s), an estimate for its architecture
    family (see the module docstring); e: bytes per element of the activations (2 under autocast, 4 in fp32)."""
    h, kv, m = shape["n_embd"], shape["n_kv"], shape["n_mlp"]
    if family == GPT2_LIKE:
        return tokens * (e * (6 * h + 2 * kv + 2 * m) + (2 * h if dropout else 0))
    # Llama-like: dropout (attention_dropout) acts on the attention probabilities inside SDPA, which keeps no mask
    casts = 4 * h if e == 2 else 0  # q/k/v's two extra input copies, gate/up's one, o_proj's copy of its input
    return tokens * (16 * h + e * (4 * h + 2 * kv + 4 * m) + e * casts)


def _block_params(model: Any) -> int:
    """Parameters of one decoder layer (all layers of a model are the same shape)."""
    return sum(p.numel() for p in architecture.decoder_layers(model)[0].parameters())


# --- what would make it fit ---------------------------------------------------------------------------------


def _alternatives(cfg: FinetuneConfig) -> list[tuple[str, dict[str, Any], int | None]]:
    """Changes to try, least invasive first: (flags, FinetuneConfig changes, world size or None = unchanged)."""
    out: list[tuple[str, dict[str, Any], int | None]] = []
    ckpt = {"gradient_checkpointing": True}
    eight = {"optimizer": "adamw8bit"}
    if not cfg.gradient_checkpointing:
        out.append(("--gradient-checkpointing true", ckpt, None))
    if cfg.optimizer != "adamw8bit":
        out.append(("--optimizer adamw8bit", eight, None))
        if not cfg.gradient_checkpointing:
            out.append(("--optimizer adamw8bit --gradient-checkpointing true", {**eight, **ckpt}, None))
    if cfg.batch_size > 1:
        accum = cfg.gradient_accumulation_steps * cfg.batch_size
        flags = f"--batch-size 1 --gradient-accumulation-steps {accum} (same tokens per iteration)"
        out.append((flags, {"batch_size": 1, "gradient_accumulation_steps": accum}, None))
    if cfg.method not in ADAPTER_METHODS:
        out.append(("--method lora", {"method": "lora"}, None))
        if not cfg.gradient_checkpointing:
            out.append(("--method lora --gradient-checkpointing true", {"method": "lora", **ckpt}, None))
    for n in FSDP_SIZES:
        launch = f"torchrun --nproc_per_node={n} ... --parallel fsdp"
        out.append((launch, {"parallel": "fsdp"}, n))
        if not cfg.gradient_checkpointing:
            out.append((launch + " --gradient-checkpointing true", {"parallel": "fsdp", **ckpt}, n))
    if cfg.method != "qlora" and cfg.init_from != "scratch":  # last: the other kinds keep their places
        out.append(("--method qlora", {"method": "qlora"}, None))
        if not cfg.gradient_checkpointing:
            out.append(("--method qlora --gradient-checkpointing true", {"method": "qlora", **ckpt}, None))
    return out


def suggestions(p: Plan, card_gib: float, limit: int = 3) -> list[str]:
    """Up to `limit` ways to fit `card_gib`: the first fitting change of each kind (memory flags, LoRA, FSDP)."""
    found: dict[str, str] = {}
    for flags, changes, world in _alternatives(p.cfg):
        kind = "fsdp" if world else (changes["method"] if changes.get("method") in ADAPTER_METHODS else "flags")
        if kind in found:
            continue
        cfg = dataclasses.replace(p.cfg, **changes)
        alt = plan_for_model(meta_model(p.hf_config, cfg), cfg, world or p.world_size, p.model, p.shape, p.hf_config)
        if alt.fits(card_gib):
            found[kind] = f"{flags} ({_gib(alt.memory.total)})"
    return list(found.values())[:limit]


# --- the printed table -------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def render(p: Plan) -> str:
    """The plan as the terminal shows it: settings, the memory table, a verdict per card."""
    cfg, m = p.cfg, p.memory
    sh = p.shape
    par = f"{cfg.parallel}, {p.world_size} GPU{'s' if p.world_size > 1 else ''}"
    lines = [
        f"model      {p.model}: {sh['n_layer']} layers, {sh['n_head']} heads"
        + (f" ({sh['n_kv_head']} key/value)" if sh["n_kv_head"] != sh["n_head"] else "")
        + f", {sh['n_embd']} embd, vocab {sh['vocab_size']}",
        f"training   method {cfg.method}, optimizer {cfg.optimizer}, dtype {cfg.dtype}"
        + (f" (activations in {p.act_dtype})" if cfg.dtype == "auto" else "")
        + f", micro-batch {cfg.batch_size} x block {cfg.block_size}, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}, {par}",
        f"parameters {_count(p.n_params)}, trainable {_count(p.n_trainable)}",
        "",
    ]
    rows = [
        ("weights (fp32" + (", linear layers in 4-bit NF4)" if cfg.method == "qlora" else ")"), m.weights, "exact"),
        ("gradients (fp32)", m.gradients, "exact"),
        (f"optimizer states ({cfg.optimizer})", m.optimizer, "exact"),
        ("FSDP gathered blocks (2)", m.gathered, "estimate"),
        (f"{p.act_dtype} weight copies (autocast)", m.weight_copies, "estimate"),
        ("activations" + (" (checkpointed)" if cfg.gradient_checkpointing else ""), m.activations, "estimate"),
        ("logits + loss", m.logits, "estimate"),
    ]
    lines.append("memory per GPU")
    lines += [f"  {label:<36}{_gib(n):>10}   {kind}" for label, n, kind in rows if n]
    lines += [
        f"  {'total':<36}{_gib(m.total):>10}   + {RESERVE_GIB:.0f} GiB reserve (CUDA context, fragmentation)",
        "",
        f"Activations are an estimate for {p.family} decoder layers (Korthikanti et al. 2022 per layer, SDPA: no "
        "s x s scores); measure with gpu/peak_memory_gb.",
    ]
    if cfg.parallel == "ddp" and p.world_size > 1:
        lines.append("DDP keeps a whole copy of weights, gradients and optimizer states on every GPU.")
    lines.append("")
    for card in CARDS_GIB:
        if p.fits(card):
            lines.append(f"  {card:>2} GB card: fits")
            continue
        tips = suggestions(p, card)
        lines.append(f"  {card:>2} GB card: does not fit" + ("; fits with:" if tips else "; nothing planned fits"))
        lines += [f"      {tip}" for tip in tips]
    return "\n".join(lines)


def main(cfg: FinetuneConfig, given: frozenset[str] | None = None) -> int:
    """`fakegpt finetune --plan`: print the plan; no data folder, no MLflow, no weights read. `given`: the
    fields the user set (`config.parse_given`), for `--init-from resume`."""
    print(render(plan(cfg, given=given)))
    return 0
