"""The training objective: mean next-token cross-entropy of a causal LM, with a one-buffer output layer.

On the CPU a small model's step is dominated by the output layer over 50,257 words; the fused autograd node
below keeps one (V, N) buffer instead of four (tools/bench_train.py measures the difference). It computes the
logits itself, as the output layer (`get_output_embeddings()`: tied or not, with its bias if it has one) applied
to the decoder's last hidden state (the base model's output, final norm included). An architecture that does
more between the two (Gemma2's logit soft-capping, Granite's logits_scaling, Cohere's logit_scale, a norm
outside the base model) trains on its own forward's logits instead (`logits_bypass`, logged once).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from fakegpt.models.architecture import context_length, decoder, hf_model, logits_processing, output_layer

log = logging.getLogger(__name__)

_PROBE_TOKENS = 8
_bypass: weakref.WeakKeyDictionary[torch.nn.Module, str | None] = weakref.WeakKeyDictionary()


class LinearCrossEntropy(torch.autograd.Function):
    """loss = mean CE(h @ W.T + b, y), keeping one (V, N) float buffer instead of four (b: the output layer's
    bias, usually none).

    The stock path writes the logits, then log_softmax's output, then in backward a one-hot gradient and
    log_softmax's gradient: four passes over N x 50257 floats, which dominate a small model's step on CPU.
    Here the logits buffer is turned in place into dloss/dlogits = (softmax - onehot) / N during the
    forward pass and saved for backward, which is then just the two matmuls.

    The buffer is vocabulary-major, (V, N) = W @ h.T: on the CPU that matmul is ~25% faster than h @ W.T
    (the weight's rows stream once), and the softmax runs down its columns. On the CPU the buffer is also
    kept for the next step (`_spare`): a fresh 200 MB allocation costs its page faults every step (~80 ms
    at 1,024 tokens); CUDA's caching allocator already reuses memory.
    """

    _spare: torch.Tensor | None = None  # a CPU buffer that no autograd graph holds any more

    @staticmethod
    def release() -> None:
        """Drop the kept buffer (the end of a fine-tune: ~200 MB at 1,024 tokens)."""
        LinearCrossEntropy._spare = None

    @staticmethod
    def _buffer(weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(V, N) = W @ h.T, written into the spare CPU buffer when it has the right shape and type."""
        spare, LinearCrossEntropy._spare = LinearCrossEntropy._spare, None  # taken: in use until backward
        shape = (weight.shape[0], h.shape[0])
        if weight.device.type != "cpu" or spare is None or spare.shape != shape or spare.dtype != h.dtype:
            return weight @ h.t()
        return torch.mm(weight, h.t(), out=spare)

    @staticmethod
    def forward(ctx, h, weight, targets, bias=None):  # h (N, C), weight (V, C), targets (N,), bias (V,) or None
        """loss = mean CE(h @ W.T + b, targets); the logits buffer becomes d loss / d logits in place."""
        logits = LinearCrossEntropy._buffer(weight, h)  # (V, N)
        if logits.dtype != torch.float32:
            logits = logits.float()
        if bias is not None:
            logits.add_(bias.float().unsqueeze(1))
        n = logits.shape[1]
        cols = torch.arange(n, device=logits.device)
        target_logit = logits[targets, cols]  # (N,)
        peak = logits.amax(dim=0, keepdim=True)  # (1, N) for a stable softmax
        logits.sub_(peak).exp_()
        total = logits.sum(dim=0)  # (N,)
        loss = (total.log() + peak.squeeze(0) - target_logit).mean()
        grad = logits.mul_((1.0 / (total * n)).unsqueeze(0))  # softmax / N, in one pass
        grad[targets, cols] -= 1.0 / n
        ctx.save_for_backward(h, weight, grad.to(h.dtype))
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        """The two matmuls of the saved (softmax - onehot) / N, scaled by the incoming gradient."""
        h, weight, grad = ctx.saved_tensors  # grad (V, N)
        # grad_out is a scalar (1/accumulation steps, or a scaler's factor): scale the small results only
        dh = (grad.t() @ weight) * grad_out.to(h.dtype) if ctx.needs_input_grad[0] else None  # (N, C)
        # a frozen output layer (--method lora) skips the (V, C) weight gradient: a third of this node's work
        dw = (grad @ h) * grad_out.to(h.dtype) if ctx.needs_input_grad[1] else None  # (V, C)
        needs_db = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
        db = (grad.sum(dim=1) * grad_out.to(grad.dtype)).to(ctx.bias_dtype) if needs_db else None  # (V,)
        if grad.device.type == "cpu":
            LinearCrossEntropy._spare = grad  # this graph is done with it
        return dh, dw, None, db


def logits_bypass(model: Any) -> str | None:
    """Why the fused output layer cannot compute `model`'s loss (its forward does something to the logits that
    the output layer applied to the decoder's output does not), or None when it can. Decided once per model,
    the reason logged once: the config's logit soft-capping and scales, then a forward of a few tokens compared
    with the output layer applied to the decoder's output (which catches what no config field announces)."""
    hf = hf_model(model)
    if hf in _bypass:
        return _bypass[hf]
    reason = _bypass_reason(hf)
    _bypass[hf] = reason
    if reason is not None:
        log.info("%s: the loss uses the model's own logits, not the fused output layer (%s)", type(hf).__name__, reason)
    return reason


def _bypass_reason(hf: Any) -> str | None:
    reason = logits_processing(hf.config)
    if reason is not None:
        return reason
    head = output_layer(hf)
    if not isinstance(head, torch.nn.Linear):
        return f"its output layer is a {type(head).__name__}, not a Linear"
    if head.weight.device.type == "meta":
        return None
    return _probe(hf, head)


@torch.no_grad()
def _probe(hf: Any, head: torch.nn.Linear) -> str | None:
    """Compare the model's own logits on a few tokens with the output layer applied to its decoder's output."""
    n = min(_PROBE_TOKENS, context_length(hf.config, _PROBE_TOKENS))
    x = (torch.arange(n, device=head.weight.device) % head.weight.shape[0]).unsqueeze(0)
    was_training = hf.training
    hf.eval()  # no dropout: both passes see the same network
    try:
        own = hf(input_ids=x, use_cache=False).logits.float()
        h = decoder(hf)(input_ids=x, use_cache=False).last_hidden_state
        ours = F.linear(h, head.weight, head.bias).float()
    finally:
        hf.train(was_training)
    scale = max(1.0, float(own.abs().max()))
    if own.shape != ours.shape or not torch.allclose(own, ours, rtol=1e-3, atol=1e-4 * scale):
        return "its forward changes the logits after the output layer"
    return None


def causal_lm_loss(model: Any, x: Any, y: Any, fused: bool = True, own_logits: bool | None = None) -> Any:
    """Mean next-token cross-entropy of the causal LM `model` on inputs x (B, T), targets y (B, T).

    x and y come pre-shifted (windows of block_size + 1 tokens), so no label shifting or -100 masking is
    needed. `fused` uses the one-buffer output layer + loss above (eager mode); otherwise the plain
    logits + F.cross_entropy, which torch.compile fuses on its own. `own_logits`: take the logits of the
    model's own forward (`logits_bypass`; None: decided here, once per model).
    """
    core = getattr(model, "module", model)
    if own_logits is None:
        own_logits = logits_bypass(core) is not None
    if own_logits:
        logits = core(input_ids=x, use_cache=False).logits  # (B, T, V), the architecture's own processing
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    h = decoder(core)(input_ids=x, use_cache=False).last_hidden_state  # (B, T, C)
    h = h.reshape(-1, h.shape[-1])  # (B*T, C)
    head = output_layer(core)
    weight, bias = head.weight, head.bias  # (V, C), tied to the token embedding or not; (V,) or None
    if fused and core.training:
        return LinearCrossEntropy.apply(h, weight, y.reshape(-1), bias)
    logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())  # (B*T, V)
    return F.cross_entropy(logits.float(), y.reshape(-1))
