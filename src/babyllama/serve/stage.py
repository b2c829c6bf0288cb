"""Load a run and serve it: `serve(ServeJob)` behind `babyllama serve`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServeJob:
    ckpt: str  # a run (its newest good checkpoint) or a checkpoint directory: plain, LoRA, quantized, imported
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required as 'Authorization: Bearer KEY' on /v1/* (and ?key= for the page)
    max_batch: int = 8  # rows decoded together
    max_queue: int = 64  # requests waiting beyond those; more get 503
    model_name: str | None = None  # the id clients send as "model" (default: the run directory's name)
    device: str = "auto"
    dtype: str = "auto"
    max_body: int = 1 << 20  # bytes a request body may have
    allow_unverified: bool = False


def build(job: ServeJob):
    """(FastAPI app, batcher) for `job`, ready for uvicorn (tests start it in a thread)."""
    from babyllama.config import ConfigError
    from babyllama.infer.batching import Batcher
    from babyllama.infer.engine import Engine
    from babyllama.serve.app import Served, create_app
    from babyllama.tokenizer import TokenizerError

    if not 1 <= job.max_batch <= 256:
        raise ConfigError(f"--max-batch must be in [1, 256], got {job.max_batch}")
    if job.max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {job.max_queue}")
    engine = Engine.load(job.ckpt, job.device, job.dtype, compile_step=False, allow_unverified=job.allow_unverified)
    try:
        template = engine.template
    except (ConfigError, TokenizerError):  # no chat markers: completions only
        template = None
    name = job.model_name or Path(job.ckpt).resolve().name
    batcher = Batcher(engine.model, job.max_batch, job.max_queue)
    served = Served(name, engine.tokenizer, batcher, template, job.api_key, job.max_body)
    return create_app(served), batcher


def serve(job: ServeJob, log_level: str = "warning") -> None:
    import uvicorn

    app, batcher = build(job)
    if job.host not in ("127.0.0.1", "localhost", "::1") and not job.api_key:
        print(f"warning: serving on {job.host} without --api-key: anyone who reaches this port can use the model",
              flush=True)
    where = f"http://{job.host}:{job.port}"
    print(f"serving {app.state.served.name} at {where}: chat page {where}/"
          f"{'?key=KEY' if job.api_key else ''}, OpenAI API {where}/v1 (Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=job.host, port=job.port, log_level=log_level)
    finally:
        batcher.close()
