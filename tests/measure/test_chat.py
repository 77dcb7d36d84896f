"""`fakegpt chat` driven through its input stream, as with piped input."""

from __future__ import annotations

import io

import numpy as np
from helpers_measure import make_constant_model

from fakegpt.data.tokenizer import get_encoding
from fakegpt.measure.chat import ChatConfig, chat
from fakegpt.measure.generate import sample_batch
from fakegpt.models.loading import load_model


def run_chat(lines: str, **kwargs) -> str:
    out = io.StringIO()
    assert chat(ChatConfig(device="cpu", **kwargs), stdin=io.StringIO(lines), stdout=out) == 0
    return out.getvalue()


def test_piped_prompts_commands_files_and_quit(tmp_path, tiny_model_dir):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Vacinas causam\n", encoding="utf-8")
    model = load_model(str(tiny_model_dir), device="cpu").eval()
    enc = get_encoding()

    def greedy(text: str, n: int) -> str:
        ids = enc.encode(text)
        return text + enc.decode(sample_batch(model, [ids], max_new_tokens=n, temperature=0.0)[0].tokens)

    script = (
        "\n".join(
            [
                ":t 0",
                ":m 5",
                "As vacinas são",
                ":n 2",
                f"FILE:{prompt_file}",
                ":k nope",
                ":bogus",
                ":show",
                "FILE:/no/such/file",
                ":q",
                "never answered",
            ]
        )
        + "\n"
    )
    out = run_chat(script, model=str(tiny_model_dir), max_new_tokens=40)  # the default 280 exceeds its 256
    lines = out.splitlines()
    assert "temperature = 0" in lines and "max new tokens = 5" in lines and "num samples = 2" in lines
    assert greedy("As vacinas são", 5) in lines
    assert lines.count(greedy("Vacinas causam", 5)) == 2  # two greedy samples of the file's prompt
    assert "--- sample 2/2 ---" in lines
    assert ":k: expected an integer, got 'nope'" in lines
    assert "unknown command :bogus (:help lists them)" in lines
    assert "temperature 0, top-k 200, samples 2, max new tokens 5" in lines
    assert any(line.startswith("cannot read /no/such/file") for line in lines)
    assert "never answered" not in out


def test_end_of_input_ends_the_session_after_a_known_answer(tmp_path):
    logits = np.zeros(50257, dtype=np.float32)
    logits[get_encoding().encode(" yes")[0]] = 40.0  # this model only ever says " yes"
    folder = make_constant_model(tmp_path / "yes", logits)
    out = run_chat("Are vaccines safe?\n", model=str(folder), max_new_tokens=3, num_samples=1)
    assert out.splitlines()[0] == "Are vaccines safe? yes yes yes"
