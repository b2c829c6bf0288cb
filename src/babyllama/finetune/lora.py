"""`babyllama lora merge` and `babyllama lora import`: adapter runs in and out of plain weights.

Training with LoRA/DoRA is `babyllama sft --lora` (or `pretrain --init CKPT --lora`): the same stage,
its model transformed (adapters/lora.py). Its checkpoints hold the adapter alone, as PEFT adapter
directories naming their base. Here:

    merge   ADAPTER_RUN -> a run directory with one plain checkpoint (adapter folded into the weights),
            which every stage and tool takes like any other
    import  a PEFT adapter directory (trained on our model exported to transformers) + its base
            checkpoint -> an adapter run of ours, usable wherever an adapter run is
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import babyllama.checkpoint as ckpt_io
from babyllama.config import ConfigError
from babyllama.rundir import open_run_dir, write_checkpoint_run


@dataclass
class MergeJob:
    ckpt: str  # an adapter run (its newest good checkpoint) or one of its checkpoints
    out: str
    base: str | None = None  # where the base checkpoint is now, if it moved
    overwrite: bool = False
    allow_unverified: bool = False


@dataclass
class ImportJob:
    adapter: str  # a PEFT adapter directory: adapter_config.json + adapter_model.safetensors
    base: str  # the babyllama checkpoint (run or checkpoint directory) the adapter was trained over
    out: str
    overwrite: bool = False
    allow_unverified: bool = False


def merge_lora(job: MergeJob) -> Path:
    """Fold an adapter run into plain weights; returns the written checkpoint directory."""
    from babyllama.adapters import merge_adapters

    out = Path(job.out)
    ckpt = ckpt_io.find_checkpoint(job.ckpt, verify=True, allow_unverified=job.allow_unverified)
    meta = ckpt_io.read_meta(ckpt)
    if not meta.get("base"):
        raise ConfigError(f"{ckpt} holds full weights already (no adapter to merge); use it as it is")
    run = open_run_dir(out, resume=False, overwrite=job.overwrite, inputs=[job.ckpt, job.base])
    try:
        model, _ = ckpt_io.load_model(ckpt, allow_unverified=job.allow_unverified, base=job.base)
        merge_adapters(model)
        base = ckpt_io.find_base(ckpt, meta, job.base, job.allow_unverified)
        return write_checkpoint_run(out, "lora-merge", model, ckpt, int(meta.get("step", 0)),
                          {"adapter": str(ckpt), "base": str(base)})
    finally:
        run.close()


def import_peft(job: ImportJob) -> Path:
    """A PEFT LoRA/DoRA adapter over `base` as an adapter run of ours; returns its checkpoint."""
    from babyllama.adapters import LoRA
    from babyllama.adapters.peft import load_peft_weights, settings_from_peft
    from babyllama.transforms import apply_transforms

    settings = settings_from_peft(Path(job.adapter))
    base = ckpt_io.find_checkpoint(job.base, verify=True, allow_unverified=job.allow_unverified)
    if ckpt_io.read_meta(base).get("base"):
        raise ConfigError(f"{base} is itself an adapter: merge it first (babyllama lora merge) and import onto that")
    weights = load_peft_weights(Path(job.adapter))
    out = Path(job.out)
    run = open_run_dir(out, resume=False, overwrite=job.overwrite, inputs=[job.adapter, job.base])
    try:
        model, _ = ckpt_io.load_model(base, allow_unverified=job.allow_unverified)
        apply_transforms(model, [LoRA(**settings)])
        own = dict(model.named_parameters())
        trained = {name for name, p in own.items() if p.requires_grad}
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
                 if k in own and v.shape != own[k].shape]
        missing = sorted(k for k in trained - set(weights) if ".lora_" in k)
        stray = sorted(set(weights) - set(own))
        if wrong or missing or stray:
            raise ConfigError(f"{job.adapter}: does not fit {base} (shapes {wrong[:2]}, missing {missing[:2]}, "
                              f"unknown {stray[:2]}); was it trained on this model's export?")
        model.load_state_dict(weights, strict=False)
        return write_checkpoint_run(out, "lora-import", model, base, 0, {"adapter": str(job.adapter), "base": str(base)},
                          base=str(base))
    finally:
        run.close()
