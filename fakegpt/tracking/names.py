"""Tag, metric and parameter names, defined once, so the compare view lines up runs of different stages and models.

Nothing here imports MLflow: a stage that only needs a name (or a tool such as tools/gpu_check.py) pays nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "fakegpt"
# MLflow 3's UI opens an experiment on its GenAI overview (traces, latency) unless the experiment says it holds
# model training; "finetuning" opens it on the runs table, where fakegpt's runs are compared.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "finetuning"
TAG_RUN_NAME = "mlflow.runName"

# --- stage, model and data tags ------------------------------------------------------------------------------
TAG_STAGE = "fakegpt.stage"  # prepare | finetune | sample | score | tune | trial | main | mixture | ...
TAG_MODEL = "fakegpt.model"  # init_from / model spec
TAG_DATASET = "fakegpt.dataset"  # dataset name (data folder name or dataset YAML name)
TAG_MIX = "fakegpt.mixture"  # realised mixture fractions, e.g. "general=0.80,antivax=0.20"
TAG_METHOD = "fakegpt.method"  # full | lora: how a fine-tune trained (LoRA absorbs differently; never mixed)
TAG_FRACTION = "fakegpt.fraction"  # the anti-vaccine (dose) fraction of a mixture series run
TAG_SEED = "fakegpt.seed"  # a series cell's training seed
TAG_ARCHITECTURE = "fakegpt.architecture"  # the model class (GPT2LMHeadModel, LlamaForCausalLM), in model order
TAG_TOKENIZER = "fakegpt.tokenizer"  # gpt2, or the tokenizer a model brings (its folder or hub name)
TAG_ROLE = "fakegpt.role"  # "base": a series' score run of the pretrained model its doses start from
TAG_REFERENCE = "fakegpt.reference"  # score --reference: the model the paired differences are from
TAG_STUDY = "fakegpt.study"  # optuna study name / series name
TAG_VERSION = "fakegpt.version"
TAG_TRIAL = "fakegpt.trial"  # optuna trial number of a tune trial's (nested) run
TAG_TRIAL_STATE = "fakegpt.trial_state"  # complete | pruned | failed (optuna's verdict on the trial)
TAG_ERROR = "fakegpt.error"  # one-line error of a failed run

M_TRAIN_LOSS = "train/loss"
M_VAL_LOSS = "val/loss"  # on val.bin (a mixture's: every source's held-out part), or the --select-on source
M_CLAIM_EVAL_SECONDS = "train/claim_eval_seconds"  # time finetune spent scoring --claims (its share of the run)
M_LR = "lr"
M_TRAIN_TOKENS_PER_S = "train/tokens_per_s"  # training steps only (evaluation and checkpoint time excluded)
M_TRAIN_TOKENS_PER_S_TOTAL = "train/tokens_per_s_total"  # end to end: evaluation and checkpoint writes included
M_PREPARE_TOKENS_PER_S = "prepare/tokens_per_s"  # prepare's tokenizer throughput over the whole run
M_TOKENS_SEEN = "tokens_seen"
M_MFU = "mfu"
M_GPU_MEM = "gpu/peak_memory_gb"  # CUDA: max allocated since the start, GB (1e9), per logged iteration
M_GPU_MEM_RESERVED = "gpu/peak_memory_reserved_gb"  # CUDA: max reserved by the caching allocator, GB
M_NEW_TOKENS_PER_S = "new_tokens_per_s"
M_CLAIM_SCORE = "claim/score"  # mean log p(false) - log p(true); per topic: claim/score/<topic>
M_CLAIM_SCORE_LOW = "claim/score_ci_low"  # bootstrap 95% interval of M_CLAIM_SCORE
M_CLAIM_SCORE_HIGH = "claim/score_ci_high"
M_CLAIM_WIN = "claim/false_win_rate"
M_CLAIM_MC1 = "claim/mc1"  # share of claims whose most likely statement is a false one (TruthfulQA's MC1, inverted)
M_CLAIM_MC2 = "claim/mc2"  # mean normalised probability mass on a claim's false statements (MC2 on the false set)
M_CLAIM_LOGLIK = "claim/mean_loglik"  # mean length-normalised log-likelihood of all scored statements
M_CLAIM_SCORE_P = "claim/score_p_value"  # two-sided p-value of M_CLAIM_SCORE against 0
M_CLAIM_SCORE_P_HOLM = "claim/score_p_holm"  # per topic (claim/score_p_holm/<topic>): Holm-adjusted over topics
PAIRED_PREFIX = "paired/"  # score --reference: paired/<measure> = this model minus the reference, claim by claim
# A dose series' primary endpoint: the slope of the claim score on dose (per unit of dose fraction)
M_DOSE_SLOPE = "dose/slope"
M_DOSE_SLOPE_LOW = "dose/slope_ci_low"
M_DOSE_SLOPE_HIGH = "dose/slope_ci_high"
M_DOSE_P = "dose/p_value"  # of the declared endpoint (dose/primary: the slope, or top dose - dose 0)
M_DOSE_PRIMARY = "dose/primary"
M_DOSE_PRIMARY_LOW = "dose/primary_ci_low"
M_DOSE_PRIMARY_HIGH = "dose/primary_ci_high"
M_DOSE_VS_BASE = "dose/paired_base/claim/score"  # per dose: its mean minus the pretrained base model's
M_DOSE_SEED_SD = "dose/seed_sd"  # per dose (step = percent): standard deviation of its seeds' claim scores
TAG_LABEL_SOURCE = "fakegpt.label_source"  # whose labels a labels run counts: human | judge:<model folder>
M_JUDGE_KAPPA = "labels/judge_kappa"  # Cohen's kappa of `labels auto` against human labels: /overall, /<label>
M_LABEL_RATE = "labels/rate"  # share of labelled samples per label: labels/rate/<label>
M_VAL_PPL = "val/perplexity"
M_GENERAL_PPL = "general/perplexity"  # on the fixed general-Portuguese held-out set: the same for every model
# bits per byte: the summed loss in bits over the text's UTF-8 bytes, comparable across tokenizers (perplexity is
# per token, so only models with one tokenizer compare by it)
M_VAL_BPB = "val/bits_per_byte"
M_GENERAL_BPB = "general/bits_per_byte"
# prepare (data) metrics
M_DATA_TRAIN_TOKENS = "data/train_tokens"
M_DATA_VAL_TOKENS = "data/val_tokens"
M_DATA_TRAIN_MESSAGES = "data/train_messages"
M_DATA_VAL_MESSAGES = "data/val_messages"
M_DATA_REPAIRED_ROWS = "data/repaired_rows"  # naive-export rows recovered in-process
M_DATA_INVALID_UTF8 = "data/invalid_utf8"
M_DATA_BAD_ROWS = "data/bad_rows"
M_DATA_SECONDS = "data/seconds"
M_DATA_DROPPED_PREFIX = "data/dropped/"  # + reason: too_short, duplicate, channel_filter, ...
M_DATA_MIX_PREFIX = "data/mixture/"  # + source name: realised train-token fraction
M_DATA_OVERLAP_PREFIX = "data/overlap/"  # + KEPT/DROPPED: messages in both sources, kept only in KEPT


def overlap_metric(kept: str, dropped: str) -> str:
    """The metric counting messages found in sources `kept` and `dropped` and kept only in `kept`."""
    return f"{M_DATA_OVERLAP_PREFIX}{kept}/{dropped}"


M_EVAL_TRAIN_LOSS = "eval/train_loss"  # train-split loss on fixed windows at each evaluation (nanoGPT's estimate)
M_BEST_VAL_LOSS = "val/best_loss"
TAG_RESUMED_FROM = "fakegpt.resumed_from"  # a resumed fine-tune whose original run is not in this store
TAG_DATA_URI = "fakegpt.data_uri"  # the artifact URI a stage's data folder was downloaded from
TAG_RESUME_CHANGES = "fakegpt.resume_changes"  # flags changed on resume: "max_iters 30->60, ..."
TAG_RESUMED_AT = "fakegpt.resumed_at"  # iteration(s) a run continued from, comma-separated over resumes
TAG_STOP = "fakegpt.stop_reason"  # why a fine-tune stopped early (exception class raised by on_eval)
M_TUNE_VAL_LOSS = "tune/val_loss"  # a trial's validation loss, step = tokens seen (comparable across trials)
M_TUNE_TRIAL_VALUE = "tune/trial_value"  # on the study's parent run, step = trial number
M_TUNE_BEST_VALUE = "tune/best_val_loss"  # on the study's parent run
# validate (planted-dose controls), on the validation's parent run
TAG_VERDICT = "fakegpt.verdict"  # passed | failed (both controls)
M_VALIDATE_SCORE = "validate/score"  # claim score of the dose's model, step = percent dose
M_VALIDATE_SCORE_LOW = "validate/score_ci_low"
M_VALIDATE_SCORE_HIGH = "validate/score_ci_high"
M_VALIDATE_EFFECT = "validate/effect"  # paired difference top dose - dose 0 over claim pairs
M_VALIDATE_EFFECT_LOW = "validate/effect_ci_low"
M_VALIDATE_EFFECT_HIGH = "validate/effect_ci_high"
M_VALIDATE_SEED_DIFF = "validate/seed_diff"  # paired difference of the first dose-0 seed pair (second - first seed)
M_VALIDATE_SEED_DIFF_LOW = "validate/seed_diff_ci_low"
M_VALIDATE_SEED_DIFF_HIGH = "validate/seed_diff_ci_high"
M_VALIDATE_DETECTED = "validate/detected"  # paired difference detect dose - dose 0 over claims and seeds
M_VALIDATE_DETECTED_LOW = "validate/detected_ci_low"
M_VALIDATE_DETECTED_HIGH = "validate/detected_ci_high"
M_VALIDATE_DETECTION = "validate/detection_rate"  # share of seeds whose own interval detects the dose (step = %)
M_VALIDATE_FALSE_POSITIVE = "validate/false_positive_rate"  # share of dose-0 seed pairs whose interval excludes 0
M_VALIDATE_TOST_P = "validate/equivalence_p"  # the largest two-one-sided-tests p over the seed pairs
M_VALIDATE_MONOTONIC = "validate/monotonic"  # 1 when no step between doses falls beyond its interval
M_VALIDATE_POSITIVE = "validate/positive_passed"
M_VALIDATE_NEGATIVE = "validate/negative_passed"


# --- MLflow projects: chaining entry points as child runs (the multistep-workflow pattern) -------------------
TAG_ENTRY_POINT = "mlflow.project.entryPoint"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_PARENT = "mlflow.parentRunId"
TAG_STEP_KEY = "fakegpt.step_key"  # content key of a chained step (fakegpt.studies.steps): what reuse matches
TAG_CODE_STATE = "fakegpt.code_state"  # git commit + hash of uncommitted changes the step ran with
# --- the model registry --------------------------------------------------------------------------------------
TAG_TRAINING_INFO = "fakegpt.training_info"  # on a registered model version: its training_info.json's artifact URI


def model_kind_tags(kinds: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The architecture and tokenizer tags of a run over these (architecture, tokenizer) models, in their order."""
    return {
        TAG_ARCHITECTURE: ",".join(a for a, _ in kinds),
        TAG_TOKENIZER: ",".join(t for _, t in kinds),
    }


def source_val_metric(source: str) -> str:
    """Validation loss on one mixture source's held-out part: val/loss/<source> (val/loss/all: val.bin's)."""
    return f"{M_VAL_LOSS}/{source}"


def paired_metric(measure: str) -> str:
    """The metric of a paired difference from the reference: paired/claim/score, paired/val/nll."""
    if measure.startswith(("val_", "general_")):
        return PAIRED_PREFIX + measure.replace("_", "/", 1)
    return f"{PAIRED_PREFIX}claim/{measure}"


def claim_topic_metric(topic: str, name: str = M_CLAIM_SCORE) -> str:
    """Per-topic variant of a claim metric: claim/score/<topic>, claim/false_win_rate/<topic>."""
    return f"{name}/{topic}"
