#!/usr/bin/env python
"""A minimal reward server for `--reward_url` (standard library only): copy it and replace `score()`.

    .venv/bin/python scripts/reward_server_example.py --port 8000
    .venv/bin/python scripts/train.py ... --reward remote:1.0 --reward_url http://127.0.0.1:8000/

It speaks the protocol of grpo_ds/remote_reward.py (docs/REWARD_MODELS.md): POST
{"prompts": [...], "completions": [...], "completion_ids": [...], "<column>": [...]} and answer
{"rewards": [float | null, ...]}, one per completion. This one pays 1.0 when the last number in a completion equals
its row's `answer` column, 0.0 when it does not, and null (no reward from this term) for a row without an answer.
With GRPO_DS_REWARD_API_KEY set, requests must carry "Authorization: Bearer <that key>" (else 401).
"""

import argparse
import json
import os
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def text_of(completion) -> str:
    """A completion is a string, or [{"role": "assistant", "content": text}] for chat prompts."""
    return completion if isinstance(completion, str) else "".join(m.get("content") or "" for m in completion)


def score(prompt, completion, row: dict):
    """1.0, 0.0, or None (no answer to compare with). Never raises on model output."""
    answer = row.get("answer")
    if answer is None:
        return None
    numbers = NUMBER.findall(text_of(completion).replace(",", ""))
    try:
        return 1.0 if numbers and float(numbers[-1]) == float(str(answer).replace(",", "")) else 0.0
    except ValueError:
        return 0.0


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        key = os.environ.get("GRPO_DS_REWARD_API_KEY")
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            return self.answer(401, {"error": "missing or wrong API key"})
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            prompts, completions = body["prompts"], body["completions"]
        except (ValueError, KeyError, TypeError):
            return self.answer(400, {"error": 'expected {"prompts": [...], "completions": [...]}'})
        columns = {k: v for k, v in body.items() if k not in ("prompts", "completions", "completion_ids")}
        rows = [{k: v[i] for k, v in columns.items()} for i in range(len(completions))]
        self.answer(200, {"rewards": [score(p, c, r) for p, c, r in zip(prompts, completions, rows)]})

    def answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet: one line per request would flood a training run's terminal
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"reward server on http://{args.host}:{server.server_port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
