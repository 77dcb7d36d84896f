"""`--parallel fsdp` under torchrun: memory sharding with PyTorch FSDP2 (`fully_shard`).

Each decoder layer (the model's own class, as transformers names it in `_no_split_modules`: GPT2Block,
LlamaDecoderLayer, ...) is one FSDP unit, the loss module is the root unit (the embeddings, the final norm and
the output layer, tied or not), so every rank holds 1/world_size of the weights, gradients and AdamW states,
and gathers one layer's weights at a time for its forward and backward. Under bfloat16 the weights
are gathered and computed in bfloat16 and the gradients reduced in float32 (MixedPrecisionPolicy); the
master weights and optimizer states stay float32.

Checkpoints are never sharded: the best model (OUT/checkpoint/) and the resume state (OUT/state/iter-N/) are
full state dicts gathered to rank 0 (a collective: every rank takes part, rank 0 writes), in the very format
one process or DDP writes (the optimizer state keyed by parameter index, as `Optimizer.state_dict()`), so a
state saved under FSDP resumes under DDP or in one process, and the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fakegpt.errors import FakegptError
from fakegpt.models.architecture import decoder_layers

_FULL = {"full_state_dict": True, "cpu_offload": True}


def shard(objective: torch.nn.Module, model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """FSDP2 in place: `fully_shard` on each decoder layer of `model`, then on `objective` (the root, whose
    forward runs the whole model). Parameters become DTensors; the optimizer must be built after this."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if dtype == "float16":  # dtype auto on a GPU without bfloat16
        raise FakegptError("--parallel fsdp needs --dtype bfloat16 or float32 (float16 resolved from auto here)")
    policy = MixedPrecisionPolicy()
    if dtype == "bfloat16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = decoder_layers(model)
    for i, block in enumerate(blocks):
        # the last block's weights are needed again at once by backward: keep them gathered after forward
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(objective, mp_policy=policy)  # embeddings, final norm, lm_head (tied: one parameter with wte)
    return objective


def retie(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keys of `state` that name one parameter of `model` (a tied wte / lm_head) share one tensor again, as in
    `model.state_dict()`: a gathered full state dict holds a copy per key."""
    first: dict[int, str] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        key = first.setdefault(id(value), name)
        if key != name and key in state and name in state:
            state[name] = state[key]
    return state


def param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's order: index i of `Optimizer.state_dict()` is names[i]."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def to_indexed(named: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """A parameter-name-keyed optimizer state dict (torch.distributed.checkpoint's) as `Optimizer.state_dict()`
    keys it: by the parameter's index in `names`."""
    index = {name: i for i, name in enumerate(names)}
    state = {index[name]: value for name, value in named["state"].items()}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in named["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def to_named(indexed: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The inverse of `to_indexed`. An index beyond `names` (another model's state) is a KeyError."""

    def name(i: int) -> str:
        if not 0 <= int(i) < len(names):
            raise KeyError(f"optimizer state for parameter {i}, the model has {len(names)}")
        return names[int(i)]

    state = {name(i): value for i, value in indexed["state"].items()}
    groups = [{**g, "params": [name(i) for i in g["params"]]} for g in indexed["param_groups"]]
    return {"state": state, "param_groups": groups}


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of rank 0 ({} on the other ranks). A collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(**_FULL))
    return retie(state, model) if state else state


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) in one process's format, on rank 0's CPU ({} elsewhere). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = full_model_state(model)
    named = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL))
    return weights, (to_indexed(named, param_names(model, optimizer)) if weights else {})


def load_full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optimizer_state: dict
) -> None:
    """Load full (unsharded) weights and optimizer state, read on every rank, into the sharded model and
    optimizer: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    named = to_named(optimizer_state, param_names(model, optimizer))
    set_optimizer_state_dict(model, optimizer, named, options=options)
