"""A Llama-2 decoder in one file: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Read top to bottom: the blocks, then the model. Attention goes through
`scaled_dot_product_attention`, which picks flash / memory-efficient kernels on GPUs.
The model holds no training state: optimizers, precision, sharding and quantization wrap it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from babyllama.config import ModelConfig
from babyllama.model.kv_cache import KVCache
from babyllama.model.loss import IGNORE_INDEX, linear_cross_entropy
from babyllama.model.rope import RotaryEmbedding, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v in one matmul: one large GEMM runs closer to peak than three small ones
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.core = DotProductAttention(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0, start_pos: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            k, v, mask = cache.update(layer, start_pos, k, v)
        # no mask: causal when queries and keys are the same positions; one query after a cache sees all
        causal = mask is None and k.shape[2] == T
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = self.core(q, k, v, mask, causal)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class DotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over (batch, heads, seq, head_dim): the one place attention is
    computed, a module so that a transformation can swap it (train/s2attn.py, LongLoRA's shifted
    sparse attention) without touching the projections around it."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        if q.shape[2] == 1 and mask is not None and torch.compiler.is_compiling():
            # one query over a fixed-size cache (the compiled decode step): written out, the compiler
            # fuses it; SDPA's CPU kernel costs ~90 us a call for this little work (step 4% faster)
            scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            return scores.masked_fill(~mask, float("-inf")).float().softmax(dim=-1).to(v.dtype) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              dropout_p=self.dropout if self.training else 0.0)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_dim = cfg.hidden_dim
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)  # gate (w1) and up (w3) fused
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, cache=None, layer=0, start_pos=0, mask=None):
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, cache, layer, start_pos, mask))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


def segment_positions_and_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed rows: each token's position inside its segment, and the (batch, 1, seq, seq)
    attention mask that is causal and never crosses a segment boundary."""
    B, T = segments.shape
    idx = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return idx - first, (same & causal).unsqueeze(1)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (it is normally taken from the tokenizer)")
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # the LM head is a module like every projection, so transformations (decoding layout, LoRA,
        # quantization) can wrap it; tied, it shares the embedding's Parameter (checkpoints store it once)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(cfg)  # cos/sin tables, scaled as cfg.rope_scaling says
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if name.startswith("rope."):
                continue  # CLEX's ODE has its own initialisation (NTK scaling until trained)
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("wo.weight", "w2.weight")):
                # residual projections scaled down with depth (GPT-2) so the residual stream starts small
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, start_pos: int | torch.Tensor = 0, last_only: bool = False,
                segments: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab), or the loss of `targets` when given.

        With `targets` (same shape, -100 where no loss is wanted) the LM head and the cross-entropy
        run fused, a chunk of rows at a time, so full logits never exist (model/loss.py). `reduction`
        "sum" returns the *sum* of token losses (the caller divides by the number of counted
        tokens); "none" returns each token's loss, -log p(target), as (batch, seq) float32 with 0
        where the target is -100: per-sequence log-probs for preference and RL objectives.
        `last_only` returns logits for the final position only (generation needs nothing else).

        `segments` (batch, seq) packs several documents into one row: a token attends only to
        earlier tokens of its own segment, and positions restart at 0 with each segment, so a
        packed document is computed exactly as if it were alone.

        A `cache` may hold rows of unequal length, left-padded (`KVCache.pad`): each row's positions
        then start at its first real token and padding is never attended to.
        """
        T = tokens.shape[1]
        if not isinstance(start_pos, torch.Tensor) and start_pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} positions exceeds max_seq_len={self.config.max_seq_len}")
        mask = None
        if isinstance(start_pos, torch.Tensor):  # a compiled decode step: positions as data, not shapes
            if self.rope.dynamic:
                raise ValueError(f"RoPE scaling {self.config.rope_scaling!r} changes with the length: "
                                 f"decode it step by step, not as one compiled graph")
            positions = start_pos + torch.arange(T, device=tokens.device)
            if cache is not None and cache.pad is not None:
                positions = cache.positions(start_pos, T)
                cos, sin = self.rope.cos[positions].unsqueeze(1), self.rope.sin[positions].unsqueeze(1)
            else:
                cos, sin = self.rope.cos[positions], self.rope.sin[positions]
        else:
            end = start_pos + T
            cos, sin = self.rope.tables(end)
            if cache is not None and self.rope.dynamic:
                cos, sin = self._dynamic_cached_tables(cache, start_pos, end, cos, sin)
            if segments is not None:
                if cache is not None:
                    raise ValueError("segments (packed sequences) are for training, not for cached generation")
                positions, mask = segment_positions_and_mask(segments)
                cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
            elif cache is not None and cache.pad is not None:  # left-padded rows: positions per row
                positions = cache.positions(start_pos, T)
                if cos.dim() == 3:  # per-row tables (a dynamic scaling)
                    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
                    cos, sin = cos[rows, positions].unsqueeze(1), sin[rows, positions].unsqueeze(1)
                else:
                    cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
            else:
                cos, sin = cos[start_pos:end], sin[start_pos:end]
        x = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, start_pos, mask)
        x = self.norm(x)
        if targets is not None:
            return self._head_loss(x, targets, reduction)
        if last_only:
            x = x[:, -1:, :]
        return self.output(x)

    def _head_loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        if reduction not in ("sum", "none"):
            raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
        rows, flat = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        # a plain head, or a transformed one that is still one matrix and offers it (`loss_weight()`):
        # fused with the loss, no full logits
        weight = self.output.weight if type(self.output) is nn.Linear else \
            getattr(self.output, "loss_weight", lambda: None)()
        if weight is not None:
            loss = linear_cross_entropy(rows, weight, flat, reduction=reduction)
        else:  # a transformed head (adapter, quantized): its own forward, full logits
            loss = F.cross_entropy(self.output(rows).float(), flat, ignore_index=IGNORE_INDEX, reduction=reduction)
        return loss if reduction == "sum" else loss.view(targets.shape)

    @torch.no_grad()
    def _dynamic_cached_tables(self, cache: KVCache, start_pos: int, end: int, cos: torch.Tensor,
                               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A dynamic scaling's frequencies follow the length. Each left-padded row gets those of its
        own length (it computes what it would alone); the keys cached so far are rotated from the
        frequencies they were written with to this step's (rotations compose: R(a + d) = R(d) R(a)),
        so cached decoding equals a full forward pass over the same tokens."""
        if cache.pad is None:
            new = self.rope.inv_freq(end).cpu()
        else:
            new = torch.stack([self.rope.inv_freq(int(n)).cpu() for n in (end - cache.pad).tolist()])
        old, cache.rope_inv_freq = cache.rope_inv_freq, new
        device = cache.keys[0].device
        if old is not None and start_pos > 0 and not torch.equal(old, new):
            if cache.pad is None:
                positions = torch.arange(start_pos, dtype=torch.float64)
                angles = positions[:, None] * (new - old)[None, :]  # (slots, head_dim / 2)
            else:
                positions = cache.positions(0, start_pos).cpu().double()
                angles = (positions[:, :, None] * (new - old)[:, None, :]).unsqueeze(1)  # (batch, 1, slots, .)
            dcos, dsin = angles.cos().float().to(device), angles.sin().float().to(device)
            for keys in cache.keys:
                keys[:, :, :start_pos] = apply_rope(keys[:, :, :start_pos], dcos, dsin)
        if cache.pad is None:
            return cos, sin
        # this step's rows each at their own frequencies, indexed later by their own positions
        angles = torch.arange(end, dtype=torch.float64)[None, :, None] * new[:, None, :].double()
        return angles.cos().float().to(device), angles.sin().float().to(device)  # (batch, end, head_dim / 2)

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        cfg, w = self.config, self.norm.weight  # the activations' dtype and device (norms stay float when weights are quantized)
        return KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, max_seq_len or cfg.max_seq_len, cfg.head_dim,
                       dtype=w.dtype, device=w.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
