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

Tools (docs/SERVING.md#tools): a request with OpenAI's `tools` field gets the schemas in its prompt as training
renders them, and a completion that calls them comes back as `message.tool_calls` (finish_reason "tool_calls"),
never run here; the follow-up's assistant `tool_calls` and `tool` messages are framed as training frames a tool
turn (tools.ToolFormat). A model trained with --tools/--environment, asked without a `tools` field, runs its own
tools here with the loop of training (Batcher.run_episode): the reply is its last turn, the episode beside it.

Known limits: one model, one worker (a GPU serves one batch at a time; requests arriving meanwhile form the next
batch); no continuous batching (a batch runs until its longest row is done); no logprobs or images; a tool-loop
request runs as a batch of its own and streams its answer as one chunk; `stream` with a `tools` field is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import queue
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

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
from .tools import ToolFormat, parse_tool_calls

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


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None  # None only in an assistant message with tool_calls
    tool_calls: Optional[list[MessageToolCall]] = None  # assistant: the calls the client ran
    tool_call_id: Optional[str] = None  # tool: which call this is the result of

    def text(self) -> str:
        if self.content is None:
            return ""
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
    tools: Optional[Any] = None  # checked by check_tools, so that any bad value is a 400 naming `tools`
    tool_choice: Optional[Any] = None


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
    raw: bool = False  # each row's "done" also carries its text with special tokens kept (tool calls are parsed)
    episode: Optional["Episode"] = None  # answered with the run's tool loop (Batcher.run_episode)

    def send(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def sampling_key(self) -> tuple:
        if self.episode is not None:  # an episode runs alone: later turns go on for some rows only
            return ("episode", id(self))
        return (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)


@dataclass
class Episode:
    """A request answered by the run's tool loop: its prompt given the text an environment's reset() returned
    (None: none), appended to the last user turn as training appends it; and the columns reset() is given."""
    render: Callable[[Optional[str]], str]
    columns: dict


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
        extra = {"raw": self.tokenizer.decode(self.ids, skip_special_tokens=False)} if self.job.raw else {}
        self.job.send("done", self.choice, self.text, reason, self.num_tokens, extra)


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

    def __init__(self, model, tokenizer, max_batch_size: int, batch_wait_ms: float, max_queue: int,
                 prompt_format: PromptFormat = PromptFormat(), tool_format: Optional[ToolFormat] = None,
                 context: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.toolbox, self.tool_format = prompt_format.toolbox, tool_format
        self.max_episode_tokens, self.context = prompt_format.max_episode_tokens, context
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
        if batch[0].episode is not None:
            return self.run_episode(batch[0])
        rows = [Row(job, c, self.tokenizer, set(self.eos_ids)) for job in batch for c in range(job.n)]
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        sampling = Sampling(max(job.max_tokens for job in batch), batch[0].temperature, batch[0].top_p)
        generate(self.model, self.tokenizer, [row.job.prompt_ids for row in rows], sampling,
                 stopping=RowTracker(rows))
        for row in rows:  # generate() stops at max_new_tokens; every row has reached its own limit by then
            if not row.done:
                row.finish("length")


    def run_episode(self, job: Job) -> None:
        """A request answered with the run's tool loop, as ask.py and evaluation run it (generate with a
        tools.Session: generation.episodes): its n rows decode a turn, the tools they called run here, the results
        come back framed as in training, until each row answers without a call or a budget ends it (max_tokens:
        the model's tokens over all turns; the run's --max_episode_tokens; the model's context). The reply is each
        row's last turn, sent whole (a stream gets it as one chunk), with the episode's conversation."""
        session = self.toolbox.session([job.episode.columns] * job.n, self.tool_format)
        prompts = [job.episode.render(observation) for observation in session.observations]
        shared = len(set(prompts)) == 1
        self.stats["batches"] += 1
        self.stats["rows"] += job.n
        rollout = generate(self.model, self.tokenizer, prompts[:1] if shared else prompts,
                           Sampling(job.max_tokens, job.temperature, job.top_p), group_size=job.n if shared else 1,
                           max_length=self.context, should_stop=lambda: job.cancelled, tools=session,
                           max_episode_tokens=self.max_episode_tokens)
        for c in range(job.n):
            messages = rollout.messages_N[c]
            text = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
            reason = "length" if bool(rollout.truncated_N[c]) else "stop"
            cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            if job.stream and text:
                job.send("delta", c, text)
            job.send("done", c, text, reason, int(rollout.completion_mask_NC[c].sum()), {"episode": messages})


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
        self.tool_format = ToolFormat(tokenizer, prompt_format.response_prefix,  # how tool turns are framed
                                      prompt_format.turn_prefix)
        self.batcher = Batcher(model, tokenizer, max_batch_size, batch_wait_ms, max_queue, prompt_format,
                               self.tool_format, self.context)
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

    def chat_prompt(self, messages: list[Message], tools: list[dict] | None = None,
                    observation: str | None = None) -> str:
        """The conversation as the model was trained to see it: the training system prompt and worked example when
        the chat has no system message, and the training response prefix opening the answer (returned as part of
        the answer's text). `tools` (schemas) are rendered as training renders them (data.render_chat);
        `observation` (an environment's reset() text) is appended to the last user turn."""
        turns = self.chat_turns(messages)
        if observation is not None:
            users = [i for i, t in enumerate(turns) if t["role"] == "user"]
            last = users[-1] if users else len(turns) - 1
            turns[last] = {**turns[last], "content": turns[last]["content"] + observation}
        if turns[0]["role"] != "system":
            turns = prompt_messages(None, self.prompt_format.system_prompt, self.prompt_format.example) + turns
        try:
            return render_chat(self.tokenizer, turns, self.prompt_format.response_prefix, tools)
        except Exception as err:  # templates raise on orders they refuse (e.g. two system turns)
            raise ApiError(400, f"messages: the chat template refused them ({err})", param="messages") from None

    def chat_turns(self, messages: list[Message]) -> list[dict]:
        """The request's messages as chat-template turns. An assistant message with `tool_calls` and the `tool`
        messages answering it keep OpenAI's form, which data.render_chat frames as training frames a model turn
        that called tools and the results (tools.ToolFormat: the template's own tool support, else the Hermes text
        format of docs/AGENTS.md); a result takes its tool's name from the call its tool_call_id names."""
        turns, names = [], {}
        for i, m in enumerate(messages):
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise ApiError(400, f"messages.{i}.content: required (null only in an assistant message with "
                                    f"tool_calls)", param=f"messages.{i}.content")
            if m.role == "assistant" and m.tool_calls:
                calls = []
                for j, call in enumerate(m.tool_calls):
                    try:
                        arguments = json.loads(call.function.arguments) if call.function.arguments.strip() else {}
                    except json.JSONDecodeError:
                        arguments = None
                    if not isinstance(arguments, dict):
                        param = f"messages.{i}.tool_calls.{j}.function.arguments"
                        raise ApiError(400, f"{param}: expected a JSON object as text", param=param)
                    names[call.id] = call.function.name
                    calls.append({"type": "function", "function": {"name": call.function.name,
                                                                   "arguments": arguments}})
                turns.append({"role": "assistant", "content": m.text(), "tool_calls": calls})
            elif m.role == "tool":
                if m.tool_call_id not in names:
                    raise ApiError(400, f"messages.{i}.tool_call_id: {m.tool_call_id!r} answers no tool call of an "
                                        f"earlier assistant message", param=f"messages.{i}.tool_call_id")
                turns.append({"role": "tool", "name": names[m.tool_call_id], "content": m.text()})
            else:
                turns.append({"role": "system" if m.role == "developer" else m.role, "content": m.text()})
        return turns

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


def check_tools(tools: Any) -> list[dict] | None:
    """The OpenAI `tools` field, checked: a list of {"type": "function", "function": {"name", "description"?,
    "parameters"?}} (the shape of transformers' get_json_schema, which training renders), else a 400 naming it."""
    if tools is None:
        return None

    def bad(why: str) -> ApiError:
        return ApiError(400, f"tools: {why}", param="tools")

    if not isinstance(tools, list) or not tools:
        raise bad("expected a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    names = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad(f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise bad(f"tools[{i}].function.name: expected 1 to 64 letters, digits, _ or -")
        if name in names:
            raise bad(f"tools[{i}].function.name: {name!r} is given twice")
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise bad(f"tools[{i}].function.description: expected text")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise bad(f"tools[{i}].function.parameters: expected a JSON schema of type object")
    return tools


def check_tool_choice(tool_choice: Any) -> str:
    """"auto" (the default) or "none"; "required" and naming a function are not supported (a 400 naming it)."""
    if tool_choice is None:
        return "auto"
    if tool_choice not in ("auto", "none"):
        raise ApiError(400, f"tool_choice: {json.dumps(tool_choice)} is not supported; expected \"auto\" or "
                            f"\"none\"", param="tool_choice")
    return tool_choice


def tool_call_message(raw: str, prefix: str) -> dict | None:
    """The OpenAI assistant message for a completion that called the client's tools: `tool_calls` (each with an
    id, the name and the arguments as JSON text) and `content` the text before the first call (None when blank);
    None when the text calls nothing, or when a call cannot be read (the text is then returned as content)."""
    calls = parse_tool_calls(raw)
    if not calls or any(call.error is not None for call in calls):
        return None
    before = (prefix + raw[:raw.find("<tool_call>")]).strip()
    return {"role": "assistant", "content": before or None, "tool_calls": [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": call.name, "arguments": json.dumps(call.arguments)}} for call in calls]}


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings", param="stop")
    return stops


async def results(job: Job, request: Request) -> list[tuple[str, str, int, dict]]:
    """(text, finish_reason, num_tokens, extra) per choice (extra: "raw", the text with special tokens, for a job
    with `raw`; "episode", the conversation, for an episode), once every row is done. A client that goes away
    meanwhile is noticed within DISCONNECT_POLL_S (uvicorn does not cancel the handler), so that its job is dropped
    from the queue or its rows stop (the caller marks it cancelled), rather than generating for nobody."""
    done: dict[int, tuple[str, str, int, dict]] = {}
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
        tools, tool_choice = check_tools(req.tools), check_tool_choice(req.tool_choice)
        # the client's tools: the model's calls are returned, never run; else a run trained with tools runs its own
        offered = tools if tools is not None and tool_choice == "auto" else None
        toolbox = server.prompt_format.toolbox if tools is None and tool_choice == "auto" else None
        if offered is not None and req.stream:
            raise ApiError(400, "stream: not supported with tools (a tool call is known only once the completion "
                                "has ended); send the request without stream", param="stream")
        episode = None
        if toolbox is not None:
            messages = req.messages
            episode = Episode(lambda observation: server.chat_prompt(messages, toolbox.schemas, observation),
                              {"question": next((m.text() for m in reversed(messages) if m.role == "user"), "")})
        prompt = episode.render(None) if episode is not None else server.chat_prompt(req.messages, offered)
        job = server.job(prompt, n=req.n or 1,
                         max_tokens=req.max_completion_tokens or req.max_tokens, temperature=temperature,
                         top_p=1.0 if req.top_p is None else req.top_p, stop=stop_list(req.stop),
                         stream=bool(req.stream))
        job.raw, job.episode = offered is not None, episode
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
        completion_tokens = sum(num for _, _, num, _ in choices)
        prefix = server.prompt_format.response_prefix  # part of the answer, though the prompt wrote it
        out = []
        for c, (text, reason, _, extra) in enumerate(choices):
            message = tool_call_message(extra["raw"], prefix) if offered is not None and reason == "stop" else None
            choice = {"index": c, "message": message or {"role": "assistant", "content": prefix + text},
                      "logprobs": None, "finish_reason": "tool_calls" if message else reason}
            if "episode" in extra:  # the tool loop run here: the model's turns and the tools' results
                choice["episode"] = extra["episode"]
            out.append(choice)
        return {**head, "object": "chat.completion", "choices": out, "usage": usage_of(job, completion_tokens)}

    @app.post("/v1/solve")
    async def solve(request: Request):
        req = await parse_body(request, SolveRequest, server.max_body_bytes)
        prompt = server.prompt_format.render(server.tokenizer, req.question)
        job = server.job(prompt, n=1, max_tokens=req.max_tokens, temperature=req.temperature or 0.0, top_p=1.0,
                         stop=[], stream=False)
        server.batcher.submit(job)
        try:
            [(text, reason, num_tokens, _)] = await results(job, request)
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
