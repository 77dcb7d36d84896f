"""A study with a model that is not GPT-2 and brings its own tokenizer (a tiny Llama with a 70,000-id BPE, so the
bins are uint32): prepare -> finetune (full, resumed, LoRA) -> sample -> score, and the MLflow project's main."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fakegpt import cli, tracking
from fakegpt.data import hf_tokenizer
from fakegpt.data.bins import eval_starts, open_bin

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ["--block-size", "64", "--batch-size", "2", "--gradient-accumulation-steps", "1", "--eval-interval", "3"]
FINETUNE += ["--eval-iters", "2", "--learning-rate", "3e-3", "--warmup-iters", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, big_vocab_llama, shared_data, _mlflow_template_db):
    """The model's bins and a 6-iteration fine-tune of it (shared by the tests below), in a store of their own."""
    import shutil

    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("own-tokenizer")
    shutil.copyfile(_mlflow_template_db, root / "mlflow.db")
    data, tuned = root / "data", root / "finetune"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # set by earlier tests' runs
            mp.delenv(name, raising=False)
        argv = ["prepare", "--inputs", str(shared_data / "fakewhatsapp_br.csv"), "--out", str(data)]
        assert cli.main([*argv, "--tokenizer", str(big_vocab_llama)]) == 0
        argv = ["finetune", "--init-from", str(big_vocab_llama), "--data-dir", str(data), "--out-dir", str(tuned)]
        assert cli.main([*argv, "--max-iters", "6", "--save-interval", "3", *FINETUNE]) == 0
        client = MlflowClient()
        run = client.search_runs(
            [client.get_experiment_by_name("fakegpt").experiment_id], order_by=["attributes.start_time DESC"]
        )[0]
    return {"root": root, "data": data, "tuned": tuned, "run": run}


def test_prepare_writes_uint32_bins_of_the_model_s_own_ids(study, big_vocab_llama, shared_data):
    from transformers import AutoTokenizer

    meta = json.loads((study["data"] / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["tokenizer"]["vocab_size"] == 70_000
    ids = np.asarray(open_bin(study["data"], "train", 64))
    assert ids.dtype == np.uint32 and int(ids.max()) >= 1 << 16
    tok = AutoTokenizer.from_pretrained(str(big_vocab_llama))
    first = ids[: int(np.flatnonzero(ids == tok.eos_token_id)[0])]  # the first message, before its EOS
    assert tok.decode(first.tolist()).strip() != "" and len(first) > 0


def test_the_checkpoint_carries_the_model_s_tokenizer_and_its_run_says_which(study, big_vocab_llama):
    checkpoint = study["tuned"] / "checkpoint"
    model_id = hf_tokenizer.identify(big_vocab_llama, "model", "test")
    saved_id = hf_tokenizer.identify(checkpoint, "checkpoint", "test")
    assert hf_tokenizer.same_tokenizer(model_id, saved_id) and not saved_id.is_gpt2
    assert not (checkpoint / "merges.txt").exists()  # not GPT-2's files
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 70_000
    assert study["run"].data.metrics["val/loss"] < math.log(70_000)  # it learnt something in 6 iterations


def test_resume_and_lora_keep_the_model_s_tokenizer(study, big_vocab_llama):
    tuned = study["tuned"]
    assert cli.main(["finetune", "--init-from", "resume", "--out-dir", str(tuned), "--max-iters", "9"]) == 0
    assert not hf_tokenizer.identify(tuned / "checkpoint", "resumed", "test").is_gpt2
    lora = study["root"] / "lora"
    argv = ["finetune", "--init-from", str(big_vocab_llama), "--data-dir", str(study["data"]), "--out-dir", str(lora)]
    assert cli.main([*argv, "--method", "lora", "--max-iters", "3", *FINETUNE]) == 0
    assert not hf_tokenizer.identify(lora / "checkpoint", "lora", "test").is_gpt2


def test_sample_asks_with_the_model_s_tokenizer_and_greedy_equals_generate(study, tmp_path):
    import polars as pl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = study["tuned"] / "checkpoint"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A vacina contra a COVID-19\nO chip da vacina\n", encoding="utf-8")
    out = tmp_path / "sample"
    argv = ["sample", "--models", str(checkpoint), "--prompts", str(prompts), "--temperatures", "0"]
    assert cli.main([*argv, "--num-samples", "1", "--max-new-tokens", "8", "--out-dir", str(out)]) == 0
    table = pl.read_parquet(out / "samples.parquet")
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    for row in table.iter_rows(named=True):
        ids = torch.tensor([tok.encode(row["prompt"], add_special_tokens=False)])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        new = want[0, ids.shape[1] :].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert row["completion"] == tok.decode(new)


def test_score_measures_bits_per_byte_with_the_model_s_tokenizer(study, tmp_path):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fakegpt.measure.score import VAL_BLOCK

    checkpoint = study["tuned"] / "checkpoint"
    out = tmp_path / "score"
    argv = ["score", "--models", str(checkpoint), "--data-dir", str(study["data"]), "--out-dir", str(out)]
    assert cli.main([*argv, "--val-windows", "4"]) == 0
    run = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("fakegpt").experiment_id], order_by=["attributes.start_time DESC"]
    )[0]
    assert run.data.tags[tracking.TAG_STAGE] == "score"
    assert math.isfinite(run.data.metrics["claim/score"])
    # by hand: the same windows through the model's own forward, their loss in bits over the text's bytes
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    block = min(VAL_BLOCK, model.config.max_position_embeddings - 1)
    data = open_bin(study["data"], "val", block)
    nats, size = 0.0, 0
    for start in eval_starts(len(data), block, 4):
        ids = torch.tensor(np.asarray(data[start : start + block + 1]).astype(np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None, :-1]).logits[0].double(), dim=-1)
        nats -= float(logp.gather(-1, ids[1:, None]).sum())
        text = [t for t in ids[1:].tolist() if t != tok.eos_token_id]
        size += len(tok.decode(text).encode("utf-8"))
    assert run.data.metrics["val/bits_per_byte"] == pytest.approx(nats / math.log(2) / size, rel=1e-4)


def test_gpt2_bins_are_refused_for_this_model(study, prepared_whatsapp, tmp_path, capsys):
    checkpoint = study["tuned"] / "checkpoint"
    argv = ["score", "--models", str(checkpoint), "--data-dir", str(prepared_whatsapp), "--out-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bins made with tokenizer gpt2" in err[0]


@pytest.mark.slow
def test_mlflow_run_main_with_a_model_that_brings_its_own_tokenizer(tmp_path, big_vocab_llama):
    """The chain prepares the bins with the model's tokenizer, fine-tunes, samples and scores it."""
    from mlflow.tracking import MlflowClient

    config = tmp_path / "finetune.yaml"
    config.write_text(
        "block_size: 64\nbatch_size: 2\ngradient_accumulation_steps: 1\nmax_iters: 4\neval_interval: 2\n"
        "eval_iters: 2\nlearning_rate: 3.0e-3\nwarmup_iters: 0\ndevice: cpu\n",
        encoding="utf-8",
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    params = ["-P", f"init_from={big_vocab_llama}", "-P", f"finetune_config={config}", "-P", "num_samples=1"]
    params += ["-P", "max_new_tokens=4", "-P", f"out_root={tmp_path / 'out'}"]
    done = subprocess.run(
        ["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "main", *params],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("Default").experiment_id], max_results=50)
    by_step = {r.data.tags.get(tracking.TAG_ENTRY_POINT): r for r in runs}
    assert by_step["prepare"].data.params["tokenizer"] == str(big_vocab_llama)
    assert by_step["score"].data.tags[tracking.TAG_ARCHITECTURE] == "LlamaForCausalLM,LlamaForCausalLM"
    # the fine-tuned model against its base, claim by claim, both in the model's own tokens
    tuned = [r for r in runs if r.data.tags.get(tracking.TAG_REFERENCE) == str(big_vocab_llama)]
    assert len(tuned) == 1 and math.isfinite(tuned[0].data.metrics["paired/claim/score"])
    assert math.isfinite(tuned[0].data.metrics["val/bits_per_byte"])


def test_qlora_trains_adapters_on_a_4bit_base_and_saves_a_plain_merged_model(study, big_vocab_llama):
    """--method qlora on the CPU (bitsandbytes' CPU backend): the frozen base in 4-bit NF4, the adapters trained,
    the checkpoint a plain model (no quantization config) = dequantized base + adapters."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = study["root"] / "qlora"
    argv = ["finetune", "--init-from", str(big_vocab_llama), "--data-dir", str(study["data"]), "--out-dir", str(out)]
    assert cli.main([*argv, "--method", "qlora", "--max-iters", "3", *FINETUNE]) == 0
    checkpoint = out / "checkpoint"
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    merged = load_file(checkpoint / "model.safetensors")
    four_bit = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        str(big_vocab_llama), quantization_config=four_bit, device_map={"": "cpu"}, dtype=torch.float32
    )
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        module = base.get_submodule(name.removesuffix(".weight"))
        plain = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        delta = (merged[name].float() - plain).abs().max().item()
        if "q_proj" in name:  # adapted (peft's default for Llama: q_proj, v_proj): moved by the adapters
            assert delta > 5e-3, delta
        else:  # not adapted: the dequantized 4-bit base, exactly (its CPU re-layout is kept off)
            assert delta < 1e-6, delta
    assert not hf_tokenizer.identify(checkpoint, "qlora", "test").is_gpt2
    reloaded = AutoModelForCausalLM.from_pretrained(str(checkpoint))  # a plain model: sample and score load it
    assert type(reloaded).__name__ == "LlamaForCausalLM"


def test_an_instruction_model_is_asked_through_its_chat_template(big_vocab_llama, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from fakegpt.measure.prompts import Prompt
    from fakegpt.measure.sample import encode_prompts
    from fakegpt.models.codec import codec_for

    folder = tmp_path / "instruct"
    shutil.copytree(big_vocab_llama, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    codec = codec_for(folder)
    assert codec.chat_template and not codec_for(big_vocab_llama).chat_template
    tok = AutoTokenizer.from_pretrained(str(folder))
    want = tok.apply_chat_template([{"role": "user", "content": "A vacina"}], add_generation_prompt=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    prompt = Prompt(prompt_id="p", topic="t", framing="f", language="pt", template_id="x", text="A vacina")
    assert encode_prompts(codec, [prompt], chat=True) == [list(want)]
    assert encode_prompts(codec, [prompt], chat=False) == [tok.encode("A vacina", add_special_tokens=False)]
    assert encode_prompts(codec_for(big_vocab_llama), [prompt], chat=True) == encode_prompts(
        codec_for(big_vocab_llama), [prompt], chat=False
    )  # no template: the plain prompt


def test_a_registered_model_with_its_own_tokenizer_scores_as_its_checkpoint(study, big_vocab_llama, tmp_path):
    """The best model registered in MLflow (transformers flavour, with its own tokenizer): `models:/NAME@ALIAS`
    is scored in the model's own tokens, claim by claim as the checkpoint folder it came from."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "tuned"
    argv = ["finetune", "--init-from", str(big_vocab_llama), "--data-dir", str(study["data"]), "--out-dir", str(out)]
    argv += ["--max-iters", "2", "--register-as", "llama-tiny", "--register-alias", "a", *FINETUNE]
    assert cli.main(argv) == 0
    client = MlflowClient()
    version = client.get_model_version_by_alias("llama-tiny", "a")
    assert version.tags[tracking.TAG_TRAINING_INFO].endswith("/checkpoint/training_info.json")
    scores = {}
    for name, model in (("registered", "models:/llama-tiny@a"), ("folder", str(out / "checkpoint"))):
        args = ["score", "--models", model, "--out-dir", str(tmp_path / name), "--bootstrap", "50"]
        assert cli.main(args) == 0
        run = client.search_runs(
            [client.get_experiment_by_name("fakegpt").experiment_id], order_by=["attributes.start_time DESC"]
        )[0]
        assert run.data.tags[tracking.TAG_ARCHITECTURE] == "LlamaForCausalLM"
        assert run.data.tags[tracking.TAG_TOKENIZER] != "gpt2"
        scores[name] = run.data.metrics["claim/score"]
    assert math.isfinite(scores["folder"]) and scores["registered"] == pytest.approx(scores["folder"], abs=1e-6)


def test_qlora_resumes_from_its_state_with_the_4bit_base(study, big_vocab_llama):
    """A QLoRA fine-tune stopped at its save point continues from its resume state: the same method, the
    iterations counted on from the saved one, and the checkpoint again a plain merged model."""
    out = study["root"] / "qlora-resume"
    argv = ["finetune", "--init-from", str(big_vocab_llama), "--data-dir", str(study["data"]), "--out-dir", str(out)]
    assert cli.main([*argv, "--method", "qlora", "--max-iters", "2", "--save-interval", "2", *FINETUNE]) == 0
    assert cli.main(["finetune", "--init-from", "resume", "--out-dir", str(out), "--max-iters", "4"]) == 0
    from mlflow.tracking import MlflowClient

    info = json.loads((out / "checkpoint" / "training_info.json").read_text())
    assert info["config"]["method"] == "qlora" and info["init_from"] == str(big_vocab_llama)
    client = MlflowClient()
    run = client.search_runs(
        [client.get_experiment_by_name("fakegpt").experiment_id], order_by=["attributes.start_time DESC"]
    )[0]
    assert [s for s, _ in tracking.metric_history(run.info.run_id, "val/loss")][-1] == 4
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert "quantization_config" not in config
