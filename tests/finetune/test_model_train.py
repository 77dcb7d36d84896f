"""The training-side helpers in fakegpt/model.py: fused output layer + loss, fused GELU, scratch models, saving."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fakegpt.data.tokenizer import VOCAB_SIZE, get_encoding
from fakegpt.errors import FakegptError
from fakegpt.finetune.loss import causal_lm_loss
from fakegpt.finetune.mfu import flops_per_token, num_params
from fakegpt.models.checkpoint import CHECKPOINT_FILES, TrainingInfo
from fakegpt.models.checkpoint_io import crc32_of
from fakegpt.models.loading import save_checkpoint, scratch_model, use_fused_gelu


@pytest.fixture()
def real_batch():
    """(x, y) windows of real Portuguese text: y is x shifted by one token."""
    text = (
        "Atenção: compartilhe antes que apaguem! A vacina não foi testada o suficiente, dizem os grupos. "
        "O Ministério da Saúde desmente a notícia e recomenda a vacinação de todos os adultos."
    )
    ids = torch.tensor(get_encoding().encode_ordinary(text)[:33])
    return torch.stack([ids[:-1], ids[:-1].flip(0)]), torch.stack([ids[1:], ids[:-1].flip(0).roll(-1)])


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_loss_matches_transformers_loss_and_gradients(real_batch):
    x, y = real_batch
    torch.manual_seed(0)
    model = scratch_model(2, 2, 64, 32)
    model.train()
    # reference: transformers' own forward (logits) + cross-entropy on the pre-shifted targets
    logits = model(input_ids=x).logits
    ref = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y.reshape(-1))
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, x, y, fused=True) / 4  # scaled, as under gradient accumulation
    loss.backward()
    assert (loss * 4).item() == pytest.approx(ref.item(), rel=1e-6)
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():  # includes the tied embedding / output weight
        torch.testing.assert_close(g * 4, ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    # evaluation (no grad, eval mode) takes the plain path and agrees
    model.eval()
    with torch.no_grad():
        assert causal_lm_loss(model, x, y).item() == pytest.approx(ref.item(), rel=1e-6)


def test_fused_loss_reuses_its_buffer_without_mixing_steps(real_batch):
    """On the CPU the (V, N) buffer of one step is written again by the next: accumulated micro-batches (forward,
    backward, forward, backward) and a batch of another size still give the reference gradients."""
    from fakegpt.finetune.loss import LinearCrossEntropy

    x, y = real_batch
    torch.manual_seed(2)
    model = scratch_model(2, 2, 64, 32)
    model.train()
    batches = [(x, y), (x.flip(1), y.flip(1)), (x[:1], y[:1]), (x, y)]
    for xb, yb in batches:
        F.cross_entropy(model(input_ids=xb).logits.reshape(-1, VOCAB_SIZE), yb.reshape(-1)).div(4).backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    LinearCrossEntropy._spare = None
    buffers = []
    for xb, yb in batches:
        (causal_lm_loss(model, xb, yb, fused=True) / 4).backward()
        buffers.append(LinearCrossEntropy._spare.data_ptr())
    assert buffers[1] == buffers[0] and buffers[3] != buffers[2]  # reused when the shape allows it
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-7, msg=name)


def test_fused_gelu_is_the_same_function(real_batch):
    x, y = real_batch
    torch.manual_seed(1)
    model = scratch_model(2, 2, 64, 32)
    model.train()
    before = causal_lm_loss(model, x, y)
    before.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    use_fused_gelu(model)
    assert type(model.transformer.h[0].mlp.act).__name__ == "GELUTanh"
    after = causal_lm_loss(model, x, y)
    after.backward()
    assert after.item() == pytest.approx(before.item(), rel=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-7, msg=name)
    assert model.config.activation_function == "gelu_new"  # the saved config keeps GPT-2's name


def test_scratch_model_shapes_flops_and_bad_sizes(tmp_path):
    model = scratch_model(4, 4, 256, 128)
    assert model.config.vocab_size == VOCAB_SIZE and model.config.n_positions == 128
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied, as GPT-2
    # 6N + 12·L·H·Q·T, with N excluding the position embedding
    n = num_params(model)
    assert n == sum(p.numel() for p in model.parameters()) - 128 * 256
    assert flops_per_token(model, 128) == 6 * n + 12 * 4 * 4 * 64 * 128
    with pytest.raises(FakegptError, match="n_embd=100 must be a multiple of n_head=3"):
        scratch_model(2, 3, 100, 32)


def test_save_checkpoint_exact_files_and_training_info(tmp_path):
    from transformers import GPT2LMHeadModel

    model = scratch_model(1, 2, 32, 16)
    info = TrainingInfo(init_from="scratch", config={"n_layer": 1}, data={}, iter=3, val_loss=2.5, tokens_seen=48)
    weights = save_checkpoint(model, tmp_path / "ckpt", info)
    folder = weights.path.parent
    assert folder == tmp_path / "ckpt" and weights.path.name == "model.safetensors"
    assert (weights.size, weights.crc32) == (weights.path.stat().st_size, crc32_of(weights.path))
    assert sorted(p.name for p in folder.iterdir()) == sorted(CHECKPOINT_FILES)
    assert json.loads((folder / "training_info.json").read_text()) == {
        "init_from": "scratch",
        "config": {"n_layer": 1},
        "data": {},
        "iter": 3,
        "val_loss": 2.5,
        "tokens_seen": 48,
        "schema_version": 1,
    }
    assert TrainingInfo.load(folder) == info
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    again = GPT2LMHeadModel.from_pretrained(folder)
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("snapshot", [False, True])
def test_save_checkpoint_writes_what_save_pretrained_writes(tmp_path, dtype, snapshot):
    """The weights go to the disk through fakegpt's own safetensors writer (direct I/O, CRC on the way), and the
    folder is byte for byte what transformers' save_pretrained writes: weights file (tied output layer left
    out), config.json, generation_config.json. Also from a host snapshot whose tied weights share one tensor,
    as the best model's writer passes it."""
    model = scratch_model(2, 2, 32, 16, dtype=dtype)
    state = None
    if snapshot:  # a copy of the weights, the tied pair kept as one tensor (BestModelWriter's host buffer)
        copies: dict[int, torch.Tensor] = {}
        state = {k: copies.setdefault(v.data_ptr(), v.detach().clone()) for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the model moves on; the snapshot is what must be saved
    reference = scratch_model(2, 2, 32, 16, dtype=dtype)
    reference.load_state_dict(state if snapshot else model.state_dict())
    reference.save_pretrained(tmp_path / "hf")
    save_checkpoint(model, tmp_path / "ours", state_dict=state)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
