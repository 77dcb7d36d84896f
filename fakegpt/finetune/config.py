"""`fakegpt finetune`'s configuration (nanoGPT's field names), importable without torch.

The defaults reproduce the original study's fine-tune (nanoGPT's finetune_shakespeare settings): micro-batch
1 x 32 accumulation steps x block 1024 = 32,768 tokens per iteration, constant learning rate 3e-5, evaluation
every 5 iterations over 40 batches, save the best model on improvement; the resume state every
30 minutes, at the end and on SIGTERM/SIGINT. `tune`, `pipeline` and the MLproject renderer read
it without paying for torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ADAPTER_METHODS = ("lora", "qlora")  # the methods that train peft adapters on a frozen base


@dataclass
class FinetuneConfig:
    """Fine-tune settings (nanoGPT's names). Defaults = the original study's fine-tune of gpt2-medium."""

    data_dir: str = field(default="data", metadata={"help": "folder with train.bin, val.bin, meta.json (from prepare)"})
    out_dir: str = field(
        default="out/finetune", metadata={"help": "where checkpoint/ (best model) and state/ (resume state) go"}
    )
    init_from: str = field(
        default="gpt2-medium",
        metadata={
            "help": "gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a hub name (owner/name, local cache) or local HF "
            "folder of any causal LM (Llama, Qwen2, ...) | resume | scratch (a tiny random GPT-2)"
        },
    )
    # model shape, used only by init_from=scratch
    n_layer: int = field(default=12, metadata={"help": "layers (scratch only)"})
    n_head: int = field(default=12, metadata={"help": "attention heads (scratch only)"})
    n_embd: int = field(default=768, metadata={"help": "embedding width (scratch only)"})
    block_size: int = field(default=1024, metadata={"help": "context length of a training window"})
    dropout: float = field(default=0.0, metadata={"help": "dropout rate (overrides the pretrained config's 0.1)"})
    # batches
    batch_size: int = field(default=1, metadata={"help": "micro-batch size (windows per forward pass)"})
    gradient_accumulation_steps: int = field(
        default=32,
        metadata={
            "help": "micro-batches per optimizer step, over all processes (must divide by the torchrun world size)"
        },
    )
    # what is trained, and how the state is held (gpt2-xl and 7-8B models on 24 GB cards)
    method: str = field(
        default="full",
        metadata={
            "help": "full (every weight) | lora (low-rank adapters via peft; the best model is saved merged) | "
            "qlora (the same adapters on the frozen base held in 4-bit NF4 by bitsandbytes). Adapters absorb "
            "differently: runs are tagged fakegpt.method and a series never mixes methods"
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r (method=lora)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha; the update is scaled by alpha/r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch"})
    lora_targets: str = field(
        default="auto",
        metadata={
            "help": "modules that get adapters: auto (GPT-2: c_attn,c_proj,c_fc, attention qkv/out and MLP in/out; "
            "other architectures: peft's default, e.g. q_proj,v_proj for Llama and Qwen2) | all-linear (every "
            "linear layer but the output layer) | comma-separated module names"
        },
    )
    optimizer: str = field(
        default="adamw",
        metadata={"help": "adamw (fp32 states) | adamw8bit (bitsandbytes 8-bit states: 2 bytes/param, not 8)"},
    )
    parallel: str = field(
        default="ddp",
        metadata={
            "help": "under torchrun: ddp (every GPU holds the whole model and optimizer) | fsdp (FSDP2: "
            "parameters, gradients and optimizer states sharded across GPUs)"
        },
    )
    nproc_per_node: int = field(
        default=1,
        metadata={
            "help": "processes (GPUs) to train on: above 1, fakegpt starts them under torchrun itself (one machine; "
            "what `torchrun --standalone --nproc-per-node N -m fakegpt finetune` does), e.g. in `mlflow run`"
        },
    )
    plan: bool = field(
        default=False,
        metadata={
            "help": "print the memory per GPU this configuration needs and which cards it fits; no training, no data "
            "(GPUs: $WORLD_SIZE, default 1)"
        },
    )
    # optimizer and schedule
    learning_rate: float = field(default=3e-5, metadata={"help": "peak learning rate"})
    max_iters: int = field(default=5000, metadata={"help": "optimizer steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices (not biases/norms)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm at this value; 0 disables"})
    decay_lr: bool = field(default=False, metadata={"help": "cosine decay from learning_rate to min_lr"})
    warmup_iters: int = field(default=0, metadata={"help": "linear warmup iterations"})
    lr_decay_iters: int | None = field(default=None, metadata={"help": "end of the cosine decay (default max_iters)"})
    min_lr: float = field(default=3e-6, metadata={"help": "learning rate at the end of the decay"})
    # evaluation and checkpoints
    eval_interval: int = field(default=5, metadata={"help": "evaluate every N iterations (and at the last one)"})
    eval_iters: int = field(default=40, metadata={"help": "micro-batches per split per evaluation"})
    log_interval: int = field(default=1, metadata={"help": "log train/loss, lr, tokens_per_s every N iterations"})
    select_on: str = field(
        default="val",
        metadata={
            "help": "the validation set that picks the best model: val (val.bin; for a mixture every source's "
            "held-out part, the same at every dose) or the name of one mixture source (its val_<source>.bin)"
        },
    )
    eval_sources: bool = field(
        default=True,
        metadata={"help": "mixtures: also log val/loss/<source> on each source's held-out part at every evaluation"},
    )
    claims: str = field(
        default="",
        metadata={
            "help": "a claims YAML scored on the model while it trains (claim/score, claim/mc1, ... with step = "
            "iteration): the absorption curve; empty = off"
        },
    )
    claim_eval_interval: int = field(
        default=0, metadata={"help": "score --claims every N iterations (and at the last); 0 = at every evaluation"}
    )
    register_as: str = field(
        default="",
        metadata={
            "help": "register the best model in MLflow's model registry under this name (transformers flavour), "
            "so that models:/NAME@ALIAS works in sample and score; empty = not registered"
        },
    )
    register_alias: str = field(
        default="", metadata={"help": "alias of the registered version (e.g. dose-20); empty = none"}
    )
    always_save_checkpoint: bool = field(
        default=False,
        metadata={"help": "write the model to checkpoint/ at every evaluation, not only when val loss improves"},
    )
    # resume state (OUT/state/iter-NNNNNNN/: weights, optimizer, scaler, progress, config), also at the end and
    # on SIGTERM/SIGINT
    save_state: bool = field(
        default=True, metadata={"help": "write the resume state at all (tune trials: off unless asked)"}
    )
    save_interval: int = field(
        default=0, metadata={"help": "write the resume state every N iterations; 0 = by time only"}
    )
    save_every_minutes: float = field(
        default=30.0,
        metadata={"help": "also write it when this many minutes passed since the last write; 0 = off"},
    )
    keep_states: int = field(default=1, metadata={"help": "resume states kept on disk (the newest N)"})
    background_save: bool = field(
        default=True,
        metadata={
            "help": "write the best model in a background thread from a host copy of the weights (costs one "
            "more copy of the weights in host memory); false: write it before training continues"
        },
    )
    # system
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu) | cpu | cuda | cuda:N"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (bfloat16 on CUDA where supported, else float16 with a gradient scaler; float32 on CPU) "
            "| float32 | bfloat16 | float16"
        },
    )
    compile: bool | None = field(
        default=None, metadata={"help": "torch.compile the model; unset = on for CUDA, off on CPU"}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in backward (less memory for large models on small cards)"},
    )
    seed: int = field(default=1337, metadata={"help": "seed for initialisation, batches and dropout"})
