"""Causal LMs other than GPT-2 on the training path: loading, the fused loss, LoRA's targets, MFU and the plan,
against tiny random Llama, Qwen2 (and Gemma2, Phi where an architecture has something special), CPU only."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_decoder_config

from fakegpt.errors import FakegptError
from fakegpt.finetune.loss import causal_lm_loss, logits_bypass
from fakegpt.models.loading import load_model, model_from_config, scratch_model

VOCAB = 50257


def _model(kind: str, tie: bool = False, seed: int = 0, **changes):
    """A tiny random model of `kind` built in memory, in training mode (dropout rates are 0 in these configs)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        return scratch_model(2, 2, 64, 64).train()
    if kind == "phi":  # an output layer with a bias, a final LayerNorm in the base model
        from transformers import PhiConfig

        config = PhiConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
        )
        return AutoModelForCausalLM.from_config(config).train()
    return AutoModelForCausalLM.from_config(tiny_decoder_config(kind, tie, **changes)).train()


def _windows(seed: int = 0, b: int = 2, t: int = 16) -> torch.Tensor:
    """(B, T + 1) token windows, as fakegpt's batches cut them: x = w[:, :-1], y = w[:, 1:]."""
    return torch.randint(0, VOCAB, (b, t + 1), generator=torch.Generator().manual_seed(seed))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "kind, tie", [("gpt2", True), ("llama", False), ("llama", True), ("qwen2", False), ("phi", False)]
)
def test_fused_loss_and_gradients_equal_the_models_own_loss(kind, tie):
    """fakegpt's x/y are pre-shifted windows: the model's own loss with labels= shifts inside, so it is given
    the whole window (T + 1 tokens); the last position's logits, which only it computes, are not in its loss."""
    model = _model(kind, tie)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    assert logits_bypass(model) is None  # these architectures take the fused path
    w = _windows()
    ref = model(input_ids=w, labels=w).loss
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, w[:, :-1], w[:, 1:], fused=True) / 4  # scaled, as under gradient accumulation
    loss.backward()
    assert (loss * 4).item() == pytest.approx(ref.item(), rel=1e-6)
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    if kind == "phi":
        assert "lm_head.bias" in grads and grads["lm_head.bias"].abs().sum() > 0
    for name, g in grads.items():  # the output layer (and its bias) and the token embedding, tied or not
        torch.testing.assert_close(g * 4, ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    model.eval()
    with torch.no_grad():  # evaluation: the plain path
        plain = causal_lm_loss(model, w[:, :-1], w[:, 1:])
    assert plain.item() == pytest.approx(ref.item(), rel=1e-5)


def test_soft_capped_logits_train_on_the_models_own_forward(caplog):
    """Gemma2 soft-caps its logits (final_logit_softcapping): the fused output layer would skip it, so the loss is
    the model's own logits' cross-entropy; the reason is logged once."""
    model = _model("gemma2", final_logit_softcapping=0.5, head_dim=16)  # a small cap: the capping is visible
    with caplog.at_level(logging.INFO, logger="fakegpt.finetune.loss"):
        assert logits_bypass(model) == "final_logit_softcapping=0.5"
        assert logits_bypass(model) == "final_logit_softcapping=0.5"
    assert sum("final_logit_softcapping" in r.getMessage() for r in caplog.records) == 1
    w = _windows()
    ref = model(input_ids=w, labels=w).loss
    loss = causal_lm_loss(model, w[:, :-1], w[:, 1:], fused=True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    uncapped = torch.nn.functional.cross_entropy(
        model.lm_head(model.model(input_ids=w[:, :-1]).last_hidden_state).reshape(-1, VOCAB), w[:, 1:].reshape(-1)
    )
    assert abs(uncapped.item() - ref.item()) > 1e-3  # what the fused path would have computed differs


def test_logit_processing_no_config_announces_is_found_by_the_probe():
    """A forward that changes the logits after the output layer (here: a scale) without a config field for it."""
    model = _model("llama")
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled
    assert logits_bypass(model) == "its forward changes the logits after the output layer"
    w = _windows()
    own = torch.nn.functional.cross_entropy(model(input_ids=w[:, :-1]).logits.reshape(-1, VOCAB), w[:, 1:].reshape(-1))
    assert causal_lm_loss(model, w[:, :-1], w[:, 1:]).item() == pytest.approx(own.item(), rel=1e-6)
    assert model.training  # the probe ran in eval mode and put the training mode back


def test_logits_processing_names_the_config_field():
    from fakegpt.models.architecture import logits_processing

    assert logits_processing(tiny_decoder_config("llama")) is None
    assert logits_processing(tiny_decoder_config("llama", logit_scale=0.0625)) == "logit_scale=0.0625"
    assert logits_processing(tiny_decoder_config("granite", logits_scaling=8.0)) == "logits_scaling=8.0"
    assert logits_processing(tiny_decoder_config("granite", logits_scaling=1.0)) is None


# --- loading ------------------------------------------------------------------------------------------------


def test_load_model_builds_the_folders_own_class_with_sdpa_and_zeroed_dropout(tiny_llama_dir, tiny_qwen2_dir):
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    llama = load_model(str(tiny_llama_dir), dtype=torch.float32, dropout=0.1)
    assert type(llama) is LlamaForCausalLM and llama.config._attn_implementation == "sdpa"
    assert llama.config.attention_dropout == 0.1 and llama.dtype == torch.float32
    qwen = load_model(str(tiny_qwen2_dir), dtype=torch.float32, dropout=0.0)
    assert type(qwen) is Qwen2ForCausalLM and qwen.config.attention_dropout == 0.0
    assert qwen.lm_head.weight is not qwen.model.embed_tokens.weight
    # the same shape rebuilt from the config dict (resume, --plan's meta device): the same class
    again = model_from_config(llama.config.to_dict())
    assert type(again) is LlamaForCausalLM and again.config._attn_implementation == "sdpa"
    assert again.state_dict().keys() == llama.state_dict().keys()


def test_gpt2_keeps_its_class_dropout_fields_and_config(tiny_model_dir):
    from transformers import GPT2LMHeadModel

    from fakegpt.models.architecture import dropout_fields
    from fakegpt.models.loading import dropout_overrides

    model = load_model(str(tiny_model_dir), dtype=torch.float32, dropout=0.0)
    assert type(model) is GPT2LMHeadModel and model.config._attn_implementation == "sdpa"
    assert dropout_fields(model.config) == ["attn_pdrop", "embd_pdrop", "resid_pdrop"]  # not summary_first_dropout
    assert dropout_overrides(0.0) == dropout_overrides(0.0, model.config)
    assert (model.config.attn_pdrop, model.config.summary_first_dropout) == (0.0, 0.1)
    assert type(model_from_config(model.config.to_dict())) is GPT2LMHeadModel


def test_an_architecture_without_sdpa_falls_back_to_eager_logged(tmp_path, caplog):
    from tiny_runs import make_tiny_decoder

    folder = make_tiny_decoder(tmp_path / "gemma2", "gemma2", head_dim=16)
    with caplog.at_level(logging.INFO, logger="fakegpt.models.loading"):
        model = load_model(str(folder), dtype=torch.float32)
    assert model.config._attn_implementation == "eager"
    assert any("Gemma2ForCausalLM has no SDPA attention" in r.getMessage() for r in caplog.records)


def _bert_folder(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(
        folder
    )
    return folder


def _t5_folder(folder: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "build, named",
    [
        (_bert_folder, "BertModel (bert) is an encoder"),
        (_t5_folder, "T5ForConditionalGeneration (t5) is an encoder-dec"),
    ],
)
def test_a_model_fakegpt_cannot_train_is_a_one_line_error(tmp_path, build, named):
    folder = build(tmp_path / "model")
    with pytest.raises(FakegptError) as refused:
        load_model(str(folder))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{folder}: {named}")
    with pytest.raises(FakegptError, match=re.escape(named)):  # the resume / meta-device path refuses it too
        model_from_config(json.loads((folder / "config.json").read_text()))


def test_an_unknown_model_type_is_a_one_line_error_naming_where():
    with pytest.raises(FakegptError, match="^out/state/iter-0000004: model_type 'nonsense' is not an architecture"):
        model_from_config({"model_type": "nonsense"}, "out/state/iter-0000004")


# --- LoRA ----------------------------------------------------------------------------------------------------


def _lora(model, **changes):
    from fakegpt.finetune import lora
    from fakegpt.finetune.config import FinetuneConfig

    return lora.wrap(model, FinetuneConfig(method="lora", lora_rank=4, **changes))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lora_default_targets_are_peft_s_for_the_architecture(kind):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    wrapped = _lora(_model(kind))
    assert sorted(wrapped.peft_config["default"].target_modules) == sorted(PEFT_DEFAULTS[kind]) == ["q_proj", "v_proj"]
    assert wrapped.peft_config["default"].fan_in_fan_out is False  # Linear layers store (out, in)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)


def test_lora_gpt2_default_is_unchanged_and_all_linear_covers_every_projection():
    gpt2 = _lora(_model("gpt2"))
    assert sorted(gpt2.peft_config["default"].target_modules) == ["c_attn", "c_fc", "c_proj"]
    assert gpt2.peft_config["default"].fan_in_fan_out is True  # Conv1D stores (in, out)
    everything = _lora(_model("llama"), lora_targets="all-linear")
    expected = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sorted(everything.peft_config["default"].target_modules) == sorted(expected)
    assert not any("lm_head" in n for n, p in everything.named_parameters() if p.requires_grad)
    explicit = _lora(_model("llama"), lora_targets="o_proj, down_proj")
    assert sorted(explicit.peft_config["default"].target_modules) == ["down_proj", "o_proj"]


def test_lora_target_the_model_lacks_names_the_modules_it_has():
    with pytest.raises(FakegptError) as refused:
        _lora(_model("llama"), lora_targets="c_attn,q_proj")
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        "--lora-targets: no module named c_attn in the model (llama has q_proj, k_proj, v_proj, o_proj, gate_proj, "
        "up_proj, down_proj)"
    )
    with pytest.raises(FakegptError, match="--lora-targets auto,q_proj: auto and all-linear stand alone"):
        _lora(_model("llama"), lora_targets="auto,q_proj")


def test_lora_merged_weights_give_the_adapted_models_logits():
    from transformers import LlamaForCausalLM

    from fakegpt.finetune import lora

    wrapped = _lora(_model("llama"))
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to merge
        for name, p in wrapped.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    merged = LlamaForCausalLM(wrapped.get_base_model().config)
    missing, unexpected = merged.load_state_dict(lora.merged_state(wrapped), strict=False)
    assert not unexpected and not missing
    x = _windows()[:, :-1]
    wrapped.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x).logits, wrapped(input_ids=x).logits, atol=1e-5, rtol=1e-5)


# --- MFU and the plan ---------------------------------------------------------------------------------------


def test_flops_count_an_untied_token_embedding_as_a_lookup():
    from fakegpt.finetune.mfu import flops_per_token, num_params

    untied, tied = _model("llama", tie=False), _model("llama", tie=True)
    total = sum(p.numel() for p in untied.parameters())
    assert num_params(untied) == total - VOCAB * 64  # the embedding lookup does no matmul; lm_head does
    assert num_params(tied) == sum(p.numel() for p in tied.parameters())  # tied: the one table is the lm_head
    attention = 12 * 2 * 4 * 16 * 128  # layers x query heads x head_dim x context
    n_base = num_params(untied)
    assert flops_per_token(untied, 128) == 6 * n_base + attention
    adapted = _lora(untied)
    adapters = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert adapters == 2 * 4 * ((64 + 64) + (64 + 32))  # rank 4: q_proj 64->64, v_proj 64->32 (2 kv heads)
    # the frozen base at 4 per token (its untied embedding at none), the adapters at 6
    assert flops_per_token(adapted, 128) == 4 * n_base + 6 * adapters + attention


def test_plan_of_a_llama_folder_is_exact_and_says_its_family(tiny_llama_dir):
    from fakegpt.finetune import plan
    from fakegpt.finetune.config import FinetuneConfig

    p = plan.plan(FinetuneConfig(init_from=str(tiny_llama_dir), block_size=64, batch_size=2), world_size=1)
    real = load_model(str(tiny_llama_dir), dtype=torch.float32)
    assert p.n_params == sum(t.numel() for t in real.parameters())  # embed_tokens and lm_head: two tables
    assert p.memory.weights == sum(t.numel() * 4 for t in real.parameters()) + sum(
        t.numel() * t.element_size() for t in real.buffers()
    )
    assert p.family == plan.LLAMA_LIKE and p.shape["n_kv_head"] == 2 and p.shape["n_positions"] == 256
    text = plan.render(p)
    assert "2 layers, 4 heads (2 key/value), 64 embd, vocab 50257" in text
    assert "Activations are an estimate for Llama-like (RMSNorm, gated MLP) decoder layers" in text
    lora_plan = plan.plan(
        FinetuneConfig(init_from=str(tiny_llama_dir), block_size=64, method="lora", lora_rank=4), world_size=1
    )
    assert lora_plan.n_trainable == sum(t.numel() for t in _lora(real).parameters() if t.requires_grad)
    with pytest.raises(FakegptError, match="--block-size 512 is larger than the model's context \\(256\\)"):
        plan.plan(FinetuneConfig(init_from=str(tiny_llama_dir), block_size=512), world_size=1)


def _saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, dtype: str) -> int:
    """Bytes autograd saves for backward in the decoder's forward: distinct storages, no parameters and no
    half-precision weight casts (the plan counts those as weight copies)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {s for p in model.parameters() if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape[::-1]))}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and not (t.dtype == torch.bfloat16 and tuple(t.shape) in shapes):
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model.model(input_ids=x, use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_activation_estimate_is_close_to_what_autograd_saves(tmp_path, dtype):
    from tiny_runs import make_tiny_decoder

    from fakegpt.finetune import plan
    from fakegpt.finetune.config import FinetuneConfig

    shape = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, num_key_value_heads=2)
    folder = make_tiny_decoder(tmp_path / "llama", "llama", **shape)
    cfg = FinetuneConfig(init_from=str(folder), block_size=64, batch_size=3, dtype=dtype, compile=False)
    p = plan.plan(cfg, world_size=1)
    model = load_model(str(folder), dtype=torch.float32).train()
    total = _saved_activation_bytes(model, torch.randint(0, VOCAB, (3, 64)), dtype)
    assert abs(total - p.memory.activations) < 0.15 * p.memory.activations
