"""An OpenAI-compatible HTTP server for a trained model (FastAPI + uvicorn), with request batching.

    bash scripts/serve.sh start runs/quickstart --port 8000      # or: .venv/bin/python scripts/serve.py MODEL
    curl -s 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "runs/quickstart/final", "messages": [{"role": "user", "content": "What is 6 * 7?"}]}'

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (messages, temperature, top_p, max_tokens, n,
stop, stream with SSE chunks then `data: [DONE]`), POST /v1/solve ({question} -> {reasoning, answer, ...}).

How a request runs: `Guard` checks the API key (every path but /health, when the server has one) and the declared
body size from the headers alone; the handler reads the body up to --max_body_bytes, validates it (max_tokens at
most --max_tokens_limit), renders the chat template, tokenizes, and refuses a prompt that does not fit the model's
context with max_tokens (never truncates). It then queues a `Job` (its n rows) and awaits events; a request that
finds --max_queue requests waiting gets a 503 at once (a bounded queue, so no request waits without end). One worker
thread takes the first queued job, waits up to --batch_wait_ms for more jobs with the same sampling settings
(temperature, top_p; up to --max_batch_size rows), and runs them as one left-padded `generate` call. A `RowTracker`,
called by generate after every token, follows each row: its own max_tokens, its stop strings, EOS, a client gone
away; it streams each row's new text to its request as it comes (decoding a few tokens per token:
IncrementalDecoder), and ends the call once every row is done. Errors are JSON in OpenAI's shape, {"error":
{"message", "type", "param", "code"}}; a failing batch fails its own requests with a 500 and the worker goes on.

Known limits: one model, one worker (a GPU serves one batch at a time; requests arriving meanwhile form the next
batch); no continuous batching (a batch runs until its longest row is done); no logprobs, tools or images.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria

from .data import prompt_messages, render_chat
from .generation import Sampling, eos_token_ids, generate
from .inference import PromptFormat
from .rewards import extract_answer, parse_number

log = logging.getLogger("grpo_ds.serve")

MAX_BODY_BYTES = 4 * 1024 * 1024  # a prompt larger than any context, so still refused with a clear message
MAX_TOKENS_LIMIT = 2048  # the most completion tokens one request may ask for
MAX_STOP = 4  # as OpenAI
API_KEY_ENV = "GRPO_DS_API_KEY"  # where scripts/serve.py reads the key when --api_key is not given
HEALTH_PATH = "/health"  # the one path that answers without the key
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is still there


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request error with OpenAI's fields; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def validation_error(err: ValidationError) -> ApiError:
    """The first pydantic error as one OpenAI-style message naming the parameter ('messages.0.role')."""
    first = err.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


def is_loopback(host: str) -> bool:
    """Whether a server bound to `host` takes connections from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to any address


def exposure_warning(host: str, port: int, api_key: str | None) -> str | None:
    """The warning to log when a server without a key binds an address other machines can reach."""
    if api_key or is_loopback(host):
        return None
    return (f"--host {host} accepts connections from other machines and no API key is set (--api_key or "
            f"${API_KEY_ENV}): anyone who can reach port {port} can use the model; set a key or bind 127.0.0.1")


# ----------------------------------------------------------------------------- request bodies


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(BaseModel):
    """The OpenAI parameters we honour; others (user, seed, logit_bias, ...) are accepted and ignored."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    n: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict] = None


class SolveRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    question: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(0.0, ge=0, le=2)


# ----------------------------------------------------------------------------- jobs and the batch worker


@dataclass
class Job:
    """One request: `n` rows of the same prompt. The worker reports to the request through `events` (an asyncio
    queue on the server's loop): ("delta", choice, text) while streaming, ("done", choice, text, finish_reason,
    num_tokens) for each row, ("error", ApiError) if the batch failed."""
    prompt_ids: list[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client went away: its rows stop at the next token

    def send(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def sampling_key(self) -> tuple[float, float]:
        return (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)


class IncrementalDecoder:
    """The text of a growing list of token ids, decoding a few tokens per new token instead of the whole row (which
    made a stream of L tokens cost O(L^2) tokens of decoding).

    The method of Hugging Face's text-generation-inference and vLLM (`decode_token`, `detokenize_incrementally`):
    each step decodes `ids[prefix:]`, where ids[prefix:read] is the text already emitted last time, kept as context
    so that tokenizers which drop a word's leading space at the start of a text (SentencePiece) or merge pieces
    decode the new token as the whole row would; the new text is what that window adds. A window whose text ends
    with U+FFFD may be a multi-byte character cut between byte-level tokens, so it waits for the next token. While
    every emitted chunk ends on a whole character, the concatenated chunks equal decode(ids) exactly.

    Known limit: a model emitting invalid UTF-8 (or skipped special tokens) for MAX_PENDING tokens in a row has its
    window emitted as decoded so far, to keep the work per token bounded; if such a run ends on a character cut in
    two, the stream shows U+FFFD where decode(ids) has the character (valid text is never affected). A tokenizer
    with clean_up_tokenization_spaces (off by default in transformers 5) rewrites " ." as "." within a decode call,
    so a space and a period on either side of a chunk's edge stream as " ."."""

    MAX_PENDING = 16

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read]: the last emitted chunk, decoding context for the next
        self.read = 0  # ids[:read] are in the emitted text
        self.prefix_text = ""  # decode(ids[prefix:read])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text that `token` adds: "" while the window ends mid-character (or adds nothing yet)."""
        self.ids.append(token)
        window = self.decode(self.ids[self.prefix:])
        waiting = len(window) <= len(self.prefix_text) or window.endswith("\ufffd")
        if waiting and len(self.ids) - self.read < self.MAX_PENDING:
            return ""
        return self.emit(window)

    def flush(self) -> str:
        """The text still held back: the row has ended, whatever its last tokens are."""
        return self.emit(self.decode(self.ids[self.prefix:])) if self.read < len(self.ids) else ""

    def emit(self, window: str) -> str:
        new = window[len(self.prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        self.prefix_text = self.decode(self.ids[self.prefix:self.read])
        return new


class Row:
    """One generated completion of a job, followed token by token. A row that streams or has stop strings decodes
    as it goes (IncrementalDecoder) and searches only the new end of its text for stop strings; any other row
    decodes once, when it ends."""

    def __init__(self, job: Job, choice: int, tokenizer, eos_ids: set[int]):
        self.job, self.choice, self.tokenizer, self.eos_ids = job, choice, tokenizer, eos_ids
        self.ids: list[int] = []
        self.decoder = IncrementalDecoder(tokenizer) if job.stop or job.stream else None
        self.num_tokens = 0  # generated tokens, an EOS included (what usage reports)
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.searched = 0  # no stop string starts before text[searched]
        self.done = False
        self.longest_stop = max((len(s) for s in job.stop), default=0)
        self.holdback = max(self.longest_stop - 1, 0)  # a stop string may be mid-way

    def step(self, token: int) -> None:
        if self.job.cancelled:
            return self.finish("cancelled")
        self.num_tokens += 1
        if token in self.eos_ids:
            return self.finish("stop")
        self.ids.append(token)
        if self.decoder is not None:
            self.text += self.decoder.add(token)
            if self.cut_at_stop():
                return self.end("stop")
            safe = len(self.text) - self.holdback  # hold back a possible start of a stop string
            if self.job.stream and safe > self.sent:
                self.job.send("delta", self.choice, self.text[self.sent:safe])
                self.sent = safe
        if self.num_tokens >= self.job.max_tokens:
            self.finish("length")

    def cut_at_stop(self) -> bool:
        """Ends the text before the first stop string, if one is complete now. Only the new end is searched: a stop
        string found now ends in the new text, so starts at most len(longest) - 1 characters before it."""
        if not self.job.stop:
            return False
        cut = min((i for i in (self.text.find(s, self.searched) for s in self.job.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return True
        self.searched = max(0, len(self.text) - self.longest_stop + 1)
        return False

    def finish(self, reason: str) -> None:
        """The row ends for a reason other than a stop string seen in its text: its last text is decoded."""
        if self.decoder is None:  # decoded once, here, when nothing needed it earlier
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        else:
            self.text += self.decoder.flush()
            if self.cut_at_stop():
                reason = "stop"
        self.end(reason)

    def end(self, reason: str) -> None:
        if self.job.stream and len(self.text) > self.sent:
            self.job.send("delta", self.choice, self.text[self.sent:])
        self.done = True
        self.job.send("done", self.choice, self.text, reason, self.num_tokens)


class RowTracker(StoppingCriteria):
    """Called by generate() after each new token (input_ids_NT ends with it): feeds every live row its token and
    returns which rows are done, so generate pads them from then on and stops when all are."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids_NT: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for row, token in zip(self.rows, input_ids_NT[:, -1].tolist()):
            if not row.done:
                row.step(token)
        return torch.tensor([row.done for row in self.rows], device=input_ids_NT.device)


class Batcher:
    """The queue and the one worker thread that turns jobs arriving together into one generate() call."""

    def __init__(self, model, tokenizer, max_batch_size: int, batch_wait_ms: float, max_queue: int):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.max_batch_size, self.wait_s, self.max_queue = max_batch_size, batch_wait_ms / 1000, max_queue
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.held: deque[Job] = deque()  # taken from the inbox but not compatible with the batch being formed
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "failed_batches": 0}
        self.thread = threading.Thread(target=self.work, name="grpo_ds-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.inbox.qsize() + len(self.held) >= self.max_queue:
            raise ApiError(503, f"server overloaded: {self.max_queue} requests queued; retry later",
                           kind="server_error", code="overloaded")
        self.stats["requests"] += 1
        self.inbox.put(job)

    def next_batch(self) -> list[Job]:
        first = self.held.popleft() if self.held else self.inbox.get()
        batch, rows = [first], first.n
        for job in list(self.held):  # jobs held back from an earlier batch go first
            if job.sampling_key() == first.sampling_key() and rows + job.n <= self.max_batch_size:
                self.held.remove(job)
                batch.append(job)
                rows += job.n
        deadline = time.monotonic() + self.wait_s
        while rows < self.max_batch_size:
            try:
                job = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job.sampling_key() == first.sampling_key() and rows + job.n <= self.max_batch_size:
                batch.append(job)
                rows += job.n
            else:
                self.held.append(job)
        return batch

    def work(self) -> None:
        while True:
            batch = [job for job in self.next_batch() if not job.cancelled]
            if not batch:
                continue
            try:
                self.run(batch)
            except Exception as err:  # a failing batch (e.g. out of memory) fails its requests, not the server
                log.exception("batch of %d requests failed", len(batch))
                self.stats["failed_batches"] += 1
                for job in batch:
                    job.send("error", ApiError(500, f"generation failed: {type(err).__name__}: {err}",
                                               kind="server_error"))

    def run(self, batch: list[Job]) -> None:
        rows = [Row(job, c, self.tokenizer, set(self.eos_ids)) for job in batch for c in range(job.n)]
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        sampling = Sampling(max(job.max_tokens for job in batch), batch[0].temperature, batch[0].top_p)
        generate(self.model, self.tokenizer, [row.job.prompt_ids for row in rows], sampling,
                 stopping=RowTracker(rows))
        for row in rows:  # generate() stops at max_new_tokens; every row has reached its own limit by then
            if not row.done:
                row.finish("length")


# ----------------------------------------------------------------------------- the application


def check_limits(api_key: str | None, max_body_bytes: int, max_tokens_limit: int, default_max_tokens: int) -> None:
    """Refuses, before a model loads, limits that cannot work together."""
    if api_key is not None and not api_key:
        raise ValueError("--api_key: empty; give a key, or none to serve without one")
    if max_body_bytes < 1:
        raise ValueError(f"--max_body_bytes {max_body_bytes}: expected a positive number of bytes")
    if max_tokens_limit < 1:
        raise ValueError(f"--max_tokens_limit {max_tokens_limit}: expected a positive number of tokens")
    if default_max_tokens > max_tokens_limit:
        raise ValueError(f"--max_tokens {default_max_tokens}: more than --max_tokens_limit {max_tokens_limit}")


class Server:
    """What the endpoints share: the model, its name and context, the batcher, and request building."""

    def __init__(self, model, tokenizer, name: str, *, max_batch_size: int = 16, batch_wait_ms: float = 10,
                 default_max_tokens: int = 512, prompt_format: PromptFormat = PromptFormat(), max_queue: int = 256,
                 api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 max_tokens_limit: int = MAX_TOKENS_LIMIT):
        check_limits(api_key, max_body_bytes, max_tokens_limit, default_max_tokens)
        self.tokenizer, self.name = tokenizer, name
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.default_max_tokens, self.prompt_format = default_max_tokens, prompt_format
        self.max_n = max_batch_size
        # Only a digest of the key is kept and compared (constant time, and equal-length digests hide the key's length)
        self.key_digest = None if api_key is None else hashlib.sha256(api_key.encode()).digest()
        self.max_body_bytes, self.max_tokens_limit = max_body_bytes, max_tokens_limit
        self.batcher = Batcher(model, tokenizer, max_batch_size, batch_wait_ms, max_queue)
        self.created = int(time.time())

    def authorized(self, authorization: str | bytes | None) -> bool:
        """Whether an Authorization header carries the key ('Bearer KEY'); always true when the server has none."""
        if self.key_digest is None:
            return True
        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", "replace")
        scheme, _, given = (authorization or b"").strip().partition(b" ")
        matches = hmac.compare_digest(hashlib.sha256(given.strip()).digest(), self.key_digest)
        return matches and scheme.lower() == b"bearer"

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise ApiError(404, f"The model '{requested}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")

    def chat_prompt(self, messages: list[Message]) -> str:
        """The conversation as the model was trained to see it: the training system prompt and worked example when
        the chat has no system message, and the training response prefix opening the answer (returned as part of
        the answer's text)."""
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        if turns[0]["role"] != "system":
            turns = prompt_messages(None, self.prompt_format.system_prompt, self.prompt_format.example) + turns
        try:
            return render_chat(self.tokenizer, turns, self.prompt_format.response_prefix)
        except Exception as err:  # templates raise on orders they refuse (e.g. two system turns)
            raise ApiError(400, f"messages: the chat template refused them ({err})", param="messages") from None

    def job(self, prompt: str, *, n: int, max_tokens: int | None, temperature: float, top_p: float,
            stop: list[str], stream: bool) -> Job:
        """A job for `prompt`, refused (not truncated) when prompt + max_tokens exceed the model's context."""
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        room = self.context - len(prompt_ids)
        if (max_tokens is None and room < 1) or (max_tokens is not None and max_tokens > room):
            asked = max_tokens if max_tokens is not None else 1
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {len(prompt_ids) + asked} tokens ({len(prompt_ids)} in the messages, "
                                f"{asked} in the completion). Please reduce the length of the messages or "
                                f"completion.", param="messages", code="context_length_exceeded")
        if n > self.max_n:
            raise ApiError(400, f"n: at most {self.max_n} (the server's --max_batch_size)", param="n")
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens: {max_tokens} is more than this server allows, at most "
                                f"{self.max_tokens_limit} (its --max_tokens_limit)", param="max_tokens")
        return Job(prompt_ids, n, max_tokens or min(self.default_max_tokens, room), temperature, top_p, stop,
                   stream, asyncio.get_running_loop())


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body larger than {limit} bytes (the server's --max_body_bytes)",
                    code="request_too_large")


async def parse_body(request: Request, schema: type[BaseModel], limit: int) -> BaseModel:
    """The body validated by `schema`, read only up to `limit` bytes: a chunked upload (no Content-Length, which
    Guard checks) is refused as soon as it passes the limit, not once it is all in memory."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"We could not parse the JSON body of your request ({err})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings", param="stop")
    return stops


async def results(job: Job, request: Request) -> list[tuple[str, str, int]]:
    """(text, finish_reason, num_tokens) per choice, once every row is done. A client that goes away meanwhile is
    noticed within DISCONNECT_POLL_S (uvicorn does not cancel the handler), so that its job is dropped from the
    queue or its rows stop (the caller marks it cancelled), rather than generating for nobody."""
    done: dict[int, tuple[str, str, int]] = {}
    while len(done) < job.n:
        try:
            event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the request") from None
            continue
        if event[0] == "error":
            raise event[1]
        if event[0] == "done":
            done[event[1]] = event[2:]
    return [done[c] for c in range(job.n)]


def solve_fields(text: str) -> dict:
    """{reasoning, answer, number} from a completion in the training format; reasoning is the <think> block, or
    the text before <answer> when there is none."""
    start, end = text.find("<think>"), text.find("</think>")
    if 0 <= start < end:
        reasoning = text[start + len("<think>"):end]
    else:
        reasoning = text.split("<answer>", 1)[0].replace("<think>", "")
    answer = extract_answer(text)
    return {"reasoning": reasoning.strip(), "answer": answer, "number": parse_number(answer)}


class Guard:
    """What every request passes before any endpoint (an ASGI middleware): the API key, on every path but /health,
    and the declared body size. Both are refused from the headers alone, before a byte of the body is read, in
    OpenAI's error shape: 401 `invalid_api_key`, 413 `request_too_large`."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
                return await JSONResponse(error.body(), status_code=error.status, headers=headers)(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])  # lower-case byte names
        if scope["path"] != HEALTH_PATH and not self.server.authorized(headers.get(b"authorization")):
            message = ("Incorrect API key provided" if headers.get(b"authorization") else
                       "You didn't provide an API key: send it in an Authorization header, 'Bearer KEY'")
            return ApiError(401, message, code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return ApiError(400, "Content-Length: not a number")
        if int(length) > self.server.max_body_bytes:
            return body_too_large(self.server.max_body_bytes)
        return None


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="grpo_ds", docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(Guard, server=server)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):  # unknown paths (404) and methods (405), in the same shape
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, err):
        log.exception("unhandled error")
        return JSONResponse(ApiError(500, f"{type(err).__name__}: {err}", kind="server_error").body(),
                            status_code=500)

    @app.get(HEALTH_PATH)
    async def health(request: Request):
        """Open to all, for load balancers and serve.sh; the model and counters only with the key."""
        alive = server.batcher.thread.is_alive()
        details = ({"model": server.name, **server.batcher.stats}
                   if server.authorized(request.headers.get("authorization")) else {})
        return JSONResponse({"status": "ok" if alive else "worker stopped", **details},
                            status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "grpo_ds"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse_body(request, ChatRequest, server.max_body_bytes)
        server.check_model(req.model)
        temperature = 1.0 if req.temperature is None else req.temperature
        job = server.job(server.chat_prompt(req.messages), n=req.n or 1,
                         max_tokens=req.max_completion_tokens or req.max_tokens, temperature=temperature,
                         top_p=1.0 if req.top_p is None else req.top_p, stop=stop_list(req.stop),
                         stream=bool(req.stream))
        server.batcher.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name}
        if job.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(sse(job, head, usage, server.prompt_format.response_prefix),
                                     media_type="text/event-stream")
        try:
            choices = await results(job, request)
        finally:
            job.cancelled = True  # a client that left stops its rows; a finished job ignores it
        completion_tokens = sum(num for _, _, num in choices)
        prefix = server.prompt_format.response_prefix  # part of the answer, though the prompt wrote it
        return {**head, "object": "chat.completion",
                "choices": [{"index": c, "message": {"role": "assistant", "content": prefix + text}, "logprobs": None,
                             "finish_reason": reason} for c, (text, reason, _) in enumerate(choices)],
                "usage": usage_of(job, completion_tokens)}

    @app.post("/v1/solve")
    async def solve(request: Request):
        req = await parse_body(request, SolveRequest, server.max_body_bytes)
        prompt = server.prompt_format.render(server.tokenizer, req.question)
        job = server.job(prompt, n=1, max_tokens=req.max_tokens, temperature=req.temperature or 0.0, top_p=1.0,
                         stop=[], stream=False)
        server.batcher.submit(job)
        try:
            [(text, reason, num_tokens)] = await results(job, request)
        finally:
            job.cancelled = True
        text = server.prompt_format.response_prefix + text
        return {**solve_fields(text), "completion": text, "finish_reason": reason, "model": server.name,
                "usage": usage_of(job, num_tokens)}

    return app


def usage_of(job: Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion_tokens,
            "total_tokens": len(job.prompt_ids) + completion_tokens}


async def sse(job: Job, head: dict, include_usage: bool, prefix: str = ""):
    """Server-sent events as OpenAI streams them: a role chunk per choice (its content the response prefix),
    content deltas, a finish_reason chunk per choice, optionally a usage chunk, then `data: [DONE]`."""
    def chunk(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

    try:
        for c in range(job.n):
            yield chunk([{"index": c, "delta": {"role": "assistant", "content": prefix}, "finish_reason": None}])
        finished, completion_tokens = 0, 0
        while finished < job.n:
            event = await job.events.get()
            if event[0] == "error":
                yield f"data: {json.dumps(event[1].body())}\n\n"
                return
            if event[0] == "delta":
                yield chunk([{"index": event[1], "delta": {"content": event[2]}, "finish_reason": None}])
            else:
                finished += 1
                completion_tokens += event[4]
                yield chunk([{"index": event[1], "delta": {}, "finish_reason": event[3]}])
        if include_usage:
            yield chunk([], usage=usage_of(job, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # also when the client disconnects mid-stream: its rows stop
