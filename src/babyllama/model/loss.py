"""LM head fused with cross-entropy, computed a chunk of rows at a time.

Full logits for a 64k vocabulary are the largest tensor in training (batch 8 x 256 x 64,794 floats
is 530 MB, and autograd keeps a second copy for the gradient). Here the gradient of each chunk is
formed right after its loss, so at most `chunk_rows` rows of logits ever exist, in one buffer
reused by every chunk. The three matmuls are the same as the unfused version; what goes away is the
memory and the passes over it. The logits are formed transposed, (vocab, rows), because that GEMM
runs at the speed of the other two on CPU (h @ w.T ran ~1.4x slower), and the softmax is taken
down the columns.

Per-row losses (reduction="none") cannot form their gradient in forward: it is weighted by each
row's grad_output, known only in backward. They keep each row's log-sum-exp instead and recompute
the logits chunk by chunk in backward, one matmul more than the sum, with the same memory bound."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


def _compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def _add_weight_grad(grad_w: torch.Tensor | None, d_logits: torch.Tensor, h_scaled: torch.Tensor) -> torch.Tensor:
    """grad_w (float32, or None before the first chunk) + d_logits @ h_scaled, one chunk's share."""
    if grad_w is None:
        return (d_logits @ h_scaled).float()
    if d_logits.dtype == torch.float32:
        return grad_w.addmm_(d_logits, h_scaled)
    return grad_w.add_((d_logits @ h_scaled).float())  # low-precision matmul, float32 accumulation


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                need_h: bool, need_w: bool):
        dtype = _compute_dtype(hidden.device.type, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            n_rows, vocab = h_all.shape[0], w.shape[0]
            grad_h = torch.empty_like(h_all) if need_h else None
            grad_w = None  # float32; the first chunk's product, then accumulated into
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            # one logits buffer for every chunk: a fresh 64 MB tensor per chunk costs page faults
            # (glibc's aligned allocations rarely reuse the block just freed)
            buffer = torch.empty(vocab * min(chunk_rows, n_rows), dtype=dtype, device=hidden.device)
            for start in range(0, n_rows, chunk_rows):
                h, t = h_all[start:start + chunk_rows], targets[start:start + chunk_rows]
                valid = t != IGNORE_INDEX
                t_safe = torch.where(valid, t, 0)[None, :]
                # logits transposed, (vocab, rows): MKL runs this orientation ~1.4x faster than
                # h @ w.T for a wide vocabulary, and each row's softmax becomes a column's
                logits = torch.mm(w, h.t(), out=buffer[:vocab * h.shape[0]].view(vocab, h.shape[0])).float()
                picked = logits.gather(0, t_safe)
                peak = logits.amax(dim=0, keepdim=True)
                exps = logits.sub_(peak).exp_()  # in place: the logits are not needed again
                sums = exps.sum(dim=0, keepdim=True)
                total += ((sums.log() + peak - picked) * valid).sum()
                if need_h or need_w:
                    # d(loss)/d(logits) = exps / sums - onehot = (exps - sums * onehot) / sums. The
                    # division and the zeroing of ignored rows are applied to the small (rows, dim)
                    # operands and results rather than to the (vocab, rows) matrix: one pass less
                    exps.scatter_add_(0, t_safe, -sums)
                    scale = ((valid / sums.squeeze(0))[:, None]).to(dtype)  # (rows, 1)
                    d_logits = exps.to(dtype)
                    # each gradient only for an input that wants one: under LoRA the head is frozen
                    # and the (vocab, dim) product, a third of the work, is skipped
                    if need_h:
                        grad_h[start:start + chunk_rows] = (d_logits.t() @ w) * scale
                    if need_w:
                        grad_w = _add_weight_grad(grad_w, d_logits, h * scale)
            if need_w and grad_w is None:  # no rows at all
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h * grad_total).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_total).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


class _LinearCrossEntropyRows(torch.autograd.Function):
    """Each row's loss, (N,). Saves the inputs and each row's log-sum-exp, not a gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        dtype = _compute_dtype(hidden.device.type, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            n_rows, vocab = h_all.shape[0], w.shape[0]
            lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
            losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
            buffer = torch.empty(vocab * min(chunk_rows, n_rows), dtype=dtype, device=hidden.device)
            for start in range(0, n_rows, chunk_rows):
                h, t = h_all[start:start + chunk_rows], targets[start:start + chunk_rows]
                valid = t != IGNORE_INDEX
                logits = torch.mm(w, h.t(), out=buffer[:vocab * h.shape[0]].view(vocab, h.shape[0])).float()
                picked = logits.gather(0, torch.where(valid, t, 0)[None, :]).squeeze(0)
                peak = logits.amax(dim=0)
                row_lse = logits.sub_(peak).exp_().sum(dim=0).log_().add_(peak)
                lse[start:start + chunk_rows] = row_lse
                # where, not a product with the mask: ignored rows are exactly 0 even if inf
                losses[start:start + chunk_rows] = torch.where(valid, row_lse - picked, 0.0)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.dtype, ctx.chunk_rows = dtype, chunk_rows  # backward may run outside the autocast region
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dtype, chunk_rows = ctx.dtype, ctx.chunk_rows
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            n_rows, vocab = h_all.shape[0], w.shape[0]
            # an ignored row has no loss to differentiate, whatever grad_output holds there
            row_scale = torch.where(targets != IGNORE_INDEX, grad_losses.float(), 0.0)
            grad_h = torch.empty(h_all.shape, dtype=torch.float32, device=hidden.device) if need_h else None
            grad_w = None  # float32; the first chunk's product, then accumulated into
            buffer = torch.empty(vocab * min(chunk_rows, n_rows), dtype=dtype, device=hidden.device)
            for start in range(0, n_rows, chunk_rows):
                h, t = h_all[start:start + chunk_rows], targets[start:start + chunk_rows]
                g = row_scale[start:start + chunk_rows, None]  # (rows, 1)
                logits = torch.mm(w, h.t(), out=buffer[:vocab * h.shape[0]].view(vocab, h.shape[0])).float()
                # softmax from the saved log-sum-exp, minus the one-hot: d(loss_i)/d(logits_i).
                # As in the sum, grad_output scales the small operands, not this matrix
                probs = logits.sub_(lse[None, start:start + chunk_rows]).exp_()
                t_safe = torch.where(t != IGNORE_INDEX, t, 0)[None, :]
                probs.scatter_add_(0, t_safe, torch.full_like(t_safe, -1.0, dtype=probs.dtype))
                d_logits = probs.to(dtype)
                if need_h:
                    grad_h[start:start + chunk_rows] = (d_logits.t() @ w).float() * g
                if need_w:
                    grad_w = _add_weight_grad(grad_w, d_logits, (h.float() * g).to(dtype))  # one rounding
            if need_w and grad_w is None:  # no rows at all
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        gh = grad_h.to(hidden.dtype) if need_h else None
        gw = grad_w.to(weight.dtype) if need_w else None
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None, reduction: str = "sum") -> torch.Tensor:
    """-log softmax(hidden @ weight.T)[target] for each non-ignored position, summed or per row.

    hidden: (N, dim), weight: (vocab, dim), targets: (N,) with IGNORE_INDEX for positions to skip.
    reduction="sum" returns a float32 scalar: the *sum*, so callers can normalise by the token count
    of a whole (accumulated) batch. reduction="none" returns float32 (N,) losses, exactly 0.0 at
    ignored positions, still without ever holding more than `chunk_rows` rows of logits.
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', not {reduction!r}")
    n_rows, kept = targets.shape[0], None
    if not torch.compiler.is_compiling():
        # SFT takes loss on a few answer tokens per sequence: the LM head (the largest matmul for
        # a big vocabulary) only needs those rows. index_select keeps the graph: its backward
        # scatters the gradient back to the selected positions.
        kept = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        if kept.numel() < targets.numel():
            hidden, targets = hidden.index_select(0, kept), targets.index_select(0, kept)
        else:
            kept = None
    if chunk_rows is None:
        # ~128 MB of float32 logits per chunk whatever the vocabulary (512 rows at 64,794: a quarter
        # of batch 8 x 256; larger chunks measured no faster), in a multiple of 64 rows, which
        # keeps MKL's GEMM at full speed (258 rows ran ~25% slower than 256)
        chunk_rows = max(128, (1 << 25) // weight.shape[0] // 64 * 64)
    if reduction == "none":
        losses = _LinearCrossEntropyRows.apply(hidden, weight, targets, chunk_rows)
        if kept is None:
            return losses
        # back to all N positions; index_copy's backward hands the kept rows their grad_output
        return losses.new_zeros(n_rows).index_copy(0, kept, losses)
    # inside an autograd.Function grad mode is always off, so decide here: evaluation under
    # torch.no_grad() must not pay for the gradient matmuls, nor a frozen input for its gradient
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows,
                                     grad and hidden.requires_grad, grad and weight.requires_grad)
