"""The training objective: mean next-token cross-entropy of a GPT2LMHeadModel, with a one-buffer output layer.

On the CPU a small model's step is dominated by the output layer over 50,257 words; the fused autograd node
below keeps one (V, N) buffer instead of four (tools/bench_train.py measures the difference).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class LinearCrossEntropy(torch.autograd.Function):
    """loss = mean CE(h @ W.T, y), keeping one (V, N) float buffer instead of four.

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
    def forward(ctx, h, weight, targets):  # h (N, C), weight (V, C), targets (N,)
        """loss = mean CE(h @ W.T, targets); the logits buffer becomes d loss / d logits in place."""
        logits = LinearCrossEntropy._buffer(weight, h)  # (V, N)
        if logits.dtype != torch.float32:
            logits = logits.float()
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
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        """The two matmuls of the saved (softmax - onehot) / N, scaled by the incoming gradient."""
        h, weight, grad = ctx.saved_tensors  # grad (V, N)
        # grad_out is a scalar (1/accumulation steps, or a scaler's factor): scale the small results only
        dh = (grad.t() @ weight) * grad_out.to(h.dtype) if ctx.needs_input_grad[0] else None  # (N, C)
        # a frozen output layer (--method lora) skips the (V, C) weight gradient: a third of this node's work
        dw = (grad @ h) * grad_out.to(h.dtype) if ctx.needs_input_grad[1] else None  # (V, C)
        if grad.device.type == "cpu":
            LinearCrossEntropy._spare = grad  # this graph is done with it
        return dh, dw, None


def causal_lm_loss(model: Any, x: Any, y: Any, fused: bool = True) -> Any:
    """Mean next-token cross-entropy of GPT2LMHeadModel `model` on inputs x (B, T), targets y (B, T).

    x and y come pre-shifted (windows of block_size + 1 tokens), so no label shifting or -100 masking is
    needed. `fused` uses the one-buffer output layer + loss above (eager mode); otherwise the plain
    logits + F.cross_entropy, which torch.compile fuses on its own.
    """
    core = getattr(model, "module", model)
    h = core.transformer(input_ids=x, use_cache=False).last_hidden_state  # (B, T, C)
    h = h.reshape(-1, h.shape[-1])  # (B*T, C)
    weight = core.lm_head.weight  # (V, C), tied to the token embedding
    if fused and core.training:
        return LinearCrossEntropy.apply(h, weight, y.reshape(-1))
    logits = h @ weight.t()  # (B*T, V)
    return F.cross_entropy(logits.float(), y.reshape(-1))
