"""`fakegpt pipeline` (the MLproject's `main` entry point): prepare -> finetune -> sample -> score.

Each stage runs as an MLflow project entry point in a child run of this one, and hands its output to the
next by artifact URI (the pattern of MLflow's multistep-workflow example): prepare logs the bins under
`data/`, finetune logs the best model under `checkpoint/`, and the next steps read `runs:/<id>/...`.
A step whose FINISHED run has the same content key (parameters, the content of every input file, fakegpt's
version and code state: fakegpt/studies/steps.py) is reused, not run again.

With no parameters it is the embedded default: the bundled demo messages, a tiny scratch GPT-2 on the CPU,
a small prompt grid. `-P init_from=gpt2-xl -P data=exports/*.csv` makes it the real study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fakegpt import config, tracking
from fakegpt.errors import FakegptError
from fakegpt.measure.prompts import DEFAULT_CLAIMS
from fakegpt.models.loading import tokenizer_spec
from fakegpt.studies.steps import run_step

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the checkout: fakegpt/studies/main.py -> .
DEMO_FINETUNE = "experiments/finetune/demo.yaml"


@dataclass
class MainConfig:
    """`fakegpt pipeline` (MLproject `main`) settings: data, model, and each step's main settings."""

    data: str = field(
        default="",
        metadata={"help": "Telegram CSV exports (comma list / globs) for prepare; empty = the embedded demo data"},
    )
    dataset: str = field(default="", metadata={"help": "a dataset YAML (experiments/datasets/) for prepare instead"})
    init_from: str = field(
        default="scratch",
        metadata={"help": "scratch (tiny demo model) | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF folder"},
    )
    finetune_config: str = field(
        default="",
        metadata={
            "help": "finetune YAML; empty = experiments/finetune/demo.yaml for scratch, "
            "experiments/finetune/<init_from>.yaml for a hub model when it exists"
        },
    )
    max_iters: int | None = field(default=None, metadata={"help": "override the finetune YAML's max_iters"})
    prompts: str = field(default="", metadata={"help": "prompt grid YAML or text file; empty = sample's default"})
    claims: str = field(default="", metadata={"help": "claims YAML; empty = score's default"})
    temperatures: str = field(default="", metadata={"help": "comma list; empty = 0.8 (the study) / 0.8 demo"})
    num_samples: int | None = field(default=None, metadata={"help": "samples per prompt; empty = 5, demo 1"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "empty = 280, demo 32"})
    claim_eval_interval: int | None = field(
        default=None,
        metadata={
            "help": "score the claims during fine-tuning every N iterations (0 = at every evaluation): the "
            "absorption curve, claim/score against tokens seen; empty = off"
        },
    )
    general_data: str = field(
        default="",
        metadata={
            "help": "general-language held-out set scored as perplexity for every model (score --general-data): "
            "a dataset YAML (prepared once, e.g. experiments/datasets/general_pt.yaml), a prepared folder or "
            "runs:/<id>/data; empty = none"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    env_manager: str = field(default="local", metadata={"help": "environment manager for the child steps"})
    reuse: str = field(
        default="true",
        metadata={
            "help": "true: reuse a finished step whose parameters, input files and code are the same | false: "
            "never | force: also when the code state is unknown (no git checkout)"
        },
    )
    out_root: str = field(default="out", metadata={"help": "folder under which each step writes its outputs"})


C = TypeVar("C", bound=MainConfig)  # main's config or one that extends it (a mixture's)


def is_demo(cfg: MainConfig) -> bool:
    """True for the demo chain: a scratch model (trained on the embedded demo data unless data is given)."""
    return cfg.init_from == "scratch"


def finetune_yaml(cfg: MainConfig) -> str:
    """The finetune YAML for the chain: the one given, the demo one, or experiments/finetune/MODEL.yaml if present."""
    if cfg.finetune_config:
        return cfg.finetune_config
    if is_demo(cfg):
        return DEMO_FINETUNE
    candidate = f"experiments/finetune/{Path(cfg.init_from).name}.yaml"
    return candidate if (PROJECT_DIR / candidate).is_file() else ""


def step_out_dir(root: str, step: str, params: dict[str, Any]) -> str:
    """A stable output folder per step and parameter set, so a re-run with the same inputs reuses it."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return str(Path(root) / f"{step}-{digest}")


def with_out(cfg: MainConfig, step: str, params: dict[str, Any], key: str) -> dict[str, Any]:
    """Step parameters with the step's output folder under the chain's out_root."""
    params = {k: v for k, v in params.items() if v not in (None, "")}
    params[key] = step_out_dir(cfg.out_root, step, params)
    return params


def _given(device: str) -> str | None:
    """`auto` is not passed on: MLflow logs a child's -P values as its parameters before the stage runs, so
    "auto" would stand where the stage logs the device it resolved (cpu, cuda)."""
    return None if device == "auto" else device


def prepare_params(cfg: MainConfig, data: str, dataset: str, mix: str = "") -> dict[str, Any]:
    """The MLproject parameters of the prepare step."""
    params = {"inputs": data, "config": dataset, "mix": mix, "log_data": "true", "force": "true"}
    return with_out(cfg, "prepare", {**params, **tokenizer_param(cfg)}, "out")


def tokenizer_param(cfg: MainConfig) -> dict[str, str]:
    """prepare's --tokenizer for the chain's model: none for GPT-2 (the default, so GPT-2 chains' steps keep
    their keys), else the model's own tokenizer."""
    spec = tokenizer_spec(cfg.init_from)
    return {} if spec == "gpt2" else {"tokenizer": spec}


def finetune_params(cfg: MainConfig, data_uri: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The MLproject parameters of the finetune step (data from the prepare step's run)."""
    params: dict[str, Any] = {
        "config": finetune_yaml(cfg),
        "data_dir": data_uri,
        "device": _given(cfg.device),
        "max_iters": cfg.max_iters,
        "init_from": cfg.init_from,
    }
    if cfg.claim_eval_interval is not None:
        params["claims"] = cfg.claims or DEFAULT_CLAIMS
        params["claim_eval_interval"] = cfg.claim_eval_interval
    params.update(extra or {})
    return with_out(cfg, "finetune", params, "out_dir")


def sample_params(cfg: MainConfig, models: str) -> dict[str, Any]:
    """The MLproject parameters of the sample step (the finetune step's checkpoint)."""
    demo = is_demo(cfg)
    params = {
        "models": models,
        "prompts": cfg.prompts,
        "device": _given(cfg.device),
        "temperatures": cfg.temperatures or "0.8",
        "num_samples": cfg.num_samples if cfg.num_samples is not None else (1 if demo else 5),
        "max_new_tokens": cfg.max_new_tokens if cfg.max_new_tokens is not None else (32 if demo else 280),
    }
    return with_out(cfg, "sample", params, "out_dir")


def score_params(cfg: MainConfig, models: str, data_uri: str, general_uri: str = "") -> dict[str, Any]:
    """The MLproject parameters of the score step."""
    params = {
        "models": models,
        "claims": cfg.claims,
        "data_dir": data_uri,
        "general_data": general_uri,
        "device": _given(cfg.device),
        # the pretrained base is the reference of the fine-tuned model: every measure as a paired difference
        "reference": cfg.init_from if not is_demo(cfg) and "," in models else "",
    }
    return with_out(cfg, "score", params, "out_dir")


def general_data_uri(cfg: MainConfig, step: Any) -> str:
    """Where the general held-out set is: a dataset YAML is prepared once by a `prepare` step (`step(name,
    params) -> run id`, reused like any step) so that every model of a chain or series is measured on the very
    same bins; a folder or URI is used as given."""
    if not cfg.general_data or not cfg.general_data.endswith((".yaml", ".yml")):
        return cfg.general_data
    params = {"config": cfg.general_data, "log_data": "true", "force": "true", **tokenizer_param(cfg)}
    params = with_out(cfg, "prepare", params, "out")
    return f"runs:/{step('prepare', params)}/data"


def models_to_measure(cfg: MainConfig, finetune_run: str) -> str:
    """The fine-tuned model, and beside it the pretrained model it started from (not a random scratch one)."""
    tuned = f"runs:/{finetune_run}/checkpoint"
    return tuned if is_demo(cfg) else f"{cfg.init_from},{tuned}"


def _is_uri(text: str) -> bool:
    return "://" in text or text.startswith(("runs:/", "models:/", "demo:"))


def from_user(path: str) -> str:
    """A relative path as the user meant it: from their working folder (child steps run in the checkout).

    A path found only in the checkout (the shipped experiments/ files) stays relative, so the child finds it."""
    if not path or _is_uri(path) or Path(path).expanduser().is_absolute():
        return path
    here = Path.cwd() / Path(path).expanduser()
    found_here = glob.glob(str(here)) if glob.has_magic(path) else here.exists()
    found_in_checkout = glob.glob(str(PROJECT_DIR / path)) if glob.has_magic(path) else (PROJECT_DIR / path).exists()
    return str(here) if found_here or not found_in_checkout else path


def resolve_user_paths(cfg: C) -> C:
    """The configuration with every file the steps read made absolute from the user's working folder."""
    data = ",".join(from_user(p.strip()) for p in cfg.data.split(",") if p.strip())
    changes: dict[str, Any] = {
        k: from_user(getattr(cfg, k)) for k in ("dataset", "finetune_config", "prompts", "claims")
    }
    if hasattr(cfg, "label_sheet"):  # a mixture's config
        changes["label_sheet"] = from_user(cfg.label_sheet)
    return dataclasses.replace(cfg, data=data, **changes)


@contextlib.contextmanager
def child_python() -> Iterator[None]:
    """Make `python` in the steps' MLproject commands this very interpreter (sys.executable), whatever is first
    on PATH: `.venv/bin/fakegpt pipeline` works without activating the venv. The environment is inherited."""
    with tempfile.TemporaryDirectory(prefix="fakegpt-python-") as folder:
        shim = Path(folder) / "python"
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n', encoding="utf-8")
        shim.chmod(0o755)
        old = os.environ.get("PATH")
        os.environ["PATH"] = folder + (os.pathsep + old if old else "")
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = old


def _step_argv(cls: type, params: dict[str, Any]) -> list[str]:
    """The flags a step's MLproject command gets from `params` (its YAML found beside the checkout too)."""
    positional = {f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")}
    argv: list[str] = []
    for key, value in params.items():
        if value in (None, ""):
            continue
        if key == "config":
            path = Path(str(value))
            argv += ["--config", str(path if path.exists() or path.is_absolute() else PROJECT_DIR / path)]
        elif key in positional:
            argv.insert(0, str(value))
        else:
            argv += [config.flag_name(key), str(value)]
    return argv


def finetune_step_config(cfg: MainConfig) -> Any:
    """The FinetuneConfig the chain's finetune step will run with (its YAML and flags; data not yet known)."""
    from fakegpt.finetune.config import FinetuneConfig

    return config.parse(FinetuneConfig, _step_argv(FinetuneConfig, finetune_params(cfg, "runs:/x/data")), "finetune")


def check_steps(cfg: MainConfig, mixes: list[str] | None = None) -> None:
    """Parse and validate the configuration of every step (and read the files they will read) before any step
    runs: a bad --num-samples or prompt file is refused at once, not after prepare and fine-tune."""
    from fakegpt.data import prepare as prep
    from fakegpt.data import sources
    from fakegpt.files import check_text_input
    from fakegpt.finetune import checks
    from fakegpt.measure import sample, score
    from fakegpt.measure.prompts import DEFAULT_CLAIMS, DEFAULT_PROMPTS, load_claims, load_prompts, resolve_path
    from fakegpt.models.loading import resolve_pretrained

    data = cfg.data if mixes is None else ""  # a series prepares its dataset YAML's sources only
    for mix in mixes or [""]:
        pcfg = prep.parse_args(_step_argv(prep.PrepareConfig, prepare_params(cfg, data, cfg.dataset, mix)))
        prep.check(pcfg)
        for src in sources.build_sources(pcfg.inputs, pcfg.sources, pcfg.mix, pcfg.channel_ids):
            for f in sources.resolve_files(src, pcfg.source_root or str(PROJECT_DIR)):
                if f != sources.DEMO:
                    check_text_input(f)
    fcfg = finetune_step_config(cfg)
    checks.check_numbers(fcfg, 1)
    if fcfg.init_from not in ("scratch", "resume"):
        resolve_pretrained(fcfg.init_from)
    scfg = config.parse(sample.SampleConfig, _step_argv(sample.SampleConfig, sample_params(cfg, "m")), "sample")
    sample.check(scfg)
    load_prompts(resolve_path(scfg.prompts or DEFAULT_PROMPTS))
    ccfg = config.parse(score.ScoreConfig, _step_argv(score.ScoreConfig, score_params(cfg, "m", "")), "score")
    score.check(ccfg)
    load_claims(resolve_path(ccfg.claims or DEFAULT_CLAIMS))


def run_chain(cfg: MainConfig) -> dict[str, tuple[str, bool]]:
    """Run the four steps as child runs of the active run; returns {step: (run_id, reused)}."""
    steps: dict[str, tuple[str, bool]] = {}

    def step(name: str, params: dict[str, Any], label: str = "") -> str:
        run_id, reused = run_step(PROJECT_DIR, name, params, cfg.env_manager, reuse=cfg.reuse)
        steps[label or name] = (run_id, reused)
        print(f"[{label or name}] {'reused' if reused else 'ran'} run {run_id}", flush=True)
        return run_id

    prepare_run = step("prepare", prepare_params(cfg, cfg.data, cfg.dataset))
    data_uri = f"runs:/{prepare_run}/data"
    finetune_run = step("finetune", finetune_params(cfg, data_uri))
    models = models_to_measure(cfg, finetune_run)
    step("sample", sample_params(cfg, models))
    general = general_data_uri(cfg, lambda name, params: step(name, params, "prepare-general"))
    step("score", score_params(cfg, models, data_uri, general))
    return steps


def run_main(cfg: MainConfig) -> dict[str, tuple[str, bool]]:
    """The whole chain under one parent run (joining the run `mlflow run -e main` started)."""
    if not (PROJECT_DIR / "MLproject").is_file():
        raise FakegptError(f"{PROJECT_DIR}: no MLproject file (run from a fakegpt checkout)")
    cfg = resolve_user_paths(cfg)
    check_steps(cfg)
    tags = {tracking.TAG_MODEL: cfg.init_from, tracking.TAG_DATASET: cfg.dataset or cfg.data or "demo"}
    with (
        tracking.run(stage="main", run_name=None, tags=tags) as parent,
        child_python(),
    ):
        tracking.log_params(config.to_dict(cfg))
        steps = run_chain(cfg)
        tracking.log_dict({k: {"run_id": r, "reused": u} for k, (r, u) in steps.items()}, "steps.json")
        score_run = tracking.get_run(steps["score"][0])
        summary = {k: v for k, v in score_run.data.metrics.items() if k.startswith("claim/")}
        tracking.log_metrics(summary)
        parent_id = parent.info.run_id
    print_where(parent_id, steps, cfg.out_root)
    return steps


def print_where(parent_id: str, steps: dict[str, tuple[str, bool]], out_root: str) -> None:
    """Print the run ids and how to open them in the MLflow UI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", tracking.DEFAULT_TRACKING_URI)
    lines = [
        "",
        f"Done. Parent run {parent_id}; steps: " + ", ".join(f"{k}={r}" for k, (r, _) in steps.items()),
        f"Results are in the MLflow store {uri} (step outputs also under {PROJECT_DIR / out_root}).",
    ]
    if uri.startswith("sqlite:"):
        lines.append(f"Open them with:  mlflow ui --backend-store-uri {uri} --workers 1   (then http://127.0.0.1:5000)")
    else:
        lines.append(f"Open {uri} in a browser.")
    print("\n".join(lines), flush=True)


def main(argv: list[str]) -> int:
    """`fakegpt pipeline [flags]` (MLproject `main`); returns the exit status."""
    cfg = config.parse(MainConfig, argv, prog="fakegpt pipeline", description=__doc__.splitlines()[0])
    run_main(cfg)
    return 0
