#!/usr/bin/env python
"""A bounded load test of a running grpo_ds server (scripts/serve.sh): CLIENTS threads each send REQUESTS chat
completions at once, one after another, and the script reports what came back and how long it took.

    bash scripts/serve.sh start embedded --max_batch_size 8 --max_queue 8
    .venv/bin/python scripts/load_test_serve.py --url http://127.0.0.1:8000 --clients 16 --requests 2 --max_tokens 16

Every request must end in a 200 (answered) or a 429/503 (refused: the queue was full); anything else (another
status, a connection error, no answer within --timeout s) counts as lost. It prints one JSON line: the counts by
status, lost, and latency percentiles (nearest rank) of the answered requests and of all. The work is bounded:
CLIENTS x REQUESTS requests, each with a timeout, nothing retried. Exit codes: 0 none lost, 1 some lost, 2 bad input.
"""

import argparse
import json
import math
import os
import sys
import threading
import time
from collections import Counter

import httpx

REFUSED = (429, 503)


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank percentile: the smallest value with at least p% of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def load_test(url: str, clients: int, requests: int, max_tokens: int, *, api_key: str | None = None,
              timeout: float = 120.0, stream: bool = False, model: str | None = None) -> dict:
    """Runs the load and returns {"statuses": {status: count}, "lost": n, "errors": [first few], latencies}."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    outcomes: list[tuple[object, float]] = []  # (status or error text, seconds)
    lock = threading.Lock()
    start_together = threading.Barrier(clients)

    def client(index: int) -> None:
        with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as http:
            start_together.wait(timeout)
            for r in range(requests):
                body = {"messages": [{"role": "user", "content": f"What is {index} + {3 * r}?"}],
                        "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                        **({"model": model} if model else {})}
                began = time.monotonic()
                try:
                    if stream:
                        with http.stream("POST", "/v1/chat/completions", json=body) as response:
                            lines = [line for line in response.iter_lines() if line]
                        ok = response.status_code != 200 or lines[-1:] == ["data: [DONE]"]
                        outcome = response.status_code if ok else "stream ended without [DONE]"
                    else:
                        response = http.post("/v1/chat/completions", json=body)
                        ok = response.status_code != 200 or bool(response.json()["choices"])
                        outcome = response.status_code if ok else "200 without choices"
                except Exception as err:  # a timeout, a reset connection: a lost request
                    outcome = f"{type(err).__name__}: {err}"
                with lock:
                    outcomes.append((outcome, time.monotonic() - began))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:  # each request has its timeout; this bounds the whole run even if one hangs in connect
        thread.join(timeout=max(1.0, began + requests * (timeout + 5) + 10 - time.monotonic()))
    wall = time.monotonic() - began
    statuses = Counter(str(o) for o, _ in outcomes if isinstance(o, int))
    answered = [s for o, s in outcomes if o == 200]
    every = [s for _, s in outcomes]
    lost = clients * requests - sum(n for s, n in statuses.items() if int(s) == 200 or int(s) in REFUSED)
    return {"requests": clients * requests, "statuses": dict(sorted(statuses.items())), "lost": lost,
            "errors": [str(o) for o, _ in outcomes if o != 200 and o not in REFUSED][:5],
            "p50_s": percentile(answered, 50), "p99_s": percentile(answered, 99),
            "p50_all_s": percentile(every, 50), "p99_all_s": percentile(every, 99), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="load_test_serve.py", description="Bounded load test of a grpo_ds server.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="The server, without /v1.")
    p.add_argument("--clients", type=int, default=16, help="Concurrent clients (threads).")
    p.add_argument("--requests", type=int, default=2, help="Requests per client, one after another.")
    p.add_argument("--max_tokens", type=int, default=16, help="Completion budget of each request (greedy).")
    p.add_argument("--stream", action="store_true", help="Stream the answers (server-sent events).")
    p.add_argument("--timeout", type=float, default=120.0, help="Seconds a request may take before it is lost.")
    p.add_argument("--model", default=None, help="The model id to send (default: none, the server's).")
    p.add_argument("--api_key", default=None, help="The server's key (default: $GRPO_DS_API_KEY).")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1 or args.timeout <= 0:
        print("error: --clients, --requests, --max_tokens, --timeout: expected positive", file=sys.stderr)
        return 2
    api_key = args.api_key if args.api_key is not None else os.environ.get("GRPO_DS_API_KEY") or None
    summary = load_test(args.url, args.clients, args.requests, args.max_tokens, api_key=api_key,
                        timeout=args.timeout, stream=args.stream, model=args.model)
    print(json.dumps(summary))
    return 0 if summary["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
