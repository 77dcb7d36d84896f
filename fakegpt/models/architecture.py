"""What fakegpt needs to know about a causal LM's architecture, read from transformers' own metadata.

fakegpt trains any decoder-only causal LM that `AutoModelForCausalLM` builds (GPT-2, Llama, Qwen2, Mistral,
Gemma, ...). It never names a module of one architecture: the decoder is the model's base model
(`base_model_prefix`), the output layer is `get_output_embeddings()`, the decoder layers are the classes the
model lists in `_no_split_modules` (the units transformers itself never splits across devices), and the shape
comes through the config's standard names (`num_hidden_layers`, `hidden_size`, `num_attention_heads`, which
GPT2Config maps onto n_layer, n_embd, n_head).

torch and transformers are imported inside the functions, as in `fakegpt.models.loading`: the up-front checks
that import this module should not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fakegpt.errors import FakegptError

if TYPE_CHECKING:
    import torch

# Config fields that are dropout rates of a classification or summary head, which a causal LM never runs: they
# stay as the config has them (GPT-2's summary_first_dropout), so the saved config changes no more than needed.
_HEAD_DROPOUT_PREFIXES = ("classifier", "summary")
# Config fields whose value changes the logits after the output layer; 1 (or unset) leaves them alone.
_LOGIT_SCALES = ("logits_scaling", "logit_scale")


def hf_model(model: Any) -> Any:
    """The transformers model inside the wrappers training puts around it: DDP (`module`), torch.compile
    (`_orig_mod`) and peft (`get_base_model`)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def describe(config: Any) -> str:
    """The architecture as config.json names it: `LlamaForCausalLM (llama)`, or the model type alone."""
    names = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", "") or "unknown"
    return f"{names[0]} ({model_type})" if names else model_type


def causal_lm_class(config: Any) -> type[Any]:
    """transformers' causal-LM class of `config` (what AutoModelForCausalLM builds); call `check_trainable` first."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def check_trainable(config: Any, where: str) -> None:
    """A one-line FakegptError naming `where` and the architecture, unless `config` describes a decoder-only
    causal LM: encoder-decoders (T5, BART) and encoders (BERT, RoBERTa: transformers has a causal-LM head for
    some of them, but it attends both ways unless the config says is_decoder) are refused."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    arch = describe(config)
    if getattr(config, "is_encoder_decoder", False):
        raise FakegptError(
            f"{where}: {arch} is an encoder-decoder model; fakegpt fine-tunes decoder-only causal language models "
            "(GPT-2, Llama, Qwen2, ...)"
        )
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise FakegptError(
            f"{where}: {arch} has no causal language-model head in transformers (AutoModelForCausalLM cannot "
            "build it); fakegpt fine-tunes decoder-only causal language models (GPT-2, Llama, Qwen2, ...)"
        )
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise FakegptError(
            f"{where}: {arch} is an encoder (bidirectional attention; is_decoder is not set in its config), not a "
            "causal language model; fakegpt fine-tunes decoder-only causal language models (GPT-2, Llama, ...)"
        )


def build_config(hf_config: dict[str, Any], where: str = "the model's config") -> Any:
    """The transformers config object of an HF config dict (config.json, or a resume state's model_config.json);
    a dict without `model_type` is GPT-2's (fakegpt's scratch shapes and built-in hub shapes). `where`: what an
    error names."""
    from transformers import CONFIG_MAPPING

    model_type = hf_config.get("model_type") or "gpt2"
    if model_type not in CONFIG_MAPPING:
        raise FakegptError(f"{where}: model_type {model_type!r} is not an architecture this transformers knows")
    return CONFIG_MAPPING[model_type].from_dict(hf_config)


def dropout_fields(config: Any) -> list[str]:
    """The config's dropout rates that a causal LM applies: GPT-2's resid/embd/attn_pdrop, Llama's and Qwen2's
    attention_dropout, Falcon's hidden_dropout, OPT's dropout and activation_dropout, ..."""
    fields = []
    for name, value in config.to_dict().items():
        if not (name.endswith(("pdrop", "dropout", "dropout_prob", "dropout_rate"))):
            continue
        if name.startswith(_HEAD_DROPOUT_PREFIXES) or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        fields.append(name)
    return sorted(fields)


def logits_processing(config: Any) -> str | None:
    """What the architecture does to the logits after the output layer, as its config says (Gemma2's
    final_logit_softcapping, Granite's logits_scaling, Cohere's logit_scale), or None: then the logits are the
    output layer applied to the decoder's last hidden state, as far as the config tells. Decided on the config
    alone, so it also holds for a model on the meta device (`--plan`)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        return f"final_logit_softcapping={cap}"
    for name in _LOGIT_SCALES:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
            return f"{name}={value}"
    return None


def decoder(model: Any) -> torch.nn.Module:
    """The model's base model (GPT-2's `transformer`, Llama's `model`): embeddings, the decoder layers and the
    final norm, returning `last_hidden_state`."""
    hf = hf_model(model)
    body = getattr(hf, hf.base_model_prefix, None)
    if body is None or body is hf:
        raise FakegptError(f"{type(hf).__name__}: no base model under {hf.base_model_prefix!r}")
    return body


def output_layer(model: Any) -> torch.nn.Module:
    """The output layer (lm_head): a Linear whose weight is (vocab, hidden), tied to the token embedding or not,
    with or without a bias."""
    return hf_model(model).get_output_embeddings()


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers (GPT2Block, LlamaDecoderLayer, ...), in order: the modules whose class the model lists
    in `_no_split_modules`."""
    hf = hf_model(model)
    names = set(getattr(hf, "_no_split_modules", None) or ())
    layers = [m for m in hf.modules() if type(m).__name__ in names and m is not hf]
    if not layers:
        raise FakegptError(f"{type(hf).__name__}: transformers names no decoder-layer class for it (_no_split_modules)")
    return layers


def lookup_embeddings(model: Any) -> list[torch.nn.Parameter]:
    """Embedding tables that are looked up and never multiplied: learned position embeddings (GPT-2's wpe) and
    the token embedding when it is not the output layer too. FLOP counts leave them out; a tied token
    embedding is the output layer's matmul and stays in."""
    import torch

    hf = hf_model(model)
    head = hf.get_output_embeddings()
    computing = {id(p) for p in head.parameters()} if head is not None else set()
    out, seen = [], set()
    for module in hf.modules():
        if isinstance(module, torch.nn.Embedding):
            for p in module.parameters(recurse=False):
                if id(p) not in computing and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def context_length(config: Any, default: int = 1024) -> int:
    """The context in tokens: max_position_embeddings (GPT2Config maps it onto n_positions)."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else default


def context_of(hf_config: dict[str, Any], default: int = 1024) -> int:
    """`context_length` of a config dict (config.json) without building the config object."""
    for key in ("n_positions", "max_position_embeddings"):
        value = hf_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def head_dim(config: Any) -> int:
    """Width of one attention head: the config's head_dim where it has one (Gemma's differs from
    hidden/heads), else hidden_size // num_attention_heads."""
    value = getattr(config, "head_dim", None)
    return int(value) if isinstance(value, int) and value > 0 else config.hidden_size // config.num_attention_heads


def gated_mlp(model: Any) -> bool:
    """True for a Llama-like MLP (down(act(gate(x)) * up(x)): three matrices of intermediate_size), False for a
    GPT-2-like one (two matrices around one activation)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in hf_model(model).named_modules()}
    return bool(names & {"gate_proj", "gate_up_proj", "w3"})


def mlp_width(config: Any) -> int:
    """The MLP's inner width: intermediate_size, GPT-2's n_inner, or 4 x hidden when the config leaves it unset."""
    for name in ("intermediate_size", "n_inner", "ffn_dim"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4 * config.hidden_size


def kv_width(config: Any) -> int:
    """Width of the keys (and of the values) per token: num_key_value_heads x head_dim (grouped-query
    attention), the full width where every head has its own."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(heads) * head_dim(config)


def fill_tied(state: dict[str, Any], model: Any) -> dict[str, Any]:
    """`state` with the names it lacks that are another name of one of its tensors in `model` (a tied output
    layer: GPT-2's lm_head.weight is transformer.wte.weight, a tied Llama's is model.embed_tokens.weight), as
    `model.state_dict()` has them. HF's safetensors files leave the tied names out."""
    groups: dict[int, list[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(value), []).append(name)
    for names in groups.values():
        present = next((name for name in names if name in state), None)
        if present is None:
            continue
        for name in names:
            state.setdefault(name, state[present])
    return state
