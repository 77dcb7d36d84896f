"""`fakegpt chat`: type a prompt, get samples from one model. Also answers piped input, line by line.

    fakegpt chat --model runs:/<finetune run id> --num-samples 3
    echo "As vacinas são seguras?" | fakegpt chat --model out/finetune/checkpoint --max-new-tokens 60

A line is a prompt, `FILE:path` reads the prompt from a file, and lines starting with `:` are commands
(`:help` lists them; `:q` quits). In a terminal, arrow keys recall earlier prompts (readline history, kept
in ~/.fakegpt_chat_history or $FAKEGPT_CHAT_HISTORY). Models load from the same specs as `sample`.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from fakegpt import config
from fakegpt.errors import FakegptError
from fakegpt.measure.generate import sample_batch
from fakegpt.measure.sample import stop_ids
from fakegpt.models.codec import Codec, codec_for
from fakegpt.models.device import resolve_device, resolve_dtype, torch_dtype
from fakegpt.models.refs import configured_context, context_length, load_for_inference, resolve_model

HELP = """commands:
  :t VALUE   temperature (0 = greedy)        :k VALUE   top-k (0 = off)
  :n VALUE   samples per prompt              :m VALUE   max new tokens
  :show      current settings                :help      this text
  :q         quit (also Ctrl-D)
  FILE:path  use the contents of a file as the prompt"""

# command -> (setting, type, minimum)
SETTINGS = {
    ":t": ("temperature", float, 0.0),
    ":temperature": ("temperature", float, 0.0),
    ":k": ("top_k", int, 0),
    ":top-k": ("top_k", int, 0),
    ":n": ("num_samples", int, 1),
    ":samples": ("num_samples", int, 1),
    ":m": ("max_new_tokens", int, 1),
    ":max-tokens": ("max_new_tokens", int, 1),
}


@dataclass
class ChatConfig:
    """`fakegpt chat` settings; `:t`, `:k`, `:n`, `:max` change them during a session."""

    model: str = field(
        default="gpt2", metadata={"help": "hub name, local HF folder, runs:/<run_id>[/checkpoint] or models:/..."}
    )
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (0 = greedy)"})
    top_k: int = field(default=200, metadata={"help": "sample from the k most likely tokens (0 = off)"})
    num_samples: int = field(default=1, metadata={"help": "samples per prompt"})
    max_new_tokens: int = field(default=280, metadata={"help": "new tokens per sample"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, float32 on CPU) | float32 | ..."})
    seed: int = field(default=1337, metadata={"help": "random seed of the session"})
    chat_template: bool = field(
        default=True,
        metadata={"help": "send each line through the model's chat template when its tokenizer has one"},
    )


class ChatSession:
    """One model and its settings; `handle(line)` answers a line and says whether to go on."""

    def __init__(self, model: Any, cfg: ChatConfig, out: TextIO, codec: Codec | None = None):
        self.model, self.cfg, self.out = model, cfg, out
        self.codec = codec or Codec()  # the model's tokenizer (default GPT-2's)
        self.chat = cfg.chat_template and self.codec.chat_template
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)

    def say(self, text: str) -> None:
        """Print one reply line to the session's output."""
        print(text, file=self.out, flush=True)

    def handle(self, line: str) -> bool:
        """Answer one input line (a prompt, a `:command` or `FILE: path`); False when the session should end."""
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            return True
        if command in (":q", ":quit", ":exit"):
            return False
        if command.startswith(":"):
            self.command(command)
            return True
        if command.startswith("FILE:"):
            path = Path(command[len("FILE:") :].strip()).expanduser()
            try:
                text = path.read_text(encoding="utf-8").rstrip("\n")
            except (OSError, UnicodeDecodeError) as exc:
                self.say(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
                return True
        self.generate(text)
        return True

    def command(self, command: str) -> None:
        """Run a `:command` (help, show, or change a setting within its allowed range)."""
        name, _, value = command.partition(" ")
        if name in (":help", ":h", ":?"):
            self.say(HELP)
        elif name == ":show":
            c = self.cfg
            self.say(
                f"temperature {c.temperature:g}, top-k {c.top_k}, samples {c.num_samples}, "
                f"max new tokens {c.max_new_tokens}"
            )
        elif name in SETTINGS:
            setting, kind, minimum = SETTINGS[name]
            try:
                parsed = kind(value.strip())
            except ValueError:
                self.say(f"{name}: expected {'a number' if kind is float else 'an integer'}, got {value.strip()!r}")
                return
            if not math.isfinite(parsed) or parsed < minimum:
                self.say(f"{name}: must be a number of at least {minimum}")
                return
            if setting == "max_new_tokens" and parsed >= context_length(self.model):
                self.say(f"{name}: must be below the model's context of {context_length(self.model)} tokens")
                return
            setattr(self.cfg, setting, parsed)
            self.say(f"{setting.replace('_', ' ')} = {parsed:g}")
        else:
            self.say(f"unknown command {name} (:help lists them)")

    def generate(self, prompt: str) -> None:
        """Sample the configured completions of `prompt`, cut to fit the context, and print them."""
        ids = self.codec.chat(prompt) if self.chat else self.codec.encode(prompt, special=True)
        if not ids:
            return
        keep = context_length(self.model) - self.cfg.max_new_tokens
        if keep < 1:
            self.say(f"max new tokens {self.cfg.max_new_tokens} leaves no room for a prompt in the model's context")
            return
        if len(ids) > keep:
            self.say(f"(prompt cut to its last {keep} tokens to fit the context)")
            ids = ids[-keep:]
        out = sample_batch(
            self.model,
            [ids] * self.cfg.num_samples,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            top_k=self.cfg.top_k,
            generator=self.generator,
            eot=self.codec.eos,
            stop=stop_ids(self.model, self.codec),
        )
        for i, completion in enumerate(out, start=1):
            if self.cfg.num_samples > 1:
                self.say(f"--- sample {i}/{self.cfg.num_samples} ---")
            answer = self.codec.decode(completion.tokens)
            self.say(answer if self.chat else self.codec.decode(ids) + answer)  # a chat shows the answer alone
        self.say("")


def _setup_history() -> None:
    """Readline history across sessions (terminals only; a missing readline module is not an error)."""
    try:
        import atexit
        import readline
    except ImportError:
        return
    path = os.environ.get("FAKEGPT_CHAT_HISTORY", str(Path.home() / ".fakegpt_chat_history"))
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


def check(cfg: ChatConfig) -> None:
    """Reject bad settings before loading the model, naming the flag."""
    for name in ("num_samples", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise FakegptError(f"{config.flag_name(name)}: must be at least 1, got {getattr(cfg, name)}")
    if cfg.top_k < 0:
        raise FakegptError(f"--top-k: must be >= 0 (0 = off), got {cfg.top_k}")
    if not math.isfinite(cfg.temperature) or cfg.temperature < 0:
        raise FakegptError(f"--temperature: must be a number >= 0 (0 = greedy), got {cfg.temperature}")


def chat(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run the loop until `:q` or end of input. Piped input gets no prompt marker and no banner."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    check(cfg)
    ref = resolve_model(cfg.model)  # config.json and weight headers checked here
    limit = configured_context(ref)
    if cfg.max_new_tokens >= limit:
        raise FakegptError(
            f"--max-new-tokens {cfg.max_new_tokens}: leaves no room for a prompt in the context of model "
            f"{cfg.model} ({limit} tokens)"
        )
    device = resolve_device(cfg.device)
    model = load_for_inference(ref, device, torch_dtype(resolve_dtype(cfg.dtype, device)))
    session = ChatSession(model, cfg, stdout, codec_for(ref.folder, cfg.model))
    interactive = stdin.isatty() and stdin is sys.stdin
    if interactive:
        _setup_history()
        session.say(f"fakegpt chat: {cfg.model} on {device}. Type a prompt; :help for commands, :q to quit.")
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                session.say("")
                return 0
        else:
            line = stdin.readline()
            if not line:
                return 0
        if not session.handle(line):
            return 0


def main(argv: list[str]) -> int:
    """`fakegpt chat [flags]`; returns the exit status."""
    cfg = config.parse(ChatConfig, argv, prog="fakegpt chat", description=__doc__.splitlines()[0])
    return chat(cfg)
