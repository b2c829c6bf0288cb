"""LoRA and DoRA: low-rank updates learned beside frozen weights, as a transformation of the plain model.

LoRA (Hu et al. 2021) learns, for a frozen projection W (out x in), two small matrices A (r x in)
and B (out x r) and computes

    y = W x + s * B A dropout(x)          s = alpha / r   (alpha / sqrt(r) with rsLoRA)

B starts at zero, so training starts from the base model exactly. DoRA (Liu et al. 2024) splits
the updated weight into a direction and a learned magnitude m (one per output row):

    W' = m * (W + s B A) / ||W + s B A||     (the norm per output row, treated as a constant in
                                              the backward pass, the paper's section 4.3)

m starts at ||W||, so DoRA too starts from the base model exactly.

Our projections are fused (q, k and v in one `wqkv`; gate and up in one `w13`) while every other
tool, PEFT included, adapts q_proj, k_proj, ... separately. Each target therefore owns the rows of
its slice: `wqkv` with targets q and v has adapters for rows [0, q) and [q+k, q+k+v) only. One
matmul computes every slice's A x (the A's stacked), then each slice's B. An adapter of ours is
thus the same adapter PEFT would train on the unfused model (adapters/peft.py only renames).

The LM head is a target too (`head`, on by default): a small model's frozen, tied head limits how
far apart the logits of two answers can move. `TrainedRows` trains chosen rows of the embedding
(the chat markers in SFT, which pretraining never showed); a tied head reads the same rows.

`LoRA(rank=8, ...)` is a registered transformation (transforms.py): it freezes the model, wraps the
targeted `nn.Linear`s in `LoraLinear` and leaves the model class untouched. `merge_adapters`
folds every adapter into plain weights (the model is then an ordinary `Llama` again; an adapted
head of a tied model becomes a head of its own).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from babyllama.config import DEFAULT_LORA_TARGETS, ConfigError, LoraConfig
from babyllama.transforms import ADAPTER, register, replace_modules, unrecord

# the fused projection of each target (its rows: projection_slices); PEFT's module names in adapters/peft.py
PROJECTIONS = {"attention.wqkv": ("q", "k", "v"), "attention.wo": ("o",),
               "feed_forward.w13": ("gate", "up"), "feed_forward.w2": ("down",)}


def projection_slices(cfg, projection: str) -> dict[str, tuple[int, int]]:
    """The row range of each target inside a (fused) projection of a model of config `cfg`."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    if projection == "attention.wqkv":
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    if projection == "feed_forward.w13":
        return {"gate": (0, cfg.hidden_dim), "up": (cfg.hidden_dim, 2 * cfg.hidden_dim)}
    if projection == "attention.wo":
        return {"o": (0, cfg.dim)}
    if projection == "feed_forward.w2":
        return {"down": (0, cfg.dim)}
    raise KeyError(projection)


class LoraLinear(nn.Module):
    """A frozen projection (`base`) plus a LoRA or DoRA update on some of its row slices.

    Parameters, per targeted slice t: `lora_A[t]` (r, in), `lora_B[t]` (rows of t, r) and, for
    DoRA, `lora_magnitude[t]` (rows of t). `slices` lists every slice of the projection in order
    (name -> (start, end)), targeted or not."""

    def __init__(self, base: nn.Module, slices: dict[str, tuple[int, int]], targets: list[str], rank: int,
                 scale: float, dropout: float, dora: bool):
        super().__init__()
        self.base, self.slices, self.targets = base, dict(slices), list(targets)
        self.rank, self.scale, self.dora = rank, scale, dora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # a plain projection's weight, or (a quantized base: QLoRA) a float tensor of it for dtype and device
        weight = base.weight if not getattr(base, "quantized", False) else base.scales
        in_features = base.in_features
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for t in self.targets:
            start, end = self.slices[t]
            a = torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear initialises (and PEFT does)
            self.lora_A[t] = nn.Parameter(a)
            self.lora_B[t] = nn.Parameter(torch.zeros(end - start, rank, dtype=weight.dtype, device=weight.device))
        if dora:
            if getattr(base, "quantized", False):
                raise ConfigError("DoRA needs the float weights of the projections it adapts; this base is quantized "
                                  "(use --lora, or DoRA on the float model)")
            self.lora_magnitude = nn.ParameterDict({
                t: nn.Parameter(weight.detach()[slice(*self.slices[t])].float().norm(dim=1).to(weight.dtype))
                for t in self.targets})

    def delta(self, target: str) -> torch.Tensor:
        """s * B A for one target: the update of its rows of the weight."""
        return self.scale * (self.lora_B[target] @ self.lora_A[target])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        dropped = self.dropout(x)
        a = self.lora_A[self.targets[0]] if len(self.targets) == 1 else \
            torch.cat([self.lora_A[t] for t in self.targets])
        lows = (F.linear(dropped, a) * self.scale).split(self.rank, dim=-1)  # every s A x at once, scaled while small
        updates = {t: F.linear(low, self.lora_B[t]) for t, low in zip(self.targets, lows)}
        if not self.dora:
            # out of place: an in-place add into slices of y makes autograd copy y's gradient per slice
            if len(self.slices) == 1:
                return y + updates[self.targets[0]]
            return y + torch.cat([updates[t] if t in updates else y.new_zeros(*y.shape[:-1], end - start)
                                  for t, (start, end) in self.slices.items()], dim=-1)
        pieces = []
        sizes = [end - start for start, end in self.slices.values()]
        for (t, (start, end)), rows in zip(self.slices.items(), y.split(sizes, dim=-1)):
            if t not in updates:
                pieces.append(rows)
                continue
            # DoRA: m / ||W + sBA|| (the norm detached) times (W x + s B A x)
            w = self.base.weight[start:end]
            norm = (w + self.delta(t).detach().to(w.dtype)).norm(dim=1).detach()
            g = (self.lora_magnitude[t] / norm).to(y.dtype)
            if isinstance(self.dropout, nn.Identity) or not self.training:
                pieces.append(g * (rows + updates[t]))
            else:  # the base output saw x, the update a dropped-out x: as PEFT, W on the dropped x too
                pieces.append(rows + (g - 1) * F.linear(dropped, w) + g * updates[t])
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def loss_weight(self) -> torch.Tensor:
        """The weight this module computes with, differentiable in the adapter (one matrix, so the
        model's fused head + loss can use it when LoRA adapts the LM head); None over a quantized
        base, whose float weights never exist (the head then computes full logits)."""
        if getattr(self.base, "quantized", False):
            return None
        w = self.base.weight
        pieces = []
        for t, (start, end) in self.slices.items():
            rows = w[start:end]
            if t in self.targets:
                rows = rows + self.delta(t).to(w.dtype)
                if self.dora:
                    rows = rows * (self.lora_magnitude[t] / rows.detach().norm(dim=1))[:, None].to(w.dtype)
            pieces.append(rows)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight with every update folded in (float32 arithmetic, the base's dtype)."""
        w = self.base.weight.detach().float().clone()
        for t in self.targets:
            rows = slice(*self.slices[t])
            updated = w[rows] + self.delta(t).float()
            if self.dora:
                updated = updated * (self.lora_magnitude[t].float() / updated.norm(dim=1))[:, None]
            w[rows] = updated
        return w.to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"targets={self.targets}, rank={self.rank}, scale={self.scale:g}, dora={self.dora}"


class TrainedRows(nn.Module):
    """An embedding whose rows `indices` train while the others stay frozen (PEFT's "trainable
    tokens"): the chat markers, which a pretrained model never saw and whose rows pretraining's
    weight decay shrank to nearly zero, so frozen they leave the model unable to end a reply."""

    def __init__(self, base: nn.Embedding, indices: list[int]):
        super().__init__()
        self.base = base
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long, device=base.weight.device),
                             persistent=False)
        self.rows = nn.Parameter(base.weight.detach()[self.indices].clone())

    @property
    def weight(self) -> torch.Tensor:
        """The embedding matrix in use: the base's, with the trained rows in place."""
        return self.base.weight.index_copy(0, self.indices, self.rows.to(self.base.weight.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)

    def extra_repr(self) -> str:
        return f"rows={self.indices.tolist()}"


class TiedRowsHead(nn.Module):
    """The LM head tied to a `TrainedRows` embedding: the same matrix, trained rows included."""

    def __init__(self, base: nn.Linear, embedding: TrainedRows):
        super().__init__()
        self.base = base
        object.__setattr__(self, "_embedding", embedding)  # a reference, not a submodule: its state is the embedding's

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight

    def loss_weight(self) -> torch.Tensor:  # one matrix: the model's fused head + loss can use it
        return self._embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._embedding.weight)


@register
class LoRA:
    """The transformation: freeze the model, wrap the targeted projections. With `dora`, DoRA."""

    name, order, trains_own_params = "lora", ADAPTER, True

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.05, targets=DEFAULT_LORA_TARGETS,
                 dora: bool = False, rslora: bool = False, train=(), token_rows=()):
        self.config = LoraConfig(rank, alpha, dropout, targets, dora, rslora, train, tokens="none")
        self.token_rows = sorted({int(t) for t in token_rows}) if "embeddings" not in self.config.train else []

    @classmethod
    def from_config(cls, cfg: LoraConfig, chat_ids: tuple[int, ...] = ()) -> "LoRA":
        """`chat_ids`: the chat markers of the stage's template, trained when cfg.tokens is "chat"."""
        return cls(cfg.rank, cfg.alpha, cfg.dropout, cfg.targets, cfg.dora, cfg.rslora, cfg.train,
                   cfg.token_rows(chat_ids))

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {"rank": c.rank, "alpha": c.alpha, "dropout": c.dropout, "targets": list(c.targets),
                "dora": c.dora, "rslora": c.rslora, "train": list(c.train), "token_rows": self.token_rows}

    def apply(self, model: nn.Module) -> None:
        c = self.config
        if any(isinstance(m, LoraLinear) for m in model.modules()):
            raise ConfigError("this model already has LoRA adapters: merge them first "
                              "(babyllama lora merge) to train new ones on top")
        for p in model.parameters():
            p.requires_grad_(False)
        for name, p in model.named_parameters():
            if ("norms" in c.train and p.dim() == 1) or ("embeddings" in c.train and name == "tok_embeddings.weight"):
                p.requires_grad_(True)

        def swap(name: str, module: nn.Module):
            if name == "output" and "head" in c.targets and adaptable(module):
                return LoraLinear(module, {"head": (0, module.out_features)}, ["head"], c.rank, c.scale,
                                  c.dropout, c.dora).train(model.training)
            projection = name.split(".", 2)[-1] if name.startswith("layers.") else None
            if projection not in PROJECTIONS or not adaptable(module):
                return None
            wanted = [t for t in PROJECTIONS[projection] if t in c.targets]
            if not wanted:
                return None
            return LoraLinear(module, projection_slices(model.config, projection), wanted, c.rank, c.scale,
                              c.dropout, c.dora).train(model.training)  # new modules follow the model's mode

        tied = getattr(model.output, "weight", None) is not None and \
            model.output.weight is getattr(model.tok_embeddings, "weight", None)
        if replace_modules(model, swap) == 0:
            raise ConfigError("LoRA found no projection to adapt in this model")
        if self.token_rows:
            if not hasattr(model.tok_embeddings, "weight"):
                raise ConfigError("--lora-tokens trains embedding rows, but this model's embeddings are quantized")
            vocab = model.tok_embeddings.weight.shape[0]
            if max(self.token_rows) >= vocab:
                raise ConfigError(f"--lora-tokens: id {max(self.token_rows)} is past the vocabulary ({vocab} ids)")
            model.tok_embeddings = TrainedRows(model.tok_embeddings, self.token_rows)
            if tied and isinstance(model.output, LoraLinear):  # the head's adapter over the trained rows
                model.output.base = TiedRowsHead(model.output.base, model.tok_embeddings)
            elif tied:
                model.output = TiedRowsHead(model.output, model.tok_embeddings)

    # checkpoints of a LoRA run are PEFT adapter directories (adapters/peft.py)
    @staticmethod
    def save_weights(directory, weights, model_config, settings, base) -> None:
        from babyllama.adapters.peft import save_peft

        save_peft(directory, weights, model_config, settings, base)

    @staticmethod
    def load_weights(directory, model_config, settings) -> dict[str, torch.Tensor]:
        from babyllama.adapters.peft import load_peft_weights

        return load_peft_weights(directory)


def adaptable(module: nn.Module) -> bool:
    """A plain projection, or a quantized one (frozen codes: LoRA over it is QLoRA)."""
    return type(module) is nn.Linear or getattr(module, "quantized", False)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA/DoRA update into its projection's weight, in place: the model is plain again
    (nn.Linear projections, no LoRA record), with every parameter trainable as a fresh model's."""

    if isinstance(model.output, LoraLinear):
        # the head's own weight from now on: a tied model's head no longer equals its embedding
        merged = model.output.merged_weight()
        model.output = nn.Linear(merged.shape[1], merged.shape[0], bias=False, device=merged.device, dtype=merged.dtype)
        model.output.weight.data = merged
        if model.config.tie_embeddings:
            model.config = dataclasses.replace(model.config, tie_embeddings=False)

    def swap(name: str, module: nn.Module):
        if not isinstance(module, LoraLinear):
            return None
        if type(module.base) is not nn.Linear:
            raise ConfigError(f"{name}: cannot merge an adapter over a {type(module.base).__name__} "
                              f"(merge before laying the model out for decoding or quantizing it)")
        plain = module.base
        plain.weight.data = module.merged_weight()
        return plain

    replace_modules(model, swap)
    if isinstance(model.tok_embeddings, TrainedRows):
        rows = model.tok_embeddings
        rows.base.weight.data[rows.indices] = rows.rows.detach().to(rows.base.weight.dtype)
        model.tok_embeddings = rows.base
        if isinstance(model.output, TiedRowsHead):  # tied: the head shares the (now updated) embedding
            model.output = model.output.base
    unrecord(model, LoRA.name)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied embedding and head counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
