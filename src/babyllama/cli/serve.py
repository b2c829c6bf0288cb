"""`babyllama serve`: a run behind an OpenAI-compatible API and a chat page (serve/)."""

from __future__ import annotations

import argparse

from babyllama.cli.flags import Default


def _job():
    from babyllama.serve.stage import ServeJob

    return ServeJob


def cmd_serve(args) -> None:
    import os

    from babyllama.serve.stage import ServeJob, serve

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    serve(ServeJob(ckpt=args.ckpt, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("BABYLLAMA_API_KEY"),
                   max_batch=args.max_batch, max_queue=args.max_queue, model_name=args.model_name, device=args.device,
                   dtype=args.dtype, allow_unverified=args.allow_unverified), log_level=args.log_level)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a run: OpenAI-compatible API (/v1/chat/completions, /v1/completions) and a chat page",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Requests from concurrent clients are decoded together (continuous batching: a request\n"
                    "joins at the next step, a finished one leaves). Any OpenAI client works:\n\n"
                    "  from openai import OpenAI\n"
                    "  client = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='KEY or anything')\n"
                    "  client.chat.completions.create(model=NAME, messages=[{'role': 'user', 'content': '你好'}])\n\n"
                    "The chat page is at http://HOST:PORT/ (with ?key=KEY when --api-key is set).")
    p.add_argument("--ckpt", required=True, help="the run (plain, LoRA, quantized or imported) or a checkpoint directory")
    p.add_argument("--host", default=Default(_job, "host"), help="address to listen on (default %(default)s: this "
                                                                 "machine only; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=Default(_job, "port"), help="default %(default)s")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $BABYLLAMA_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=Default(_job, "max_batch"),
                   help="requests decoded together (default %(default)s); more wait in the queue")
    p.add_argument("--max-queue", type=int, default=Default(_job, "max_queue"),
                   help="requests that may wait (default %(default)s); beyond, clients get 503 and retry")
    p.add_argument("--model-name", help="the model id clients send (default: the run directory's name)")
    p.add_argument("--device", default=Default(_job, "device"), help="auto (default), cpu, cuda, mps")
    p.add_argument("--dtype", default=Default(_job, "dtype"), help="auto (default), float32, bfloat16, float16")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default %(default)s; info logs every request)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="accept a checkpoint that has no checksums.json (not written by babyllama)")
    p.set_defaults(func=cmd_serve)
