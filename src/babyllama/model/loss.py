"""LM head fused with cross-entropy, computed a chunk of rows at a time.

Full logits for a 64k vocabulary are the largest tensor in training (batch 8 x 256 x 64,794 floats
is 530 MB, and autograd keeps a second copy for the gradient). Here the gradient of each chunk is
formed right after its loss, so at most `chunk_rows` rows of logits ever exist. The three matmuls
are the same as the unfused version; what goes away is the memory and the passes over it.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                want_grad: bool):
        dtype = _compute_dtype(hidden.device.type, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            grad_h = torch.empty_like(h_all) if want_grad else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, h_all.shape[0], chunk_rows):
                h, t = h_all[start:start + chunk_rows], targets[start:start + chunk_rows]
                logp = torch.log_softmax((h @ w.t()).float(), dim=-1)
                valid = t != IGNORE_INDEX
                t_safe = torch.where(valid, t, 0)
                picked = logp.gather(1, t_safe[:, None])
                total -= (picked.squeeze(1) * valid).sum()
                if want_grad:
                    # d(loss)/d(logits) = softmax - onehot, zero on ignored rows; computed in place
                    probs = logp.exp_()
                    probs.scatter_add_(1, t_safe[:, None], torch.full_like(picked, -1.0))
                    probs.mul_(valid[:, None])
                    d_logits = probs.to(dtype)
                    grad_h[start:start + chunk_rows] = d_logits @ w
                    if dtype == torch.float32:
                        grad_w.addmm_(d_logits.t(), h)
                    else:  # low-precision matmul, float32 accumulation across chunks
                        grad_w += (d_logits.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_total).to(h_dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_total).to(w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Sum over non-ignored positions of -log softmax(hidden @ weight.T)[target].

    hidden: (N, dim), weight: (vocab, dim), targets: (N,) with IGNORE_INDEX for positions to skip.
    Returns a float32 scalar: the *sum*, so callers can normalise by the token count of a whole
    (accumulated) batch.
    """
    if not torch.compiler.is_compiling():
        # SFT takes loss on a few answer tokens per sequence: the LM head (the largest matmul for
        # a big vocabulary) only needs those rows. index_select keeps the graph: its backward
        # scatters the gradient back to the selected positions.
        kept = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        if kept.numel() < targets.numel():
            hidden, targets = hidden.index_select(0, kept), targets.index_select(0, kept)
    if chunk_rows is None:  # ~64 MB of float32 logits per chunk, whatever the vocabulary
        chunk_rows = max(128, (1 << 24) // weight.shape[0])
    # inside an autograd.Function grad mode is always off, so decide here: evaluation under
    # torch.no_grad() must not pay for the gradient matmuls
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, want_grad)
