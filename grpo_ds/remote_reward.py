"""A reward computed by a server (`--reward_url URL`, the term `remote` in `--reward`): one JSON POST per rollout
batch on each rank, standard library only.

Protocol (docs/REWARD_MODELS.md has it with an example server, scripts/reward_server_example.py):

    POST URL   Content-Type: application/json   [Authorization: Bearer $GRPO_DS_REWARD_API_KEY]
    {"prompts": [...], "completions": [...], "completion_ids": [[...], ...], "<column>": [...], ...}
    -> 200   {"rewards": [float | null, ...]}

- `prompts[i]` is the raw prompt of completion i: a string, or a list of chat messages {"role", "content"};
  `completions[i]` is the generated text, or [{"role": "assistant", "content": text}] for chat prompts (TRL's
  convention for reward functions).
- `completion_ids` (token ids of each completion) is sent when the trainer has them; omitted otherwise.
- Every other keyword argument that is a list of one value per completion (the dataset's columns: "answer", ...)
  is sent under its own name; anything else (trainer_state, callables) is not.
- The answer holds exactly one reward per completion, in order; null means "no reward from this term" (TRL's None:
  the term is left out of that completion's weighted sum).
- Each rank sends its own batch: a run on W ranks makes W requests per step, concurrently.
- The start-up check posts an empty batch ({"prompts": [], "completions": []}) and requires {"rewards": []}.

Failures. A request that fails in transport (connection refused or reset, timeout, HTTP 5xx, 408 or 429) is
retried `retries` times with exponential backoff (backoff, 2 x backoff, 4 x backoff seconds); a server that answers
and breaks the protocol (another 4xx, an answer that is not JSON, not {"rewards": [...]}, of the wrong length or
holding a non-number) is not retried: it would answer the same again. Either way the error is a RewardServerError,
one line naming the URL and what failed, so the trainer can tell it from other errors, save and stop.
`timeout` is urllib's: it bounds connecting and each wait for data, in seconds.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import numbers
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

from .rewards import RewardAbort

log = logging.getLogger("grpo_ds.remote_reward")

FLAG = "--reward_url"
API_KEY_ENV = "GRPO_DS_REWARD_API_KEY"
RETRY_STATUS = {408, 429}  # and every 5xx


class RewardServerError(RewardAbort, ValueError):
    """The reward server failed (after any retries): one line naming the URL and what went wrong. A RewardAbort:
    score_completions lets it through, and the trainer saves what it has and stops."""


class _Transient(Exception):
    """A failure worth retrying (transport, 5xx)."""


class RemoteReward:
    """A batched reward function (TRL's convention) that asks a server:
    `scorer(prompts, completions, completion_ids=None, **columns) -> list[float | None]`.

    `url`: http(s) address of the scorer. `timeout`: seconds for connecting and for each wait for data
    (--reward_url_timeout). `retries`: further attempts after a transport failure (--reward_url_retries).
    `backoff`: seconds before the first retry, doubled each time. `api_key`: sent as "Authorization: Bearer KEY";
    by default the environment variable GRPO_DS_REWARD_API_KEY, when set (never logged, never in an error)."""

    __name__ = "remote"  # the term's name in logs and in --reward

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 1.0,
                 api_key: Optional[str] = None):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{FLAG} {url}: not an http:// or https:// address")
        if not timeout > 0:
            raise ValueError(f"--reward_url_timeout {timeout}: must be a positive number of seconds")
        if retries < 0:
            raise ValueError(f"--reward_url_retries {retries}: must be 0 or more")
        if backoff < 0:
            raise ValueError(f"{FLAG}: backoff must be 0 or more seconds, got {backoff}")
        self.url, self.timeout, self.retries, self.backoff = url, float(timeout), int(retries), float(backoff)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        # A loopback scorer is reached directly even where http_proxy is set; others follow the environment's proxies
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def __call__(self, prompts: list, completions: list, completion_ids: Optional[list] = None,
                 **columns) -> list[Optional[float]]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{FLAG} {self.url}: {len(prompts)} prompts for {n} completions")
        body = {name: _plain(value) for name, value in columns.items()
                if isinstance(value, (list, tuple)) and len(value) == n}
        body.update(prompts=_plain(prompts), completions=_plain(completions))
        if completion_ids is not None:
            body["completion_ids"] = _plain(completion_ids)
        return self.post(body, n)

    def check(self) -> None:
        """At start-up: an empty batch must come back as {"rewards": []} within the timeout, at the first attempt
        (a dead, slow or wrong URL is refused before any model loads)."""
        try:
            self.post({"prompts": [], "completions": []}, 0, attempts=1)
        except RewardServerError as err:
            raise ValueError(f"{FLAG} {self.url}: the start-up check (an empty batch) failed: "
                             f"{str(err).removeprefix(f'{FLAG} {self.url}: ')}") from None

    def post(self, body: dict, n: int, attempts: Optional[int] = None) -> list[Optional[float]]:
        """POST `body`, retrying transport failures; the `n` rewards of the answer."""
        attempts = self.retries + 1 if attempts is None else attempts
        data = json.dumps(body, default=str).encode()
        for attempt in range(attempts):
            try:
                return self._parse(self._send(data), n)
            except _Transient as err:
                if attempt + 1 == attempts:
                    tries = f" ({attempts} attempts)" if attempts > 1 else ""
                    raise RewardServerError(f"{FLAG} {self.url}: {err}{tries}") from None
                delay = self.backoff * 2 ** attempt
                log.warning("%s %s: %s; retrying in %.3g s (%d of %d)", FLAG, self.url, err, delay, attempt + 1,
                            self.retries)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _send(self, data: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            detail = _one_line(err.read(200).decode("utf-8", "replace")) if err.fp else ""
            what = f"HTTP {err.code} {err.reason}" + (f" ({detail})" if detail else "")
            if err.code >= 500 or err.code in RETRY_STATUS:
                raise _Transient(what) from None
            raise RewardServerError(f"{FLAG} {self.url}: {what}") from None
        except (TimeoutError, socket.timeout):
            raise _Transient(f"no answer within {self.timeout:g} s") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Transient(f"no answer within {self.timeout:g} s") from None
            raise _Transient(f"cannot connect ({_one_line(str(reason))})") from None
        except (ConnectionError, OSError) as err:  # reset mid-answer, and the like
            raise _Transient(f"connection failed ({_one_line(str(err)) or type(err).__name__})") from None

    def _parse(self, raw: bytes, n: int) -> list[Optional[float]]:
        def fail(what: str):
            raise RewardServerError(f"{FLAG} {self.url}: {what}")

        try:
            answer = json.loads(raw)
        except ValueError:
            fail(f"the answer is not JSON ({_one_line(raw[:80].decode('utf-8', 'replace'))!r})")
        if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
            fail('the answer is not {"rewards": [...]}')
        rewards = answer["rewards"]
        if len(rewards) != n:
            fail(f"{len(rewards)} rewards for {n} completions")
        out: list[Optional[float]] = []
        for i, value in enumerate(rewards):
            if value is None:
                out.append(None)
            elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
                out.append(float(value))
            else:
                fail(f"reward {i} is {value!r}, not a finite number or null")
        return out


def _plain(value):
    """Tensors and arrays as lists, so that json can write them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
