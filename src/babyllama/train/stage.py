"""One runner for every training stage: a stage is its data, its model and its objective; the rest is here.

    run_stage(StageRun(stage="pretrain", out=..., train=cfg.train, inputs=[...], resume=..., ...), build)

does, in this order and the same way for every stage:
1. join the process group (under torchrun) and claim `out` (rundir.py: lock, --resume and
   --overwrite rules, inputs outside `out`); only rank 0 checks, locks and writes;
2. `build(env)`: the stage loads what it trains (model, objective, batches, validation batches, the
   data's identity, tokenizer) and returns it as `StageParts`;
3. a resume must match run.json (stage, data, tokenizer); a fresh start writes run.json and saves the
   tokenizer into the run before anything else of it;
4. the Trainer, resumed with --resume (nothing to resume is an error), then run_config.toml and the
   stage's own files, written only after a resume was accepted (a refused one changes nothing);
5. the stage's one-line description, training (`stop_at_step` pauses with a checkpoint), the loss plot.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from babyllama.checkpoint import CheckpointError
from babyllama.config import ConfigError, LoraConfig, RunConfig, TrainConfig
from babyllama.outputs import write_text_atomic
from babyllama.train.loop import BatchSource, Trainer
from babyllama.train.objectives import Objective
from babyllama.rundir import check_resume_matches, open_run_dir, write_run_info


@dataclass
class StageRun:
    """How a stage runs: its name, its run directory and the flags every stage takes."""

    stage: str  # run.json's stage: a resume must be of the same stage (`babyllama STAGE --resume`)
    out: str | Path
    train: TrainConfig  # its device decides how the process group is joined, before anything is built
    inputs: Sequence = ()  # paths the stage reads (FILE::FORMAT and None allowed): never inside `out`
    resume: bool = False
    overwrite: bool = False
    allow_unverified: bool = False  # accept checkpoints without checksums.json (resume)
    progress: bool = True
    stop_at_step: int | None = None  # pause here with a checkpoint; --resume continues the same schedule
    retry_hint: str = ""  # what to do instead when a resume is refused: "or ... in a new run: --init OUT"
    plot_title: str = "babyllama"

    @classmethod
    def from_job(cls, job: Any, **kw) -> "StageRun":
        """From a stage's job dataclass with the usual fields (out, resume, overwrite,
        allow_unverified, progress, stop_at_step); the rest as keywords."""
        return cls(out=job.out, resume=job.resume, overwrite=job.overwrite, allow_unverified=job.allow_unverified,
                   progress=job.progress, stop_at_step=job.stop_at_step, **kw)


@dataclass
class StageParts:
    """What a stage builds once its run directory is claimed."""

    model: torch.nn.Module
    objective: Objective
    batches: BatchSource  # this rank's training batches
    val_batches: list | None  # global validation batches (each rank evaluates its rows), or None
    data: dict  # {"path", "fingerprint"}: the data's identity in run.json, which a resume must match
    tokenizer: Any  # saved into the run; its fingerprint goes to run.json
    config: RunConfig  # model + train: what the Trainer runs, run_config.toml and the checkpoints hold
    run_info: dict = field(default_factory=dict)  # more for run.json (init, source_checkpoint)
    files: dict[str, str] = field(default_factory=dict)  # more files for the run: name -> text
    describe: Callable[[Trainer], str] | None = None  # the line printed before training (with progress)
    summary: dict = field(default_factory=dict)  # added to the summary the stage returns
    base_checkpoint: str | None = None  # an adapter run: the checkpoint its adapter checkpoints complete


def run_stage(run: StageRun, build: Callable[[Any], StageParts]) -> dict:
    """Train one stage (see the module docstring); returns the Trainer's summary (+ the stage's
    `summary`, + "plot" on rank 0). `build` gets the distributed environment (rank, world size)."""
    from babyllama.runtime import pick_device
    from babyllama.train.distributed import distributed_env

    env = distributed_env(pick_device(run.train.device).type)
    out = Path(run.out)
    run_dir = open_run_dir(out, run.resume, run.overwrite, run.inputs, writer=env.is_main)
    try:
        return _run_stage(run, build(env), env, out)
    finally:
        run_dir.close()


def _run_stage(run: StageRun, parts: StageParts, env, out: Path) -> dict:
    show = run.progress and env.is_main
    if env.is_main:
        if run.resume:
            check_resume_matches(out, run.stage, parts.data, parts.tokenizer.fingerprint, run.retry_hint)
        else:  # what a resume must match, written before anything else of the run
            write_run_info(out, run.stage, parts.data, parts.tokenizer.fingerprint, **parts.run_info)
            parts.tokenizer.save(out / "tokenizer")
    trainer = Trainer(parts.model, parts.config.model, parts.config.train, parts.batches, out,
                      val_batches=parts.val_batches or None, run_config=parts.config.to_dict(), progress=show,
                      objective=parts.objective, base_checkpoint=parts.base_checkpoint)
    if run.resume and not trainer.resume(allow_unverified=run.allow_unverified):
        raise CheckpointError(f"{out}: nothing to resume (no checkpoint yet); start without --resume")
    if env.is_main:  # after a resume was accepted: a refused one changes nothing
        write_text_atomic(out / "run_config.toml", parts.config.to_toml())
        write_text_atomic(out / "environment.json", json.dumps(run_environment(trainer), indent=2))
        for name, text in parts.files.items():
            write_text_atomic(out / name, text)
    if show and parts.describe is not None:
        print(parts.describe(trainer))
    summary = trainer.fit(run.stop_at_step)
    summary.update(parts.summary)
    if not env.is_main:
        return summary
    try:
        from babyllama.train.plot import plot_loss

        summary["plot"] = str(plot_loss(out / "metrics.jsonl", out / "loss.png", title=run.plot_title))
    except Exception as e:  # a missing plot must not fail a finished run
        print(f"could not draw the loss curve: {e}")
    return summary


def run_environment(trainer: Trainer) -> dict:
    """Where this session trains, for the run report: versions, machine, and what `auto` became.
    Rewritten by every session (a resumed run may have moved), so it describes the latest one."""
    import platform
    import time

    import babyllama
    from babyllama.machine import cpu_model, gpus

    device = trainer.device
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "babyllama": babyllama.__version__,
            "python": platform.python_version(), "torch": torch.__version__, "os": platform.platform(),
            "cpu": cpu_model(), "cpu cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else gpus(),
            "device": str(device), "dtype": str(trainer.dtype).removeprefix("torch."),
            "world size": trainer.env.world_size}


def attach_lora(model, lora: LoraConfig | None, source, seed: int, chat_ids: tuple[int, ...] = ()) -> str | None:
    """Apply LoRA/DoRA (when asked) to the model loaded from `source`; returns the base checkpoint
    its adapter checkpoints complete (None without LoRA). `chat_ids`: the chat markers of a stage
    that trains on conversations (their embedding rows train too, unless lora.tokens says otherwise)."""
    from babyllama.transforms import applied, apply_transforms

    if lora is None:
        if any(r["name"] == "quantize" for r in applied(model)):
            raise ConfigError(f"{source} is quantized: its integer weights do not train; fine-tune adapters over "
                              f"them with --lora (QLoRA), or fine-tune the float model")
        return None
    from babyllama.adapters import LoRA
    from babyllama.checkpoint import WEIGHTS

    if not (source / WEIGHTS).is_file():
        raise CheckpointError(f"{source} is itself an adapter; fold it into plain weights first "
                              f"(babyllama lora merge --ckpt ... --out DIR) and train the new adapter on DIR")
    if chat_ids and lora.tokens == "chat" and not hasattr(model.tok_embeddings, "weight"):
        print("note: the embeddings are quantized, so the chat markers' rows do not train (QLoRA works best on a "
              "model fine-tuned for chat before it was quantized)")
        chat_ids = ()
    torch.manual_seed(seed)  # the A matrices' initialisation
    apply_transforms(model, [LoRA.from_config(lora, chat_ids)])
    return str(source)


def attach_bitnet(model, train: TrainConfig) -> None:
    """BitNet b1.58 quantization-aware training when asked (a run that already records it keeps it)."""
    from babyllama.quant import BitNet
    from babyllama.transforms import applied, apply_transforms

    if train.bitnet and not any(r["name"] == BitNet.name for r in applied(model)):
        if any(r["name"] == "quantize" for r in applied(model)):
            raise ConfigError("--bitnet trains ternary weights from float ones; this model is quantized already")
        apply_transforms(model, [BitNet()])


def describe_lora(model) -> str:
    from babyllama.adapters import count_parameters
    from babyllama.transforms import applied

    record = next((r for r in applied(model) if r["name"] == "lora"), None)
    if record is None:
        return ""
    trainable, total = count_parameters(model)
    kind = "DoRA" if record["dora"] else "LoRA"
    extras = list(record["train"]) + ([f"embedding rows {record['token_rows']}"] if record.get("token_rows") else [])
    return (f"\n{kind} rank {record['rank']}, alpha {record['alpha']:g} on {','.join(record['targets'])}"
            f"{' + ' + ', '.join(extras) if extras else ''}: {trainable:,} of {total:,} "
            f"parameters train ({100 * trainable / total:.2f}%)")
