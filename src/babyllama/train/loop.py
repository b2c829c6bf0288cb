"""The one training loop, shared by every stage (pretraining, SFT; LoRA, DPO, ... wrap it too).

A stage hands it a model, a `TrainConfig`, an objective (train/objectives.py: what a batch's loss is
and what it is normalised by; next-token prediction unless told), a batch source (anything with
`next_batch()`, `state_dict()` and `load_state_dict()`, yielding the tuples of tensors the objective
takes, e.g. (tokens, targets) with -100 where no loss is wanted) and optional validation batches.
The loop owns precision, the optimizer and schedule, gradient accumulation, clipping, evaluation,
metrics, checkpoints, exact resume, the NaN guard and a clean stop on Ctrl-C.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from babyllama.config import ConfigError, ModelConfig, TrainConfig
import babyllama.checkpoint as ckpt_io
from babyllama.transforms import applied, trains_own_params
from babyllama.train.distributed import distributed_env, full_state, gradient_sync, load_full_state, rank_device, wrap_model
from babyllama.train.objectives import NextToken, Objective
from babyllama.train.optim import build_optimizer, lr_at, param_groups
from babyllama.rundir import trim_metrics
from babyllama.runtime import autocast_context, peak_flops, pick_device, pick_dtype, tune_cpu_allocator


# what a training record holds besides the objective's metrics
RESERVED_METRICS = frozenset({"step", "loss", "lr", "grad_norm", "tokens", "tok_s", "time", "mfu"})


def _rounded(value: float) -> float:
    return float(f"{value:.6g}")  # 6 significant digits: metrics may be small (a KL of 1e-4)


def _metric_name(key: str) -> str:
    if key in RESERVED_METRICS:
        raise ValueError(f"the objective's metric {key!r} would overwrite the loop's own; rename it")
    return key


class BatchSource(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class TrainingDiverged(RuntimeError):
    """Loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


class MetricsLog:
    """JSON lines on disk (always) and TensorBoard scalars (when asked for and installed)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.file = open(path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                print("tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


@contextmanager
def stop_on_sigint(flag: dict):
    """First Ctrl-C asks the loop to checkpoint and stop after the current step; a second one aborts."""
    def handler(signum, frame):
        if flag.get("stop"):
            raise KeyboardInterrupt
        flag["stop"] = True
        print("\nCtrl-C: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort)")

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, cfg: TrainConfig,
                 batches: BatchSource, out_dir: str | Path, val_batches: list | None = None,
                 run_config: dict | None = None, progress: bool = True,
                 on_eval: Callable[[int, float], None] | None = None, objective: Objective | None = None,
                 base_checkpoint: str | Path | None = None):
        self.cfg, self.model_config = cfg, model_config
        self.objective = objective if objective is not None else NextToken()
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        device = pick_device(cfg.device)
        self.env = distributed_env(device.type)
        self.device = rank_device(device, self.env)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.model = model.to(self.device)
        if trains_own_params(model) and base_checkpoint is None:
            raise ValueError("an adapter's checkpoints hold only its own parameters: give the Trainer the "
                             "base_checkpoint they complete")
        self.base_checkpoint = base_checkpoint
        self.ds = None  # a DeepSpeedRun when --deepspeed is given
        if cfg.deepspeed:
            from babyllama.train.deepspeed_backend import DeepSpeedRun

            self.ds = DeepSpeedRun(self.model, cfg, cfg.deepspeed, self.env.world_size, self.dtype,
                                   param_groups(self.model, cfg))
            self.train_model, self.optimizer = self.ds.engine, self.ds.optimizer
        else:
            wrapped = wrap_model(self.model, cfg.parallel, self.env, self.dtype)
            self.train_model = torch.compile(wrapped) if cfg.compile else wrapped
            self.optimizer = build_optimizer(self.model, cfg, self.device.type)
        # fp16 needs loss scaling; bf16 and float32 do not
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.batches, self.val_batches = batches, val_batches
        self.run_config, self.progress, self.on_eval = run_config or {}, progress, on_eval
        self.step = 0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None
        self.last_metrics: dict[str, float] = {}  # the objective's metrics of the last step, per count
        # the LM head runs only where a target is counted (model/loss.py), so FLOPs are counted
        # as body x all tokens + head x the step's count: honest MFU for SFT's short answers too.
        # Exact for next-token objectives (count = counted targets); others count something else
        self.head_flops = 6 * model_config.vocab_size * model_config.dim
        self.body_flops = model_config.flops_per_token() - self.head_flops
        self.flops_done = 0.0
        # seconds of training so far, over every process life of the run (kept in checkpoints), agreed
        # by all ranks: with train.max_minutes, the time budget and the schedule's progress read it
        self.train_seconds = 0.0

    def time_used(self) -> float:
        """The share of train.max_minutes spent (0 without a time budget)."""
        return self.train_seconds / (self.cfg.max_minutes * 60) if self.cfg.max_minutes else 0.0

    # --- state --------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        # the data position is global (every rank walks the same order); RNG is per rank
        return {"step": self.step, "train_seconds": self.train_seconds, "tokens_seen": self.tokens_seen, "data": self.batches.state_dict(),
                "rng_ranks": self.env.gather_objects(rng), "scaler": self.scaler.state_dict(),
                "world_size": self.env.world_size}

    def save(self) -> Path:
        """A collective under several processes: all gather, rank 0 writes, all wait for it."""
        path = ckpt_io.checkpoint_path(self.out, self.step)
        extra = {}
        if self.ds:  # DeepSpeed keeps its (partitioned) optimizer state in its own format
            shards = path.with_name(path.name + ".deepspeed")
            self.ds.save_shards(shards)
            weights, optim, extra = self.ds.full_weights(), None, {"deepspeed": shards}
        else:
            weights, optim = full_state(self.model, self.optimizer)
        base = None
        if trains_own_params(self.model):  # an adapter: its parameters, and where the rest comes from
            weights, base = ckpt_io.trained_state(self.model, weights), str(self.base_checkpoint)
        state = self.state()
        self.env.barrier()
        if self.env.is_main:
            ckpt_io.save_checkpoint(self.out, self.step, weights, self.model_config, optim, state,
                                    self.run_config, keep=self.cfg.keep_ckpts, extra_dirs=extra,
                                    transforms=applied(self.model), base=base)
        self.env.barrier()
        self.last_checkpoint = path
        return path

    def resume(self, path: str | Path | None = None, allow_unverified: bool = False) -> bool:
        """Continue from the newest good checkpoint under `path` (default: the output directory).
        False when the output directory has no checkpoint at all; an error when it has some but
        none passes its checksums (starting over would overwrite them)."""
        if path is None and not ckpt_io.list_checkpoints(self.out):
            return False
        warn = (lambda message: print(message, file=sys.stderr)) if self.env.is_main else None
        ckpt = ckpt_io.find_checkpoint(path or self.out, verify=True, warn=warn, allow_unverified=allow_unverified)
        saved = ckpt_io.read_model_config(ckpt)
        if saved != self.model_config:
            raise ckpt_io.CheckpointError(f"{ckpt}: the run was trained with another model shape; "
                                          f"{ckpt_io.describe_shape_difference(ckpt, self.model_config)}")
        recorded = ckpt_io.read_meta(ckpt).get("transforms", [])
        if recorded != applied(self.model):
            raise ckpt_io.CheckpointError(f"{ckpt}: the run was trained with transformations {recorded or 'none'}, "
                                          f"this model has {applied(self.model) or 'none'}; resume with the run's "
                                          f"own settings (e.g. the same --lora flags)")
        opt_state, state = ckpt_io.load_training_state(ckpt)
        if state is not None and int(state["step"]) > self.cfg.max_steps:  # before anything is loaded
            raise ConfigError(f"{ckpt} is at step {int(state['step'])}, past train.max_steps={self.cfg.max_steps}; "
                              f"pass a larger --max-steps to train on")
        if self.ds:
            if state is None or not (ckpt / "deepspeed").is_dir():
                raise ckpt_io.CheckpointError(f"{ckpt}: not a DeepSpeed checkpoint; resume it without --deepspeed, "
                                              f"or start a new run from its weights with --init")
            self.ds.load_shards(ckpt / "deepspeed")
        elif opt_state is None or state is None:
            raise ckpt_io.CheckpointError(f"{ckpt}: has weights but no optimizer/trainer state; it cannot be resumed "
                                          f"(start a new run from it with --init instead)")
        else:
            load_full_state(self.model, self.optimizer, ckpt_io.load_state_file(ckpt), opt_state,
                            partial=trains_own_params(self.model))
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.batches.load_state_dict(state["data"])
        ranks = state.get("rng_ranks") or [{"cpu": state["rng_cpu"]}]
        if len(ranks) == self.env.world_size:  # same world size: each rank continues its own stream
            rng = ranks[self.env.rank]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:  # another world size: fresh per-rank streams (only dropout draws from them)
            torch.manual_seed(self.cfg.seed + 1_000 * self.step + self.env.rank)
        if "scaler" in state and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.last_checkpoint = ckpt
        if self.env.is_main and path is None:  # the steps after the checkpoint are about to be logged again
            trim_metrics(self.out, self.step)
        return True

    # --- one optimizer step ---------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float]:
        """Accumulate `grad_accum` micro-batches, clip, step. Returns (loss per count, grad norm);
        the objective's metrics of the step are left in `last_metrics`."""
        cfg, objective = self.cfg, self.objective
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg, self.time_used())
        micro = [self.batches.next_batch() for _ in range(cfg.grad_accum)]
        # normalise by the objective's count (counted targets for next-token objectives) of the
        # whole step on all ranks, so accumulation and data parallelism equal one large batch even
        # when SFT masks differ; DDP/FSDP average gradients over ranks, hence the factor world_size
        counts = torch.tensor([float(sum(objective.count(batch) for batch in micro))])
        n_counted = float(self.env.all_sum(counts.to(self.device)).item())
        if n_counted == 0:
            raise ValueError(f"step {self.step}: the {objective.name} objective counts nothing in the batch "
                             f"(no target tokens: everything is masked)")
        scale = self.env.world_size / n_counted
        step_tokens = sum(objective.tokens(batch) for batch in micro) * self.env.world_size
        self.flops_done += step_tokens * self.body_flops + n_counted * self.head_flops
        if self.ds:
            return self._deepspeed_step(micro, scale, n_counted, step_tokens)
        total = torch.zeros((), device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            batch = self._on_device(batch)
            with gradient_sync(self.train_model, sync=i == len(micro) - 1):
                with autocast_context(self.device, self.dtype):
                    loss, batch_metrics = objective.loss(self.train_model, batch)
                    loss = loss * scale
                self.scaler.scale(loss).backward()
            total += loss.detach()
            self._add_metrics(metrics, batch_metrics)
        loss_value = self._reduce_step(total, metrics, n_counted)
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        norm_value = float(norm)
        if not math.isfinite(loss_value) or (not math.isfinite(norm_value) and self.dtype != torch.float16):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged("loss" if not math.isfinite(loss_value) else "gradient norm",
                           loss_value if not math.isfinite(loss_value) else norm_value)
        self.scaler.step(self.optimizer)  # skips the step on fp16 overflow, and lowers the scale
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += step_tokens
        return loss_value, norm_value

    def _diverged(self, what: str, value: float, updated: bool = False):
        where = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
        raise TrainingDiverged(f"{what} became {value} at step {self.step}; stopped "
                               f"{'after' if updated else 'without'} updating the weights ({where}). Lower train.lr "
                               f"or raise train.warmup_steps, then resume.")

    def _deepspeed_step(self, micro, scale: float, n_counted: float, step_tokens: int) -> tuple[float, float]:
        """The same step through DeepSpeed: it reduces, clips and steps at the last micro-batch."""
        total = torch.zeros((), device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        for batch in micro:
            loss, batch_metrics = self.objective.loss(self.train_model, self._on_device(batch))
            loss = loss * scale
            if not math.isfinite(float(loss)):  # checked before DeepSpeed can apply it
                self._diverged("loss", float(loss))
            self.ds.backward_and_step(loss)
            total += loss.detach()
            self._add_metrics(metrics, batch_metrics)
        loss_value = self._reduce_step(total, metrics, n_counted)
        norm_value = self.ds.grad_norm()
        if not math.isfinite(norm_value) and self.dtype != torch.float16 and not math.isnan(norm_value):
            self._diverged("gradient norm", norm_value, updated=True)
        self.step += 1
        self.tokens_seen += step_tokens
        return loss_value, norm_value

    def _on_device(self, batch) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    @staticmethod
    def _add_metrics(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
        """Sum a micro-batch's metrics into the step's, on the device (no sync per micro-batch)."""
        for key, value in metrics.items():
            value = value.detach().float()
            if key in sums:
                sums[key] = sums[key] + value
            else:
                sums[_metric_name(key)] = value

    def _reduce_step(self, total: torch.Tensor, metrics: dict[str, torch.Tensor], n_counted: float) -> float:
        """One all-reduce for the step's loss and metrics (every rank has the same metric names):
        the loss per count, and `last_metrics`, each metric summed over ranks divided by the count."""
        keys = sorted(metrics)
        sums = self.env.all_sum(torch.stack([total, *(metrics[k].reshape(()).to(total.device) for k in keys)])).tolist()
        self.last_metrics = {k: v / n_counted for k, v in zip(keys, sums[1:])}
        return sums[0] / self.env.world_size

    @torch.no_grad()
    def evaluate(self) -> float:
        """The validation loss per count (nan without validation batches)."""
        return self.evaluate_metrics()["loss"]

    @torch.no_grad()
    def evaluate_metrics(self) -> dict[str, float]:
        """{"loss": ..., **the objective's metrics} over the validation batches, each per count."""
        if not self.val_batches:
            return {"loss": float("nan")}
        self.model.eval()
        loss_sum, count, metrics = 0.0, 0.0, {}
        for batch in self.val_batches:
            # the same validation set at any world size: each rank takes its rows of every batch
            batch = tuple(t[self.env.rank::self.env.world_size] for t in batch)
            count += self.objective.count(batch)
            with autocast_context(self.device, self.dtype):
                loss, batch_metrics = self.objective.loss(self.model, self._on_device(batch))
            loss_sum += float(loss)
            for key, value in batch_metrics.items():
                metrics[_metric_name(key)] = metrics.get(key, 0.0) + float(value)
        self.model.train()
        keys = sorted(metrics)
        sums = torch.tensor([loss_sum, count, *(metrics[k] for k in keys)], dtype=torch.float64)
        total, count, *values = self.env.all_sum(sums.to(self.device)).tolist()
        count = max(count, 1)
        return {"loss": total / count, **{k: v / count for k, v in zip(keys, values)}}

    # --- the loop -------------------------------------------------------------------------------------

    def fit(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train to cfg.max_steps (or pause at `stop_at_step`, with a checkpoint, without changing
        the schedule: a later resume continues as if never paused)."""
        from tqdm import tqdm

        cfg = self.cfg
        main = self.env.is_main  # one process writes logs and shows progress
        log = MetricsLog(self.out / "metrics.jsonl", self.out / "tensorboard" if cfg.tensorboard else None) \
            if main else None
        peak = peak_flops(self.device, self.dtype)
        flag: dict[str, bool] = {}
        started = time.perf_counter()
        history: dict[str, list] = {"val": []}
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (self.progress and main), dynamic_ncols=True,
                   desc="training", unit="step")
        window_t, window_tokens, window_flops = time.perf_counter(), 0, self.flops_done
        stop_reason = "max_steps"
        clock, seconds_before = time.perf_counter(), self.train_seconds
        try:
            with stop_on_sigint(flag):
                if self.step == 0 and self.val_batches:
                    self._log_eval(log, history, bar)
                while self.step < cfg.max_steps:
                    before = self.tokens_seen
                    loss, norm = self.train_step()
                    window_tokens += self.tokens_seen - before
                    bar.update(1)
                    if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                        elapsed = time.perf_counter() - window_t
                        tok_s = window_tokens / max(elapsed, 1e-9)
                        mfu = (self.flops_done - window_flops) / max(elapsed, 1e-9) / peak if peak else None
                        record = {"step": self.step, "loss": round(loss, 5),
                                  **{k: _rounded(v) for k, v in self.last_metrics.items()},
                                  "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": round(norm, 4),
                                  "tokens": self.tokens_seen, "tok_s": round(tok_s, 1),
                                  "time": round(time.perf_counter() - started, 2)}
                        if mfu is not None:
                            record["mfu"] = round(mfu, 4)
                        if log:
                            log.write(record)
                        bar.set_postfix_str(f"loss {loss:.3f} lr {record['lr']:.2e} {tok_s:,.0f} tok/s"
                                            + (f" MFU {mfu:.0%}" if mfu is not None else ""))
                        window_t, window_tokens, window_flops = time.perf_counter(), 0, self.flops_done
                    if self.val_batches and (self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps):
                        self._log_eval(log, history, bar)
                    if self.step % cfg.ckpt_interval == 0 and self.step < cfg.max_steps:
                        self.save()
                    # one collective a step: every rank must stop at the same step (or the others wait
                    # forever) and see the same time used (or their learning rates would differ)
                    agreed = self.env.all_sum(torch.tensor(
                        [1.0 if flag.get("stop") else 0.0, seconds_before + time.perf_counter() - clock],
                        device=self.device)).tolist()  # float32: MPS has no float64
                    self.train_seconds = agreed[1] / self.env.world_size
                    out_of_time = bool(cfg.max_minutes) and self.time_used() >= 1.0
                    if agreed[0] > 0 or out_of_time:
                        stop_reason = "interrupted" if agreed[0] > 0 else "max_minutes"
                        break
                    if stop_at_step is not None and self.step >= stop_at_step:
                        stop_reason = "paused"
                        break
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:08d}"):
                self.save()
        finally:
            bar.close()
            if log:
                log.close()
        return {"step": self.step, "tokens": self.tokens_seen, "stopped": stop_reason,
                "checkpoint": str(self.last_checkpoint), "val": history["val"],
                "seconds": time.perf_counter() - started}

    def _log_eval(self, log: MetricsLog, history: dict, bar) -> None:
        results = self.evaluate_metrics()
        val = results.pop("loss")
        history["val"].append((self.step, val))
        if log:
            log.write({"step": self.step, "val_loss": round(val, 5),
                       **{f"val_{k}": _rounded(v) for k, v in results.items()}, "tokens": self.tokens_seen})
        if self.progress and self.env.is_main:
            bar.write(f"step {self.step:>6}  val loss {val:.4f}")
        if self.on_eval:
            self.on_eval(self.step, val)
