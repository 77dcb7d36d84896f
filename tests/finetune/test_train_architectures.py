"""`fakegpt finetune --init-from FOLDER` of tiny random Llama and Qwen2 folders on GPT-2 bins of the real data:
full fine-tunes, LoRA with the architecture's default targets, resume, and the architectures it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import tiny_config

from fakegpt.cli import main as cli_main
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.train import finetune
from fakegpt.models.checkpoint import ADAPTER_DIR, CHECKPOINT_DIR, TrainingInfo


def _cfg(data_dir: Path, out: Path, model: Path, **changes) -> FinetuneConfig:
    return tiny_config(data_dir, out, init_from=str(model), **changes)


def _val_windows(data_dir: Path) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint16)[:64].astype(np.int64)).view(2, 32)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_full_finetune_learns_and_saves_a_checkpoint_of_the_same_architecture(data_dir, tmp_path, fixture, request):
    from transformers import AutoModelForCausalLM

    base = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    result = finetune(_cfg(data_dir, out, base))
    losses = [v for _, v in result.val_curve]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5 and result.best_val_loss == min(losses)

    ckpt = out / CHECKPOINT_DIR
    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    original = AutoModelForCausalLM.from_pretrained(base)
    assert type(trained) is type(original) and type(trained).__name__ in ("LlamaForCausalLM", "Qwen2ForCausalLM")
    saved, before = json.loads((ckpt / "config.json").read_text()), json.loads((base / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads", "tie_word_embeddings"):
        assert saved[key] == before[key], key
    assert saved["architectures"] == before["architectures"]
    assert trained.state_dict().keys() == original.state_dict().keys()
    assert trained.lm_head.weight is not trained.model.embed_tokens.weight  # still untied
    # every weight moved (the untied output layer and the embedding too), and the loss it reports is its own
    for name, value in original.state_dict().items():
        assert not torch.equal(trained.state_dict()[name], value), name
    assert TrainingInfo.load(ckpt).init_from == str(base)
    x = _val_windows(data_dir)
    with torch.no_grad():
        own = trained.eval()(input_ids=x, labels=x).loss
    assert own < original.eval()(input_ids=x, labels=x).loss


def test_tied_llama_resume_from_the_linked_best_model_matches_an_uninterrupted_run(
    data_dir, tmp_path, tiny_llama_tied_dir
):
    """The end state of a run whose last evaluation was saved links the best model's safetensors file, which
    leaves the tied lm_head.weight out: the resume puts it back as the token embedding."""
    from transformers import LlamaForCausalLM

    out, straight = tmp_path / "out", tmp_path / "straight"
    settings = dict(eval_interval=2, always_save_checkpoint=True)
    finetune(_cfg(data_dir, out, tiny_llama_tied_dir, max_iters=4, **settings))
    folder = state_mod.latest(out)
    assert sorted(state_mod.read_info(folder).files) == ["model.safetensors", "optimizer.pt"]
    weights, _ = state_mod.load_tensors(folder)
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    resumed = finetune(
        FinetuneConfig(init_from="resume", out_dir=str(out), max_iters=6),
        given=frozenset({"init_from", "out_dir", "max_iters"}),
    )
    uninterrupted = finetune(_cfg(data_dir, straight, tiny_llama_tied_dir, max_iters=6, **settings))
    assert resumed.iters_done == 6 and resumed.best_iter == uninterrupted.best_iter == 6
    assert [v for _, v in resumed.val_curve] == [v for _, v in uninterrupted.val_curve]
    a = LlamaForCausalLM.from_pretrained(out / CHECKPOINT_DIR)
    b = LlamaForCausalLM.from_pretrained(straight / CHECKPOINT_DIR)
    assert a.lm_head.weight is a.model.embed_tokens.weight  # still tied
    for name, value in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_lora_on_llama_adapts_q_and_v_and_resumes(data_dir, tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    common = dict(method="lora", lora_rank=4, lora_alpha=8.0, learning_rate=1e-2, eval_interval=2)
    out = tmp_path / "out"
    first = finetune(_cfg(data_dir, out, tiny_llama_dir, max_iters=4, **common))
    weights, payload = state_mod.load_tensors(state_mod.latest(out))
    # the default targets: peft's for llama; only the adapters are in the state, and only they trained
    assert {k.split(".")[-4] for k in weights} == {"q_proj", "v_proj"}
    assert len(weights) == 2 * 2 * 2 and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert len(payload["optimizer"]["state"]) == len(weights)
    config = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["fan_in_fan_out"] is False

    merged = LlamaForCausalLM.from_pretrained(out / CHECKPOINT_DIR)
    base = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    for name, value in base.state_dict().items():  # frozen: equal; adapted: moved
        assert torch.equal(merged.state_dict()[name], value) != (".q_proj." in name or ".v_proj." in name), name
    x = _val_windows(data_dir)
    with_adapter = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama_dir), out / ADAPTER_DIR)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x).logits, with_adapter.eval()(x).logits, atol=1e-4, rtol=1e-4)

    resumed = finetune(
        FinetuneConfig(init_from="resume", out_dir=str(out), max_iters=6),
        given=frozenset({"init_from", "out_dir", "max_iters"}),
    )
    straight = finetune(_cfg(data_dir, tmp_path / "straight", tiny_llama_dir, max_iters=6, **common))
    assert resumed.run_id == first.run_id and resumed.iters_done == 6
    np.testing.assert_allclose([v for _, v in resumed.val_curve], [v for _, v in straight.val_curve], rtol=1e-5)


def _bert_folder(folder: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=50257, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def _t5_folder(folder: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=50257, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "build, named",
    [(_bert_folder, "BertForMaskedLM (bert) is an encoder"), (_t5_folder, "(t5) is an encoder-decoder model")],
)
def test_cli_refuses_an_architecture_it_cannot_train_in_one_line(data_dir, tmp_path, capsys, build, named):
    folder = build(tmp_path / "model")
    out = tmp_path / "out"
    capsys.readouterr()
    argv = ["finetune", "--data-dir", str(data_dir), "--init-from", str(folder), "--out-dir", str(out)]
    assert cli_main([*argv, "--device", "cpu", "--block-size", "32", "--max-iters", "1"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"fakegpt finetune: error: {folder}: ") and named in lines[0]
    assert not (out / CHECKPOINT_DIR).exists() and not state_mod.saved(out)


def test_hub_name_of_a_llama_from_the_local_cache_trains_and_plans(data_dir, tmp_path, tiny_llama_dir, monkeypatch):
    import shutil

    import huggingface_hub.constants
    from transformers import LlamaForCausalLM

    from fakegpt.errors import FakegptError
    from fakegpt.finetune import plan

    cache = tmp_path / "hf-cache"
    repo = cache / "models--tiny-org--tiny-llama"  # as snapshot_download lays out owner/name
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / ("0" * 40))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    result = finetune(tiny_config(data_dir, tmp_path / "out", init_from="tiny-org/tiny-llama", max_iters=2))
    assert result.iters_done == 2 and TrainingInfo.load(result.checkpoint_dir).init_from == "tiny-org/tiny-llama"
    assert type(LlamaForCausalLM.from_pretrained(result.checkpoint_dir)) is LlamaForCausalLM
    p = plan.plan(FinetuneConfig(init_from="tiny-org/tiny-llama", block_size=32), world_size=1)
    assert p.family == plan.LLAMA_LIKE and p.model.startswith("tiny-org/tiny-llama (")
    with pytest.raises(FakegptError, match="'tiny-org/other' is not in the local Hugging Face cache"):
        finetune(tiny_config(data_dir, tmp_path / "other", init_from="tiny-org/other"))
