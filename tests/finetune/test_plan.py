"""`fakegpt finetune --plan`: its exact parts (parameter, gradient and optimizer bytes, LoRA's trainable count)
against real tensors of tiny models after a real optimizer step; its verdicts for gpt2-xl; the CLI without data."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fakegpt.errors import FakegptError
from fakegpt.finetune import optim, plan
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.train import main as finetune_main
from fakegpt.models.loading import load_model, scratch_model, use_fused_gelu

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(init_from="scratch", n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=2)


def _tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (bitsandbytes shares its code maps between parameters)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _real_step(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    """One real forward, backward and optimizer step, as finetune builds the optimizer."""
    opt = optim.build(model, name, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(0, 50257, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    return opt


def _optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    tensors = [v for s in opt.state.values() for k, v in s.items() if k != "step" and torch.is_tensor(v)]
    return _tensor_bytes(tensors)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_weights_gradients_and_optimizer_bytes_are_exact(name):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    cfg = FinetuneConfig(**TINY, optimizer=name)
    p = plan.plan(cfg, world_size=1)
    torch.manual_seed(0)
    model = scratch_model(2, 2, 64, 32)
    params = list(model.parameters())
    assert p.n_params == sum(t.numel() for t in params)
    assert p.memory.weights == _tensor_bytes(params) + _tensor_bytes(model.buffers())
    opt = _real_step(model, name)
    assert p.memory.gradients == _tensor_bytes(t.grad for t in params)
    assert p.memory.optimizer == _optimizer_state_bytes(opt)
    if name == "adamw8bit":  # really 8-bit: the matrices' moments are uint8, and the total is far below fp32's
        assert {s["state1"].dtype for p_, s in opt.state.items() if p_.numel() >= 4096} == {torch.uint8}
        assert p.memory.optimizer < 0.3 * 8 * p.n_trainable


def test_local_model_folder_shape_is_read_from_config_json(tiny_model_dir):
    p = plan.plan(FinetuneConfig(init_from=str(tiny_model_dir), block_size=64), world_size=1)
    model = load_model(str(tiny_model_dir), dtype=torch.float32)
    assert p.n_params == sum(t.numel() for t in model.parameters())
    assert p.memory.weights == _tensor_bytes(model.parameters()) + _tensor_bytes(model.buffers())


def test_lora_trainable_count_matches_peft_on_the_real_model():
    pytest.importorskip("peft")
    cfg = FinetuneConfig(**TINY, method="lora", lora_rank=4)
    p = plan.plan(cfg, world_size=1)
    torch.manual_seed(0)
    real = plan.lora_wrap(scratch_model(2, 2, 64, 32), cfg)
    trainable = [t for t in real.parameters() if t.requires_grad]
    assert p.n_trainable == sum(t.numel() for t in trainable)
    # by hand: r * (fan_in + fan_out) per adapted Conv1D; per layer attn c_attn 64->192, attn c_proj 64->64,
    # mlp c_fc 64->256, mlp c_proj 256->64
    assert p.n_trainable == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert p.memory.gradients == 4 * p.n_trainable
    assert p.memory.optimizer == 8 * p.n_trainable
    assert p.n_params == p.n_trainable + sum(t.numel() for t in scratch_model(2, 2, 64, 32).parameters())


def test_fsdp_divides_weights_gradients_and_states_by_the_world_size():
    cfg = FinetuneConfig(**TINY)
    one = plan.plan(cfg, world_size=4)
    four = plan.plan(dataclasses.replace(cfg, parallel="fsdp"), world_size=4)
    assert four.memory.weights == -(-one.memory.weights // 4)
    assert four.memory.optimizer == -(-one.memory.optimizer // 4)
    assert four.memory.activations == one.memory.activations  # per GPU: its own micro-batch
    assert one.memory == plan.plan(cfg, world_size=1).memory  # DDP: a whole copy on every GPU


def test_activation_estimate_shrinks_with_checkpointing_and_grows_with_the_batch():
    cfg = FinetuneConfig(init_from="gpt2-xl", batch_size=1, block_size=1024)
    base = plan.plan(cfg, world_size=1).memory.activations
    assert plan.plan(dataclasses.replace(cfg, gradient_checkpointing=True), 1).memory.activations < base / 4
    assert plan.plan(dataclasses.replace(cfg, batch_size=4), 1).memory.activations == 4 * base


def _saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, dtype: str) -> tuple[int, int]:
    """(bytes autograd saves for backward in the transformer's forward, bytes of those that are weight casts),
    distinct storages, parameters themselves left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.transformer.h.parameters() if p.dim() == 2}
    saved: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = (t.untyped_storage().nbytes(), t.dtype == torch.bfloat16 and tuple(t.shape) in shapes)
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model.transformer(input_ids=x, use_cache=False)
    return sum(n for n, _ in saved.values()), sum(n for n, cast in saved.values() if cast)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_estimate_is_close_to_what_autograd_saves(dtype):
    """The estimate against the tensors autograd really keeps for a 4-layer model (CPU; SDPA attention)."""
    cfg = FinetuneConfig(
        init_from="scratch", n_layer=4, n_head=4, n_embd=256, block_size=64, batch_size=3, dtype=dtype, compile=False
    )
    p = plan.plan(cfg, world_size=1)
    torch.manual_seed(0)
    model = use_fused_gelu(scratch_model(4, 4, 256, 64)).train()
    # 3 x 64 = 192 rows: no activation has a weight's shape, so bf16 tensors of those shapes are weight casts
    total, casts = _saved_activation_bytes(model, torch.randint(0, 50257, (3, 64)), dtype)
    assert abs((total - casts) - p.memory.activations) < 0.15 * p.memory.activations
    if dtype == "bfloat16":  # autocast's bf16 copies of the block weights, inside the plan's weight copies
        assert 0 < casts <= p.memory.weight_copies


def test_gpt2_xl_8bit_with_checkpointing_fits_24gb_and_full_adamw_does_not():
    started = time.perf_counter()
    eight = plan.plan(
        FinetuneConfig(init_from="gpt2-xl", optimizer="adamw8bit", gradient_checkpointing=True), world_size=1
    )
    elapsed = time.perf_counter() - started
    assert eight.n_params == 1_557_611_200  # gpt2-xl, lm_head tied to the token embedding
    assert eight.fits(24) and not eight.fits(16)
    full = plan.plan(FinetuneConfig(init_from="gpt2-xl"), world_size=1)
    assert not full.fits(24) and full.fits(40)
    assert full.memory.optimizer == 8 * full.n_trainable
    tips = plan.suggestions(full, 24)
    assert tips[0].startswith("--optimizer adamw8bit") and any("--method lora" in t for t in tips)
    assert elapsed < 3.0  # meta device: no weights, no memory


def test_world_size_from_the_environment_and_bad_input(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert plan.plan(FinetuneConfig(**TINY, parallel="fsdp")).world_size == 2
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(FakegptError, match="WORLD_SIZE"):
        plan.plan(FinetuneConfig(**TINY))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(FakegptError, match="--init-from 'nonsense'"):
        plan.plan(FinetuneConfig(init_from="nonsense"))
    with pytest.raises(FakegptError, match="--optimizer"):
        plan.plan(FinetuneConfig(**{**TINY, "optimizer": "sgd"}))


def test_gpu_memory_metrics_are_peak_allocated_and_reserved_in_gb(monkeypatch):
    from fakegpt import tracking
    from fakegpt.finetune.record import gpu_memory

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 18_300_000_000)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 19_500_000_000)
    logged = gpu_memory(torch.device("cuda", 0))
    assert logged == {tracking.M_GPU_MEM: 18.3, tracking.M_GPU_MEM_RESERVED: 19.5}
    assert tracking.M_GPU_MEM == "gpu/peak_memory_gb"


def test_resume_plans_the_saved_configuration(prepared_whatsapp, tmp_path):
    from fakegpt.finetune.train import finetune

    out = tmp_path / "run"
    saved = dict(TINY, n_embd=32, batch_size=3, gradient_accumulation_steps=1, optimizer="adamw8bit")
    pytest.importorskip("bitsandbytes")
    finetune(
        FinetuneConfig(
            **saved, data_dir=str(prepared_whatsapp), out_dir=str(out), max_iters=1, eval_iters=1, device="cpu"
        )
    )
    p = plan.plan(FinetuneConfig(init_from="resume", out_dir=str(out)), world_size=1)
    assert (p.shape["n_embd"], p.cfg.batch_size, p.cfg.block_size, p.cfg.optimizer) == (32, 3, 32, "adamw8bit")
    assert p.n_params == sum(t.numel() for t in scratch_model(2, 2, 32, 32).parameters())


def test_cli_prints_the_table_without_data_or_mlflow(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens: a plan must not connect
    missing = str(tmp_path / "no-data")
    args = ["--init-from", "gpt2-xl", "--plan", "--data-dir", missing, "--optimizer", "adamw8bit"]
    assert finetune_main([*args, "--gradient-checkpointing", "true"]) == 0
    out = capsys.readouterr().out
    assert "optimizer states (adamw8bit)" in out and "estimate" in out
    assert "24 GB card: fits" in out and "16 GB card: does not fit" in out
    assert not (tmp_path / "no-data").exists() and not Path("out/finetune").exists()


def test_cli_plan_from_the_shipped_gpt2_xl_yaml(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [sys.executable, "-m", "fakegpt", "finetune", "--config", "experiments/finetune/gpt2-xl.yaml", "--plan"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "24 GB card: does not fit; fits with:" in proc.stdout
    assert "--optimizer adamw8bit" in proc.stdout and "80 GB card: fits" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_qlora_plans_a_7b_llama_shape_on_a_24gb_card_where_lora_does_not_fit(tmp_path):
    """A Llama-2-7B-shaped folder (config.json only): QLoRA holds the linear layers in 4-bit NF4 (exact bytes:
    half a byte per weight plus the double-quantized block constants), the rest in float32."""
    import json

    shape = dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    (tmp_path / "config.json").write_text(json.dumps(shape))
    cfg = FinetuneConfig(
        init_from=str(tmp_path), method="qlora", batch_size=1, block_size=2048, gradient_checkpointing=True
    )
    q = plan.plan(cfg, world_size=1)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q, k, v, o and the gated MLP's three
    rest = q.n_params - linear  # embeddings, output layer, norms and the adapters, in float32
    assert q.memory.weights == pytest.approx(linear * plan.NF4_BYTES + rest * 4, abs=1024)
    assert q.fits(24)
    lora = plan.plan(dataclasses.replace(cfg, method="lora"), world_size=1)
    assert lora.n_trainable == q.n_trainable and not lora.fits(24)  # the same adapters on a float32 base
    assert "linear layers in 4-bit NF4" in plan.render(q)
