"""`fakegpt sample`: a grid of models x prompts x temperatures x samples, into tables, a report and MLflow.

    fakegpt sample --models gpt2,runs:/<finetune run id> --temperatures 0.7,1.0 --num-samples 5

Rows are batched across prompts and samples (left-padded, KV cache, top-k before softmax: fakegpt.measure.generate).
The same grid, seed and batch size give the same text. Each batch's random stream depends on the seed, the
temperature and the batch's position, not on the model, so base and fine-tuned models draw with the same
random numbers (a fairer side-by-side comparison).
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from fakegpt import config, tracking
from fakegpt.errors import FakegptError
from fakegpt.files import atomic_path, write_text
from fakegpt.measure.generate import sample_batch
from fakegpt.measure.prompts import DEFAULT_PROMPTS, Prompt, load_prompts, resolve_path
from fakegpt.models.codec import Codec, codec_for
from fakegpt.models.device import resolve_device, resolve_dtype, torch_dtype
from fakegpt.models.refs import ModelRef, configured_context, context_length, load_for_inference, resolve_model

log = logging.getLogger(__name__)

COLUMNS = [
    "sample_id",
    "model",
    "prompt_id",
    "topic",
    "framing",
    "language",
    "template_id",
    "prompt",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "sample_index",
    "completion",
    "new_tokens",
    "stopped",
]


@dataclass
class SampleConfig:
    """`fakegpt sample` settings: models x prompt grid x temperatures x samples."""

    models: list[str] = field(
        default_factory=lambda: ["gpt2"],
        metadata={
            "help": "models, comma-separated: hub names, local HF folders, runs:/<run_id>[/checkpoint], models:/..."
        },
    )
    prompts: str = field(
        default=DEFAULT_PROMPTS,
        metadata={"help": "prompt grid YAML (experiments/prompts/) or a text file with one prompt per line"},
    )
    temperatures: list[float] = field(
        default_factory=lambda: [0.8], metadata={"help": "sampling temperatures, comma-separated (0 = greedy)"}
    )
    top_k: int = field(default=200, metadata={"help": "sample from the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1.0 = off)"})
    num_samples: int = field(default=5, metadata={"help": "samples per prompt and temperature"})
    max_new_tokens: int = field(default=280, metadata={"help": "new tokens per sample (stops early at end-of-text)"})
    seed: int = field(default=1337, metadata={"help": "random seed; same grid + seed + batch size = same text"})
    batch_size: int = field(default=32, metadata={"help": "sequences decoded together"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, float32 on CPU) | float32 | ..."})
    chat_template: bool = field(
        default=True,
        metadata={
            "help": "ask a model whose tokenizer has a chat template (an instruction-tuned model) through it, as "
            "a user's question; models without one get the plain prompt (GPT-2, base models)"
        },
    )
    out_dir: str = field(default="out/sample", metadata={"help": "where samples.parquet/jsonl and report.md go"})


@dataclass
class SampleResult:
    """The sample table (one row per completion), where it was written, and the generation speed."""

    table: pl.DataFrame
    out_dir: Path
    new_tokens_per_s: float
    run_id: str | None = None


def check(cfg: SampleConfig) -> None:
    """Reject bad combinations before loading any model."""
    if not cfg.models or any(not m.strip() for m in cfg.models):
        raise FakegptError("--models: give at least one model")
    if not cfg.temperatures or any(not math.isfinite(t) or t < 0 for t in cfg.temperatures):
        raise FakegptError(f"--temperatures: expected values >= 0, got {cfg.temperatures}")
    for name in ("num_samples", "max_new_tokens", "batch_size"):
        if getattr(cfg, name) < 1:
            raise FakegptError(f"{config.flag_name(name)}: must be at least 1")
    if cfg.top_k < 0:
        raise FakegptError("--top-k: must be >= 0 (0 = off)")
    if not 0 < cfg.top_p <= 1:
        raise FakegptError("--top-p: must be in (0, 1]")


def batch_seed(seed: int, temperature_index: int, batch_index: int) -> int:
    """An independent, reproducible seed per (temperature, batch), the same for every model."""
    return int(np.random.SeedSequence([seed, temperature_index, batch_index]).generate_state(1)[0])


def sample_id(model: str, prompt_id: str, temperature: float, top_k: int, top_p: float, seed: int, index: int) -> str:
    """A short stable key for a sample (label sheets join on it)."""
    key = f"{model}|{prompt_id}|{temperature:g}|{top_k}|{top_p:g}|{seed}|{index}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="seq", disable=not sys.stderr.isatty(), leave=False)


def encode_prompts(codec: Codec, prompts: list[Prompt], chat: bool) -> list[list[int]]:
    """Each prompt's ids for one model: through its chat template when `chat` and it has one, else as text
    ("<|endoftext|>" and the like in a prompt are the special tokens they name)."""
    if chat and codec.chat_template:
        return [codec.chat(p.text) for p in prompts]
    return [codec.encode(p.text, special=True) for p in prompts]


def check_fits(prompts: list[Prompt], prompts_path: Path, cfg: SampleConfig, refs: list[ModelRef]) -> None:
    """Every prompt plus --max-new-tokens fits every model's context (read from config.json, before loading)."""
    for ref in refs:
        encoded = encode_prompts(codec_for(ref.folder, ref.spec), prompts, cfg.chat_template)
        i = max(range(len(prompts)), key=lambda k: len(encoded[k]))
        n, longest = len(encoded[i]), prompts[i]
        limit = configured_context(ref)
        if n + cfg.max_new_tokens > limit:
            raise FakegptError(
                f"{prompts_path}: prompt {longest.prompt_id!r} ({n} tokens) + --max-new-tokens {cfg.max_new_tokens} "
                f"exceeds the context of model {ref.spec} ({limit} tokens)"
            )


def stop_ids(model: Any, codec: Codec) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and those the model's generation config names (a chat
    model's end of turn, e.g. Llama 3's <|eot_id|>)."""
    config = getattr(model, "generation_config", None)
    named = getattr(config, "eos_token_id", None) if config is not None else None
    extra = named if isinstance(named, list) else [named] if named is not None else []
    return sorted({codec.eos, *(int(i) for i in extra)})


def sample_model(
    model: Any, spec: str, prompts: list[Prompt], cfg: SampleConfig, codec: Codec | None = None
) -> tuple[list[dict], int, float]:
    """All rows for one loaded model: (rows, new tokens, seconds spent generating); `codec`: its tokenizer
    (default GPT-2's)."""
    codec = codec or Codec()
    encoded = encode_prompts(codec, prompts, cfg.chat_template)
    stops = stop_ids(model, codec)
    limit = context_length(model)
    for p, ids in zip(prompts, encoded, strict=True):
        if len(ids) + cfg.max_new_tokens > limit:
            raise FakegptError(
                f"prompt {p.prompt_id!r} ({len(ids)} tokens) + --max-new-tokens {cfg.max_new_tokens} "
                f"exceeds the model's context of {limit} tokens"
            )
    jobs = [(i, s) for i in range(len(prompts)) for s in range(cfg.num_samples)]  # (prompt index, sample index)
    device = next(model.parameters()).device
    rows: list[dict] = []
    produced, seconds = 0, 0.0
    with _progress(len(jobs) * len(cfg.temperatures), f"sample {spec}") as bar:
        for t_index, temperature in enumerate(cfg.temperatures):
            for b_index, start in enumerate(range(0, len(jobs), cfg.batch_size)):
                batch = jobs[start : start + cfg.batch_size]
                gen = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, t_index, b_index))
                began = time.perf_counter()
                out = sample_batch(
                    model,
                    [encoded[i] for i, _ in batch],
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=temperature,
                    top_k=cfg.top_k,
                    top_p=cfg.top_p,
                    generator=gen,
                    eot=codec.eos,
                    stop=stops,
                )
                seconds += time.perf_counter() - began
                for (i, s), completion in zip(batch, out, strict=True):
                    p = prompts[i]
                    produced += len(completion.tokens)
                    rows.append(
                        {
                            "sample_id": sample_id(spec, p.prompt_id, temperature, cfg.top_k, cfg.top_p, cfg.seed, s),
                            "model": spec,
                            "prompt_id": p.prompt_id,
                            "topic": p.topic,
                            "framing": p.framing,
                            "language": p.language,
                            "template_id": p.template_id,
                            "prompt": p.text,
                            "temperature": float(temperature),
                            "top_k": cfg.top_k,
                            "top_p": float(cfg.top_p),
                            "seed": cfg.seed,
                            "sample_index": s,
                            "completion": codec.decode(completion.tokens),
                            "new_tokens": len(completion.tokens),
                            "stopped": completion.stopped,
                        }
                    )
                bar.update(len(batch))
    return rows, produced, seconds


def report_markdown(table: pl.DataFrame, cfg: SampleConfig) -> str:
    """The samples grouped by topic and prompt, as people read them."""
    lines = [
        "# Samples",
        "",
        f"- models: {', '.join(f'`{m}`' for m in cfg.models)}",
        f"- prompts: `{cfg.prompts}`; temperatures: {', '.join(f'{t:g}' for t in cfg.temperatures)}; "
        f"top-k {cfg.top_k}; top-p {cfg.top_p:g}; {cfg.num_samples} samples each; "
        f"up to {cfg.max_new_tokens} new tokens; seed {cfg.seed}",
        "",
    ]
    for topic in table["topic"].unique(maintain_order=True).to_list():
        lines += [f"## {topic}", ""]
        by_topic = table.filter(pl.col("topic") == topic)
        for prompt_id in by_topic["prompt_id"].unique(maintain_order=True).to_list():
            rows = by_topic.filter(pl.col("prompt_id") == prompt_id)
            first = rows.row(0, named=True)
            where = " · ".join(x for x in (first["language"], first["framing"]) if x)
            lines += [f"### {first['prompt']}", "", f"*{prompt_id}*" + (f" ({where})" if where else ""), ""]
            for row in rows.sort(["model", "temperature", "sample_index"], maintain_order=True).iter_rows(named=True):
                end = "stopped at end-of-text" if row["stopped"] else "hit max tokens"
                lines.append(
                    f"**`{row['model']}`** · T={row['temperature']:g} · sample {row['sample_index']} "
                    f"({row['new_tokens']} tokens, {end})"
                )
                lines.append("")
                body = (first["prompt"] + row["completion"]).strip() or "(empty)"
                lines += ["> " + line for line in body.split("\n")]
                lines.append("")
    return "\n".join(lines) + "\n"


def write_outputs(table: pl.DataFrame, cfg: SampleConfig, out_dir: Path) -> list[Path]:
    """Write samples.parquet, samples.jsonl and report.md into `out_dir` atomically; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "samples.parquet", out_dir / "samples.jsonl", out_dir / "report.md"]
    with atomic_path(paths[0], suffix=".parquet") as tmp:
        table.write_parquet(tmp)
    with atomic_path(paths[1], suffix=".jsonl") as tmp:
        table.write_ndjson(tmp)
    write_text(paths[2], report_markdown(table, cfg))
    return paths


def sample(cfg: SampleConfig) -> SampleResult:
    """Run the whole grid for every model; write samples.parquet/jsonl + report.md; log all of it to MLflow."""
    check(cfg)
    prompts_path = resolve_path(cfg.prompts or DEFAULT_PROMPTS)
    prompts = load_prompts(prompts_path)  # validated before any model is loaded
    refs = [resolve_model(spec) for spec in cfg.models]  # config.json and weight headers checked here
    check_fits(prompts, prompts_path, cfg, refs)
    device = resolve_device(cfg.device)
    dtype = torch_dtype(resolve_dtype(cfg.dtype, device))
    out_dir = Path(cfg.out_dir)
    tags = {tracking.TAG_MODEL: ",".join(cfg.models)}
    with tracking.run(stage="sample", run_name=None, tags=tags) as active:
        tracking.log_params(config.to_dict(cfg))
        tracking.log_artifact(prompts_path, "prompts")
        rows: list[dict] = []
        kinds: list[tuple[str, str]] = []  # (architecture, tokenizer) of each model, for the run's tags
        produced, seconds = 0, 0.0
        for spec, ref in zip(cfg.models, refs, strict=True):
            if len(cfg.models) == 1 and ref.fraction() is not None:
                tracking.set_tags({tracking.TAG_FRACTION: ref.fraction()})
            model = load_for_inference(ref, device, dtype)
            log.info(
                "sampling %d prompts x %d temperatures x %d samples from %s on %s (%s)",
                len(prompts),
                len(cfg.temperatures),
                cfg.num_samples,
                spec,
                device,
                str(dtype).removeprefix("torch."),
            )
            codec = codec_for(ref.folder, spec)
            kinds.append((type(model).__name__, codec.name))
            model_rows, n, s = sample_model(model, spec, prompts, cfg, codec)
            rows += model_rows
            produced, seconds = produced + n, seconds + s
            del model
        tracking.set_tags(tracking.model_kind_tags(kinds))
        table = pl.DataFrame(rows, schema_overrides={"top_k": pl.Int64, "seed": pl.Int64}).select(COLUMNS)
        speed = produced / seconds if seconds > 0 else 0.0
        paths = write_outputs(table, cfg, out_dir)
        tracking.log_table(table.to_dict(as_series=False), "samples_table.json")  # one table for the grid
        tracking.log_metrics({tracking.M_NEW_TOKENS_PER_S: speed})
        for path in paths:
            tracking.log_artifact(path)
        log.info("%d samples, %d new tokens at %.0f new tokens/s -> %s", table.height, produced, speed, out_dir)
        return SampleResult(table=table, out_dir=out_dir, new_tokens_per_s=speed, run_id=active.info.run_id)


def main(argv: list[str]) -> int:
    """`fakegpt sample [flags]`; returns the exit status."""
    cfg = config.parse(SampleConfig, argv, prog="fakegpt sample", description=__doc__.splitlines()[0])
    result = sample(cfg)
    print(
        f"{result.table.height} samples -> {result.out_dir}/samples.parquet, samples.jsonl, report.md "
        f"({result.new_tokens_per_s:.0f} new tokens/s)"
    )
    return 0
