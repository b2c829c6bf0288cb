"""LM head fused with cross-entropy, computed a chunk of rows at a time.

Full logits for a 64k vocabulary are the largest tensor in training (batch 8 x 256 x 64,794 floats
is 530 MB, and autograd keeps a second copy for the gradient). Here the gradient of each chunk is
formed right after its loss, so at most `chunk_rows` rows of logits ever exist, in one buffer
reused by every chunk. The three matmuls are the same as the unfused version; what goes away is the
memory and the passes over it. The logits are formed transposed, (vocab, rows), because that GEMM
runs at the speed of the other two on CPU (h @ w.T ran ~1.4x slower), and the softmax is taken
down the columns."""

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
            n_rows, vocab = h_all.shape[0], w.shape[0]
            grad_h = torch.empty_like(h_all) if want_grad else None
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
                if want_grad:
                    # d(loss)/d(logits) = exps / sums - onehot = (exps - sums * onehot) / sums. The
                    # division and the zeroing of ignored rows are applied to the small (rows, dim)
                    # operands and results rather than to the (vocab, rows) matrix: one pass less
                    exps.scatter_add_(0, t_safe, -sums)
                    scale = ((valid / sums.squeeze(0))[:, None]).to(dtype)  # (rows, 1)
                    d_logits = exps.to(dtype)
                    grad_h[start:start + chunk_rows] = (d_logits.t() @ w) * scale
                    h_scaled = h * scale
                    if grad_w is None:
                        grad_w = (d_logits @ h_scaled).float()
                    elif dtype == torch.float32:
                        grad_w.addmm_(d_logits, h_scaled)
                    else:  # low-precision matmul, float32 accumulation across chunks
                        grad_w += (d_logits @ h_scaled).float()
            if want_grad and grad_w is None:  # no rows at all
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
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
    if chunk_rows is None:
        # ~128 MB of float32 logits per chunk whatever the vocabulary (512 rows at 64,794: a quarter
        # of batch 8 x 256; larger chunks measured no faster), in a multiple of 64 rows, which
        # keeps MKL's GEMM at full speed (258 rows ran ~25% slower than 256)
        chunk_rows = max(128, (1 << 25) // weight.shape[0] // 64 * 64)
    # inside an autograd.Function grad mode is always off, so decide here: evaluation under
    # torch.no_grad() must not pay for the gradient matmuls
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, want_grad)
