#!/usr/bin/env python
"""An OpenAI-compatible HTTP server for a model or a training run (grpo_ds/serve.py does the work); usually started
in the background by scripts/serve.sh.

    .venv/bin/python scripts/serve.py runs/quickstart --port 8000

A training run is served the way it was trained: chats without a system message get the run's system prompt, and
answers open with its response prefix (both from its config.json; the flags override them), and a run trained with
tools runs them for requests without a `tools` field (docs/SERVING.md#tools). Exit codes: 0 stopped, 2 bad input.
"""

import argparse
import logging
import os
import sys

import torch

from grpo_ds.inference import load, prompt_format
from grpo_ds.serve import (API_KEY_ENV, MAX_BODY_BYTES, MAX_TOKENS_LIMIT, Server, check_limits, create_app,
                           exposure_warning)

log = logging.getLogger("grpo_ds.serve")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description="OpenAI-compatible server for a model.")
    p.add_argument("model", help="Hub id, Hugging Face folder, a training run's output folder, DeepSpeed checkpoint, "
                                 ".gguf file or 'embedded'.")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 exposes it).")
    p.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    p.add_argument("--served_model_name", default=None, help="The model id clients send (default: MODEL as given).")
    p.add_argument("--max_batch_size", type=int, default=16, help="Most completions per generate call.")
    p.add_argument("--batch_wait_ms", type=float, default=10.0,
                   help="How long the first request of a batch waits for others to join it.")
    p.add_argument("--max_tokens", type=int, default=512, help="Completion budget when a request gives none.")
    p.add_argument("--system_prompt", default=None, help="Added to chats that have no system message: 'default' "
                   "(the training default), 'none' or the text (default: the training run's, else 'default').")
    p.add_argument("--response_prefix", default=None, help="Text every answer starts with, written by the server "
                   "and returned as part of the answer (default: the training run's, else none).")
    p.add_argument("--max_queue", type=int, default=256, help="Requests that may wait for the model; one more "
                   "gets a 503 at once (at most --max_batch_size completions generate at a time).")
    p.add_argument("--api_key", default=None, help=f"Key every request but /health must send ('Authorization: "
                   f"Bearer KEY'; else 401). Default: ${API_KEY_ENV}, which keeps it out of process listings.")
    p.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES, help="Largest request body (else 413).")
    p.add_argument("--max_tokens_limit", type=int, default=MAX_TOKENS_LIMIT,
                   help="Most completion tokens a request may ask for (else 400).")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")
    p.add_argument("--seed", type=int, default=0, help="Seed for sampling.")
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[serve] %(asctime)s %(message)s")
    if args.api_key is not None:
        log.warning("--api_key on the command line is visible to other users in process listings; $%s is not",
                    API_KEY_ENV)
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    try:
        if args.max_batch_size < 1 or args.max_tokens < 1 or args.max_queue < 1 or args.batch_wait_ms < 0:
            raise ValueError("--max_batch_size, --max_tokens, --max_queue: expected positive; --batch_wait_ms >= 0")
        check_limits(api_key, args.max_body_bytes, args.max_tokens_limit, args.max_tokens)
        fmt = prompt_format(args.model, args.system_prompt, args.response_prefix)
        if fmt.toolbox is not None:
            log.info("%s was trained with tools (%s): requests without a `tools` field run them here, with the loop "
                     "of training (docs/SERVING.md#tools)", args.model, ", ".join(fmt.toolbox.names))
        torch.manual_seed(args.seed)
        model, tokenizer = load(args.model, args.dtype)
        server = Server(model, tokenizer, args.served_model_name or args.model, max_batch_size=args.max_batch_size,
                        batch_wait_ms=args.batch_wait_ms, default_max_tokens=args.max_tokens, prompt_format=fmt,
                        max_queue=args.max_queue, api_key=api_key, max_body_bytes=args.max_body_bytes,
                        max_tokens_limit=args.max_tokens_limit)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("serving %s (context %d tokens) on http://%s:%d; prompt from %s; API key %s", server.name,
             server.context, args.host, args.port, fmt.source, "required" if api_key else "none")
    warning = exposure_warning(args.host, args.port, api_key)
    if warning:
        log.warning("WARNING: %s", warning)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
