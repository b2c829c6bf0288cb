"""DeepSpeed ZeRO as an alternative engine for the one training loop (`--deepspeed CONFIG.json`).

The user's JSON chooses the ZeRO stage and DeepSpeed's own knobs; babyllama fills in what its
flags already decide, so the two can never disagree:

    babyllama                       DeepSpeed config
    train.batch_size                train_micro_batch_size_per_gpu
    train.grad_accum                gradient_accumulation_steps
    batch x accum x processes       train_batch_size
    train.grad_clip                 gradient_clipping
    train.lr, beta1/2, weight_decay optimizer {"type": "AdamW", "params": {...}}; decay on matrices only,
                                    through the parameter groups we hand to deepspeed.initialize
    warmup + cosine (lr_at)         no "scheduler": the loop writes lr_at(step) into the optimizer's
                                    groups before every step, exactly as without DeepSpeed. (The original
                                    project's blow-up came from DeepSpeed's WarmupLR ramping to its own
                                    default peak, not ours.)
    dtype bf16 / fp16               bf16.enabled / fp16.enabled (dynamic loss scale)

A key the user also set to a different value is an error naming both, not a silent override.
Losses are normalised by the tokens of the whole step on all ranks (as without DeepSpeed), so
backward runs with scale_wrt_gas=False.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from babyllama.config import ConfigError, TrainConfig


def deepspeed_config(cfg: TrainConfig, user_file: str | Path | dict, world_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """The config DeepSpeed receives: the user's file plus the fields babyllama owns."""
    if isinstance(user_file, dict):
        user, where = dict(user_file), "the DeepSpeed config"
    else:
        where = str(user_file)
        try:
            user = json.loads(Path(user_file).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{user_file}: no such DeepSpeed config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{user_file}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if "scheduler" in user:
        raise ConfigError(f"{where}: remove \"scheduler\": the learning-rate schedule comes from train.lr, "
                          f"train.min_lr and train.warmup_steps (warmup + cosine), applied every step")
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip if cfg.grad_clip > 0 else 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2], "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay}},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0},
    }
    merged = dict(user)
    for key, value in ours.items():
        theirs = user.get(key)
        if isinstance(value, dict) and isinstance(theirs, dict):
            merged[key] = _merge_owned(key, theirs, value, where)
        elif theirs is not None and theirs != "auto" and theirs != value:
            raise ConfigError(f"{where}: {key} = {theirs!r}, but babyllama's settings give {value!r}; "
                              f"remove it from the file (or set it to \"auto\") and use the babyllama flag instead")
        else:
            merged[key] = value
    merged.setdefault("steps_per_print", 10**9)  # our progress bar reports; keep DeepSpeed quiet
    merged.setdefault("zero_optimization", {"stage": 0})
    return merged


def _merge_owned(key: str, theirs: dict, ours: dict, where: str) -> dict:
    out = dict(theirs)
    for k, v in ours.items():
        if k == "params":
            out[k] = _merge_owned(f"{key}.params", theirs.get(k, {}), v, where)
        elif k in theirs and theirs[k] != "auto" and theirs[k] != v and not (k == "type" and str(theirs[k]).lower() in ("adam", "adamw")):
            raise ConfigError(f"{where}: {key}.{k} = {theirs[k]!r}, but babyllama's settings give {v!r}; "
                              f"remove it from the file and use the babyllama flag instead")
        else:
            out[k] = v
    return out


def init_engine(model: torch.nn.Module, cfg: TrainConfig, config_file: str, world_size: int, dtype: torch.dtype,
                param_groups: list[dict]):
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("--deepspeed needs the deepspeed package: pip install deepspeed") from None
    ds_config = deepspeed_config(cfg, config_file, world_size, dtype)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config)
    return engine, optimizer, ds_config


class DeepSpeedRun:
    """What the loop needs from a DeepSpeed engine, in the loop's terms."""

    TAG = "zero"

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, config_file: str, world_size: int,
                 dtype: torch.dtype, param_groups: list[dict]):
        _ensure_process_group()
        self.engine, self.optimizer, self.config = init_engine(model, cfg, config_file, world_size, dtype, param_groups)
        self.stage = int(self.config.get("zero_optimization", {}).get("stage", 0))

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """One micro-batch: DeepSpeed counts them and steps the optimizer at the accumulation boundary."""
        self.engine.backward(loss, scale_wrt_gas=False)  # our loss is already normalised per step
        self.engine.step()

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Unsharded weights (a collective under ZeRO-3, where only rank 0 gets them)."""
        if self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict() or {}
        else:
            state = self.engine.module.state_dict()
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state.items()}

    def save_shards(self, directory: Path) -> None:
        """Every rank writes its optimizer partition (a collective)."""
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)

    def load_shards(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory}: DeepSpeed could not load its checkpoint (saved with another "
                                    f"number of processes or ZeRO stage? start a new run from the weights with --init)")


def _ensure_process_group() -> None:
    """DeepSpeed needs a process group even for one process."""
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
