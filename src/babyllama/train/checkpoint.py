"""Checkpoints: safetensors weights plus the state needed to resume exactly, written atomically.

    OUT/checkpoints/step-00001000/
        model.safetensors     weights (loadable without pickle)
        config.json           the model config (and the run config, for the record)
        optimizer.pt          optimizer state (tensors and numbers only; loaded with weights_only=True)
        state.pt              step, data position, RNG states (same restriction)
    OUT/checkpoints/latest    name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp/`, flushed, then renamed; `latest` is replaced the same
way. A crash at any moment leaves the previous checkpoint intact and `latest` pointing at it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from babyllama.config import ModelConfig

CKPT_DIR = "checkpoints"


class CheckpointError(FileNotFoundError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights as contiguous CPU tensors; tied embeddings are stored once."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, model_config: ModelConfig,
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                    run_config: dict[str, Any] | None = None, keep: int = 2) -> Path:
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final, tmp = root / name, root / (name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    meta = {"model": model_config.__dict__, "step": step, "run": run_config or {}}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if state is not None:
        torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / "latest", name + "\n")
    _prune(root, keep, protect=name)
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """Accept a run directory (newest checkpoint in it) or a checkpoint directory itself."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    root = path / CKPT_DIR
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    latest = root / "latest"
    if latest.is_file():
        candidate = root / latest.read_text(encoding="utf-8").strip()
        if (candidate / "model.safetensors").is_file():
            return candidate
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "model.safetensors").is_file()) if root.is_dir() else []
    if not done:
        raise CheckpointError(f"{path}: no checkpoint found (expected {root}/step-*/model.safetensors)")
    return done[-1]


def read_model_config(ckpt: Path) -> ModelConfig:
    meta = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    return ModelConfig(**meta["model"])


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    state = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_training_state(ckpt: Path) -> tuple[dict | None, dict | None]:
    """Optimizer and trainer state, loaded without unpickling arbitrary objects."""
    opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True) if (ckpt / "optimizer.pt").is_file() else None
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True) if (ckpt / "state.pt").is_file() else None
    return opt, state


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, checkpoint dir) from a run directory or checkpoint directory, ready for inference."""
    from babyllama.model import Llama

    ckpt = find_checkpoint(path)
    model = Llama(read_model_config(ckpt))
    load_weights(model, ckpt)
    return model.to(device).eval(), ckpt
