"""The OpenAI-compatible server (grpo_ds.serve, scripts/serve.py) on loopback, called by real HTTP clients: the
official `openai` package (non-streaming and streaming), raw requests for the error cases (bad input, a body too
large, overload, a failing generation, an error inside a stream), concurrent load, a training run's prompt format,
and scripts/serve.sh start/status/stop. All traffic goes to 127.0.0.1, with timeouts."""

import asyncio
import json
import os
import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from grpo_ds import serve
from grpo_ds.data import render_chat
from grpo_ds.generation import Sampling, generate
from grpo_ds.inference import PromptFormat, load
from helpers import ROOT, free_port, load_script

NAME = "tiny-grpo"
TIMEOUT = 60


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory) -> Path:
    from helpers import build_varied_model

    return build_varied_model(tmp_path_factory.mktemp("varied") / "model")


@pytest.fixture(scope="module")
def loaded(varied_model):
    return load(str(varied_model))


@contextmanager
def serving(model, tokenizer, **options):
    """A real uvicorn server in a thread of this process (the model loads once), on a free loopback port."""
    import uvicorn

    app = serve.create_app(serve.Server(model, tokenizer, NAME, **options))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def url(loaded):
    # batch_wait_ms is generous so that concurrent test requests reliably land in shared batches
    with serving(*loaded, max_batch_size=8, batch_wait_ms=50, default_max_tokens=16,
                 prompt_format=PromptFormat(system_prompt=None)) as address:
        yield address


@pytest.fixture(scope="module")
def client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def greedy(loaded, question: str, max_new_tokens: int, system: str | None = None, prefix: str = "",
           example: tuple[str, str] | None = None) -> str:
    """What the model writes for `question` asked alone, computed without the server."""
    model, tokenizer = loaded
    messages = ([{"role": "system", "content": system}] if system else []) + (
        [{"role": "user", "content": example[0]}, {"role": "assistant", "content": example[1]}] if example else []) + [
        {"role": "user", "content": question}]
    prompt = render_chat(tokenizer, messages, prefix)
    return generate(model, tokenizer, [prompt], Sampling(max_new_tokens, temperature=0.0)).texts(tokenizer)[0]


def chat(question: str, **params) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": question}], **params}


def test_health_and_models(url, client):
    health = httpx.get(f"{url}/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [NAME]


def test_openai_client_non_streaming(client, loaded):
    question = "tom has 3 apples and buys 4 more. how many?"
    response = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                              max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy(loaded, question, 12)
    assert choice.finish_reason in ("stop", "length")
    # the tokens of the text, plus the EOS that ended it (character-level tokenizer: the text re-encodes exactly)
    text_tokens = len(loaded[1](choice.message.content, add_special_tokens=False)["input_ids"])
    assert response.usage.completion_tokens == text_tokens + (choice.finish_reason == "stop")
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    sampled = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                             max_tokens=12, temperature=1.0, top_p=0.9, n=3)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in sampled.choices)


def test_openai_client_streaming(client, loaded):
    question = "what is 1 + 4?"
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == greedy(loaded, question, 12)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    text_tokens = len(loaded[1](content, add_special_tokens=False)["input_ids"])
    assert chunks[-1].usage.completion_tokens == text_tokens + (finishes == ["stop"])
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 4  # streamed, not in one piece


def test_stop_strings(client, url, loaded):
    question = "12 times 12?"
    full = greedy(loaded, question, 16)
    stop = full[3:5]  # a piece from the middle of what the model will write
    expected = full[:full.find(stop)]
    plain = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                           max_tokens=16, temperature=0, stop=[stop])
    assert plain.choices[0].message.content == expected and plain.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                            max_tokens=16, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_solve_returns_reasoning_and_answer(url):
    response = httpx.post(f"{url}/v1/solve", json={"question": "what is 2+2?", "max_tokens": 12}, timeout=TIMEOUT)
    assert response.status_code == 200
    body = response.json()
    assert {"reasoning", "answer", "number", "completion", "finish_reason"} <= body.keys()
    assert body["reasoning"] in body["completion"].replace("<think>", "")


TOO_LONG = "a" * 600  # the tiny tokenizer is character-level; its context is 512 tokens


@pytest.mark.parametrize("body, status, param, code", [
    ("{not json", 400, None, None),
    (json.dumps({"model": NAME}), 400, "messages", None),
    (json.dumps(chat("hi", temperature=5)), 400, "temperature", None),
    (json.dumps(chat("hi", top_p=0)), 400, "top_p", None),
    (json.dumps(chat("hi", max_tokens=0)), 400, "max_tokens", None),
    (json.dumps(chat("hi", n=50)), 400, "n", None),
    (json.dumps(chat("hi", stop=["a", "b", "c", "d", "e"])), 400, "stop", None),
    (json.dumps({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages.0.role", None),
    (json.dumps({"model": NAME, "messages": []}), 400, "messages", None),
    (json.dumps(chat("hi", model="gpt-4")), 404, "model", "model_not_found"),
    (json.dumps(chat(TOO_LONG)), 400, "messages", "context_length_exceeded"),
    (json.dumps(chat("hi", max_tokens=100_000)), 400, "messages", "context_length_exceeded"),
    ("[1, 2]", 400, None, None),
    # the OpenAI tools fields (docs/SERVING.md#tools)
    (json.dumps(chat("hi", tools="multiply")), 400, "tools", None),
    (json.dumps(chat("hi", tools=[])), 400, "tools", None),
    (json.dumps(chat("hi", tools=[{"type": "retrieval"}])), 400, "tools", None),
    (json.dumps(chat("hi", tools=[{"type": "function", "function": {"description": "no name"}}])), 400, "tools", None),
    (json.dumps(chat("hi", tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}])),
     400, "tools", None),
    (json.dumps(chat("hi", tools=[{"type": "function", "function": {"name": "f"}}] * 2)), 400, "tools", None),
    (json.dumps(chat("hi", tool_choice="required")), 400, "tool_choice", None),
    (json.dumps(chat("hi", tool_choice={"type": "function", "function": {"name": "f"}})), 400, "tool_choice", None),
    (json.dumps(chat("hi", stream=True, tools=[{"type": "function", "function": {"name": "f"}}])), 400, "stream", None),
    (json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"},
                                             {"role": "tool", "tool_call_id": "call_x", "content": "42"}]}),
     400, "messages.1.tool_call_id", None),
    (json.dumps({"model": NAME, "messages": [{"role": "user", "content": None}]}), 400, "messages.0.content", None),
])
def test_bad_requests_get_openai_errors(url, body, status, param, code):
    response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_unknown_path_and_openai_client_errors(url, client):
    import openai

    missing = httpx.get(f"{url}/v1/nothing", timeout=TIMEOUT)
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": TOO_LONG}])
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["status"] == "ok"


def test_concurrent_requests_are_batched_and_answered(url, loaded):
    questions = [f"what is {i} + {i + 3}?" for i in range(8)]
    expected = [greedy(loaded, q, 10) for q in questions]
    before = httpx.get(f"{url}/health", timeout=TIMEOUT).json()

    def ask(question: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json=chat(question, max_tokens=10, temperature=0),
                          timeout=TIMEOUT)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(ask, questions))
    assert [r.status_code for r in responses] == [200] * 8
    # each answer is the one its question gets alone: rows were not mixed up inside the shared batches
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == expected
    after = httpx.get(f"{url}/health", timeout=TIMEOUT).json()
    assert after["status"] == "ok" and after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # some requests shared a generate call


def test_client_leaving_a_stream_does_not_hurt_the_server(url):
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=TIMEOUT,
                      json=chat("what is 2+2?", max_tokens=16, temperature=1.0, stream=True)) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: {")
    ok = httpx.post(f"{url}/v1/chat/completions", json=chat("hi", max_tokens=4), timeout=TIMEOUT)
    assert ok.status_code == 200


def test_solve_validates_its_input(url):
    for body, param in (({}, "question"), ({"question": ""}, "question"), ({"question": "hi", "max_tokens": 0},
                                                                           "max_tokens"),
                        ({"question": "hi", "temperature": 5}, "temperature")):
        response = httpx.post(f"{url}/v1/solve", json=body, timeout=TIMEOUT)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param


def test_a_body_too_large_is_refused(url):
    body = json.dumps(chat("a" * (serve.MAX_BODY_BYTES + 1)))
    response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]


def test_a_failing_generation_fails_its_request_and_the_server_goes_on(url, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(serve, "generate", broken)
    failed = httpx.post(f"{url}/v1/chat/completions", json=chat("hi", max_tokens=4), timeout=TIMEOUT)
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error" and "simulated" in failed.json()["error"]["message"]
    # a stream whose batch fails ends with the error as its last event
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=TIMEOUT,
                      json=chat("hi", max_tokens=4, stream=True)) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1][len("data: "):])["error"]["type"] == "server_error"
    monkeypatch.undo()
    ok = httpx.post(f"{url}/v1/chat/completions", json=chat("hi", max_tokens=4), timeout=TIMEOUT)
    assert ok.status_code == 200 and httpx.get(f"{url}/health", timeout=TIMEOUT).json()["failed_batches"] >= 2


def test_overload_is_a_503(loaded, monkeypatch):
    """With the worker busy and the queue full, a new request is refused at once rather than left waiting."""
    release = threading.Event()
    real = serve.generate

    def slow(*args, **kwargs):
        release.wait(TIMEOUT)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve, "generate", slow)
    with serving(*loaded, max_queue=1, batch_wait_ms=0) as address, ThreadPoolExecutor(max_workers=2) as pool:
        def post():
            return httpx.post(f"{address}/v1/chat/completions", json=chat("hi", max_tokens=2), timeout=TIMEOUT)

        busy = pool.submit(post)  # taken by the worker, which then blocks
        deadline = time.monotonic() + 30
        while httpx.get(f"{address}/health", timeout=TIMEOUT).json()["batches"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        queued = pool.submit(post)  # waits in the queue (its one place)
        while httpx.get(f"{address}/health", timeout=TIMEOUT).json()["requests"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = post()
        release.set()
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        assert busy.result().status_code == 200 and queued.result().status_code == 200


def test_a_training_runs_prompt_format_is_served(loaded):
    """A run trained with a system prompt and a response prefix is served with both: chats without a system
    message get it, and every answer opens with the prefix (returned as part of the answer)."""
    fmt = PromptFormat(system_prompt="Be brief.", response_prefix="<think>")
    with serving(*loaded, prompt_format=fmt) as address:
        response = httpx.post(f"{address}/v1/chat/completions", json=chat("what is 2+2?", max_tokens=8,
                                                                          temperature=0), timeout=TIMEOUT)
        content = response.json()["choices"][0]["message"]["content"]
        assert content == "<think>" + greedy(loaded, "what is 2+2?", 8, system="Be brief.", prefix="<think>")
        solved = httpx.post(f"{address}/v1/solve", json={"question": "what is 2+2?", "max_tokens": 8},
                            timeout=TIMEOUT).json()
        assert solved["completion"] == content


def test_a_runs_worked_example_is_served_before_the_chat(loaded):
    """A run trained with a worked example (few-shot) is served with it when the chat brings no system message."""
    example = ("what is 1+1?", "<think>1+1=2</think>")
    fmt = PromptFormat(system_prompt="Be brief.", response_prefix="<think>", example=example)
    expected = greedy(loaded, "what is 2+2?", 8, system="Be brief.", prefix="<think>", example=example)
    assert expected != greedy(loaded, "what is 2+2?", 8, system="Be brief.", prefix="<think>")  # it can fail
    with serving(*loaded, prompt_format=fmt) as address:
        response = httpx.post(f"{address}/v1/chat/completions", json=chat("what is 2+2?", max_tokens=8,
                                                                          temperature=0), timeout=TIMEOUT)
        assert response.json()["choices"][0]["message"]["content"] == "<think>" + expected


# ----------------------------------------------------------------------------- scripts/serve.sh


@pytest.mark.slow
def test_serve_script_start_status_stop(varied_model, tmp_path):
    env = {**os.environ, "GRPO_DS_SERVE_DIR": str(tmp_path / "serve"), "HF_HUB_OFFLINE": "1",
           "GRPO_DS_SERVE_WAIT": "120", "GRPO_DS_API_KEY": KEY}  # start's /health probe needs no key
    port = free_port()

    def script(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "scripts" / "serve.sh"), *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=180)

    started = script("start", str(varied_model), "--port", str(port), "--served_model_name", NAME)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        pid = int((tmp_path / "serve" / "server.pid").read_text())
        status = script("status")
        assert status.returncode == 0 and status.stdout.strip() == f"running (pid {pid}, port {port})"
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"http://127.0.0.1:{port}/health", headers=auth, timeout=TIMEOUT).json()["model"] == NAME
        # the key reached the server through the environment, not the command line
        assert KEY not in subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True,
                                         text=True).stdout
        models = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(models, timeout=TIMEOUT).status_code == 401
        assert httpx.get(models, headers=auth, timeout=TIMEOUT).status_code == 200
        again = script("start", str(varied_model), "--port", str(free_port()))
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        stopped = script("stop")
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"stopped (pid {pid})"
    assert not (tmp_path / "serve" / "server.pid").exists()
    status = script("status")
    assert status.returncode == 3 and status.stdout.strip() == "not running"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert (tmp_path / "serve" / "server.log").read_text()  # the log stays for reading


@pytest.mark.slow
def test_serve_script_start_fails_clearly(tmp_path):
    env = {**os.environ, "GRPO_DS_SERVE_DIR": str(tmp_path / "serve"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "serve.sh"), "start", str(tmp_path / "no_such_model"),
                           "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    assert "the server exited during start" in proc.stderr and "path does not exist" in proc.stderr
    assert not (tmp_path / "serve" / "server.pid").exists()


# ----------------------------------------------------------------------------- streaming decodes only new tokens

BYTE_CORPUS = ["café naïve crème brûlée", "日本語のテキスト", "emoji 🙂 👍 🎉", "what is 2 + 2? the answer is 4."]


def build_byte_tokenizer():
    """A byte-level BPE (GPT-2's and SmolLM2's kind) trained offline on a few lines, so its tokens cut characters:
    'brûlée' is 'br' + the first byte of 'û', then its second byte + 'lé', then 'e'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from helpers import CHAT_TEMPLATE, SPECIAL

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(BYTE_CORPUS * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_metaspace_tokenizer():
    """A SentencePiece-style tokenizer: '▁' marks a space, and a text's first space is dropped when decoding, so
    'world' decoded alone loses the space it has after 'hello'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "</s>", "▁hello", "▁world", "▁again", "!"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def streamed(tokenizer, ids: list[int]) -> list[str]:
    decoder = serve.IncrementalDecoder(tokenizer)
    return [decoder.add(token) for token in ids] + [decoder.flush()]


def test_incremental_decoding_equals_decoding_the_whole_row():
    byte_level = build_byte_tokenizer()
    ids = byte_level("brûlée", add_special_tokens=False)["input_ids"]
    # 'û' is cut between the first two tokens: decoded alone, each shows U+FFFD for its half
    assert [byte_level.decode([i]) for i in ids] == ["br\ufffd", "\ufffdlé", "e"]
    assert streamed(byte_level, ids) == ["", "brûlé", "e", ""]  # 'br' waits until 'û' is whole
    for text in BYTE_CORPUS + ["日本語 🙂 brûlée, 🎉!", "漢字 and 😀 (characters the BPE never merged)"]:
        ids = byte_level(text, add_special_tokens=False)["input_ids"]
        assert "".join(streamed(byte_level, ids)) == text
    # any ids at all, invalid UTF-8 included: the same text as decoding the whole row (hand check above; here the
    # whole-row decode is the reference)
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(3, len(byte_level)) for _ in range(60)]
        assert "".join(streamed(byte_level, ids)) == byte_level.decode(ids, skip_special_tokens=True)
    # the prefix window keeps the space a SentencePiece token loses at the start of a text
    metaspace = build_metaspace_tokenizer()
    ids = metaspace.convert_tokens_to_ids(["▁hello", "▁world", "▁again", "!"])
    assert metaspace.decode(ids) == "hello world again!" and metaspace.decode(ids[1:2]) == "world"  # alone: no space
    assert streamed(metaspace, ids) == ["hello", " world", " again", "!", ""]


class CountingDecode:
    """tokenizer.decode, recording how many ids each call decodes."""

    def __init__(self, tokenizer):
        self.decode, self.lengths = tokenizer.decode, []

    def __call__(self, ids, *args, **kwargs):
        self.lengths.append(len(ids))
        return self.decode(ids, *args, **kwargs)


def row_events(tokenizer, ids: list[int], stop: list[str]) -> list[tuple]:
    """What a streaming Row sends its request for the tokens `ids` then an EOS."""
    loop = asyncio.new_event_loop()
    try:
        job = serve.Job([1], 1, 10_000, 0.0, 1.0, stop, True, loop)
        row = serve.Row(job, 0, tokenizer, {tokenizer.eos_token_id})
        for token in ids + [tokenizer.eos_token_id]:
            if not row.done:
                row.step(token)
        loop.run_until_complete(asyncio.sleep(0))  # deliver the events sent with call_soon_threadsafe
        return [job.events.get_nowait() for _ in range(job.events.qsize())]
    finally:
        loop.close()


@pytest.mark.parametrize("stop", [[], ["zz!"]])
def test_streaming_decodes_a_bounded_window_per_token(stop, monkeypatch):
    """A 600-token stream decodes a few tokens per new token, not the whole row again (O(L^2) in all)."""
    tokenizer = build_byte_tokenizer()
    text = "日本語 🙂 brûlée, what is 2 + 2? " * 40
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 600
    counting = CountingDecode(tokenizer)
    monkeypatch.setattr(tokenizer, "decode", counting)
    events = row_events(tokenizer, ids, stop)
    assert "".join(e[2] for e in events if e[0] == "delta") == text
    assert events[-1] == ("done", 0, text, "stop", len(ids) + 1, {})  # no raw text: the job offers no tools
    # per token: the window (the last emitted chunk, a pending piece of a character, the new token) and once per
    # chunk the new context; the longest chunk here is '日本語' cut across 3 tokens, so at most 3 + 3 ids
    assert max(counting.lengths) <= 6
    assert sum(counting.lengths) <= 6 * len(ids)  # the old code decoded 1 + 2 + ... + L ids: about L^2 / 2


def test_a_stop_string_cut_across_tokens_ends_the_stream_before_it():
    tokenizer = build_byte_tokenizer()
    text = "café naïve crème brûlée"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    events = row_events(tokenizer, ids, ["ème b"])
    assert "".join(e[2] for e in events if e[0] == "delta") == "café naïve cr"
    assert events[-1][:4] == ("done", 0, "café naïve cr", "stop")


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny random Llama over the byte-level tokenizer, its weights scaled so that it writes varied bytes (many of
    them not valid UTF-8 on their own)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(20.0)
    path = tmp_path_factory.mktemp("byte") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return load(str(path))


def test_streamed_text_equals_the_non_streamed_text_on_a_byte_level_model(byte_model):
    model, tokenizer = byte_model
    with serving(model, tokenizer, prompt_format=PromptFormat(system_prompt=None)) as address:
        import openai

        client = openai.OpenAI(base_url=f"{address}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        texts = []
        for question in ("café?", "日本語", "what is 2 + 2?"):
            ask = {"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 48,
                   "temperature": 0}
            whole = client.chat.completions.create(**ask).choices[0].message.content
            stream = client.chat.completions.create(**ask, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole
            assert whole == greedy(byte_model, question, 48)
            texts.append(whole)
    assert any(not t.isascii() for t in texts)  # multi-byte (or invalid) bytes were streamed


# ----------------------------------------------------------------------------- safe to expose: key, limits, load

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def guarded(loaded):
    """A server with an API key, a 2000-byte body limit and at most 8 completion tokens a request."""
    with serving(*loaded, api_key=KEY, max_body_bytes=2000, max_tokens_limit=8, default_max_tokens=4,
                 prompt_format=PromptFormat(system_prompt=None)) as address:
        yield address


def test_the_api_key_is_required_everywhere_but_health(guarded, monkeypatch):
    import hmac

    import openai

    def client(key: str):
        return openai.OpenAI(base_url=f"{guarded}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)

    with pytest.raises(openai.AuthenticationError) as refused:
        client("sk-wrong").chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(KEY + "x").models.list()
    compared = []
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or a == b)
    answer = client(KEY).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client(KEY).models.list().data] == [NAME]
    assert compared and all(len(a) == len(b) == 32 for a, b in compared)  # SHA-256 digests, compared in constant time
    missing = {"message": "You didn't provide an API key: send it in an Authorization header, 'Bearer KEY'",
               "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    wrong = {**missing, "message": "Incorrect API key provided"}
    for path, headers, expected in [
        ("/v1/chat/completions", {}, missing),
        ("/v1/chat/completions", {"Authorization": "Bearer sk-wrong"}, wrong),
        ("/v1/chat/completions", {"Authorization": f"Basic {KEY}"}, wrong),  # the key, but not as a bearer token
        ("/v1/solve", {}, missing),
        ("/v1/nothing", {}, missing),  # unknown paths too: nothing is learnt without the key
    ]:
        response = httpx.post(f"{guarded}{path}", json=chat("hi", max_tokens=2), headers=headers, timeout=TIMEOUT)
        assert response.status_code == 401 and response.json() == {"error": expected}, (path, headers)
        assert response.headers["www-authenticate"] == "Bearer"
    lower = httpx.post(f"{guarded}/v1/chat/completions", json=chat("hi", max_tokens=2), timeout=TIMEOUT,
                       headers={"authorization": f"bearer {KEY}"})
    assert lower.status_code == 200  # the scheme is case-insensitive (RFC 7235)
    # health answers without the key (load balancers, serve.sh), and tells no more than its status
    assert httpx.get(f"{guarded}/health", timeout=TIMEOUT).json() == {"status": "ok"}
    full = httpx.get(f"{guarded}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT).json()
    assert full["model"] == NAME and full["requests"] >= 1


def test_limits_body_size_and_max_tokens(guarded):
    import socket

    import openai

    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    # a declared size over the limit is refused from the headers, before a byte of the body is sent
    port = int(guarded.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
                reply.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
            piece = conn.recv(65536)  # times out (10 s) if the server waits for the body instead
            assert piece, reply
            reply += piece
    head, body = reply.decode().split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 413")
    assert json.loads(body) == {"error": {
        "message": "request body larger than 2000 bytes (the server's --max_body_bytes)",
        "type": "invalid_request_error", "param": None, "code": "request_too_large"}}
    # a chunked body (no declared size) is refused once it passes the limit
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"a" * 100
        yield b'"}]}'

    chunked = httpx.post(f"{guarded}/v1/chat/completions", content=chunks(), headers=auth, timeout=TIMEOUT)
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    at = json.dumps(chat("hi", max_tokens=2, user="u" * 1900))  # `user` is accepted and ignored
    assert len(at) == 2000  # 100 bytes of JSON around the 1,900: exactly the limit, which is allowed
    assert httpx.post(f"{guarded}/v1/chat/completions", content=at, headers=auth, timeout=TIMEOUT).status_code == 200
    over = json.dumps(chat("hi", max_tokens=2, user="u" * 1901))
    assert httpx.post(f"{guarded}/v1/chat/completions", content=over, headers=auth, timeout=TIMEOUT).status_code == 413
    # max_tokens over --max_tokens_limit (8) is a 400 naming the flag; 8 itself is served
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.BadRequestError, match=r"max_tokens: 9 is more than this server allows, at most 8 "
                                                     r"\(its --max_tokens_limit\)"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=9)
    assert client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0).usage.completion_tokens <= 8
    solve = httpx.post(f"{guarded}/v1/solve", json={"question": "hi", "max_tokens": 9}, headers=auth,
                       timeout=TIMEOUT)
    assert solve.status_code == 400 and solve.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("options, message", [
    ({"api_key": ""}, "--api_key: empty; give a key, or none to serve without one"),
    ({"max_body_bytes": 0}, "--max_body_bytes 0: expected a positive number of bytes"),
    ({"max_tokens_limit": 0}, "--max_tokens_limit 0: expected a positive number of tokens"),
    ({"default_max_tokens": 600, "max_tokens_limit": 512}, "--max_tokens 600: more than --max_tokens_limit 512"),
])
def test_limits_that_cannot_work_are_refused(loaded, options, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        serve.Server(*loaded, NAME, **options)


@pytest.mark.parametrize("host, warns", [
    ("127.0.0.1", False), ("localhost", False), ("::1", False), ("[::1]", False), ("127.0.0.2", False),
    ("0.0.0.0", True), ("::", True), ("192.168.1.5", True), ("myhost.example", True),
])
def test_binding_beyond_loopback_without_a_key_warns(host, warns):
    warning = serve.exposure_warning(host, 8000, None)
    assert (warning is not None) == warns
    if warns:
        assert warning == (f"--host {host} accepts connections from other machines and no API key is set "
                           f"(--api_key or $GRPO_DS_API_KEY): anyone who can reach port 8000 can use the model; "
                           f"set a key or bind 127.0.0.1")
    assert serve.exposure_warning(host, 8000, KEY) is None


def test_serve_script_binds_loopback_takes_the_key_from_the_environment_and_warns(varied_model, monkeypatch, caplog):
    import logging

    import uvicorn

    script = load_script("serve")
    assert script.parser().parse_args(["m"]).host == "127.0.0.1"
    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: runs.append((app, kwargs)))
    monkeypatch.setenv("GRPO_DS_API_KEY", KEY)
    with caplog.at_level(logging.WARNING, logger="grpo_ds.serve"):
        assert script.main([str(varied_model), "--host", "0.0.0.0"]) == 0
    server = runs[-1][0].state.server
    assert server.authorized(f"Bearer {KEY}") and not server.authorized("Bearer other")
    assert runs[-1][1]["host"] == "0.0.0.0" and not caplog.records  # a key: no warning
    monkeypatch.delenv("GRPO_DS_API_KEY")
    with caplog.at_level(logging.WARNING, logger="grpo_ds.serve"):
        assert script.main([str(varied_model), "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert runs[-1][0].state.server.authorized(None)  # no key: open
    assert [r.getMessage() for r in caplog.records] == [
        "WARNING: " + serve.exposure_warning("0.0.0.0", 8123, None)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grpo_ds.serve"):
        assert script.main([str(varied_model), "--api_key", KEY]) == 0
    assert runs[-1][1]["host"] == "127.0.0.1"
    assert [r.getMessage() for r in caplog.records] == [
        "--api_key on the command line is visible to other users in process listings; $GRPO_DS_API_KEY is not"]
    assert script.main([str(varied_model), "--api_key", ""]) == 2  # refused before the model loads


def test_a_client_that_leaves_a_waiting_request_frees_its_place(loaded, monkeypatch):
    """A non-streamed request whose client goes away while it waits is cancelled (within DISCONNECT_POLL_S), so the
    worker skips it instead of generating for nobody."""
    release = threading.Event()
    real = serve.generate
    generated = []

    def blocked(model, tokenizer, prompts, *args, **kwargs):
        release.wait(TIMEOUT)
        generated.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(serve, "generate", blocked)
    jobs = []
    submit = serve.Batcher.submit
    monkeypatch.setattr(serve.Batcher, "submit", lambda self, job: jobs.append(job) or submit(self, job))
    with serving(*loaded, batch_wait_ms=0) as address, ThreadPoolExecutor(max_workers=1) as pool:
        busy = pool.submit(httpx.post, f"{address}/v1/chat/completions", json=chat("hi", max_tokens=2),
                           timeout=TIMEOUT)
        deadline = time.monotonic() + 30
        while httpx.get(f"{address}/health", timeout=TIMEOUT).json()["batches"] < 1:  # the worker holds it
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(httpx.ReadTimeout):  # this client gives up and closes its connection
            httpx.post(f"{address}/v1/chat/completions", json=chat("hello", max_tokens=2), timeout=3.0)
        while len(jobs) < 2 or not jobs[1].cancelled:
            assert time.monotonic() < deadline, "the server did not notice the client leave"
            time.sleep(0.05)
        release.set()
        assert busy.result().status_code == 200
        after = httpx.post(f"{address}/v1/chat/completions", json=chat("hi", max_tokens=2), timeout=TIMEOUT)
        assert after.status_code == 200
    assert generated == [1, 1]  # the first request, then the last: the abandoned one never reached the model


def slowed(monkeypatch, seconds: float) -> None:
    """Each generate call takes `seconds` more, so that a load test overflows the queue on any machine."""
    real = serve.generate

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve, "generate", slow)


def test_load_every_request_is_answered_or_refused_none_lost(loaded, monkeypatch):
    """16 clients x 2 requests against room for 2 running + 2 waiting: each request gets a 200 or a 503 (never an
    error or a hang); with room for all to wait, all get a 200."""
    load_test = load_script("load_test_serve").load_test
    slowed(monkeypatch, 0.3)
    with serving(*loaded, api_key=KEY, max_batch_size=2, max_queue=2, batch_wait_ms=0) as address:
        tight = load_test(address, clients=16, requests=2, max_tokens=4, api_key=KEY, timeout=60)
        assert tight["lost"] == 0 and tight["errors"] == []
        assert set(tight["statuses"]) == {"200", "503"} and sum(tight["statuses"].values()) == 32
        assert tight["p50_s"] <= tight["p99_s"] < 60
        streaming = load_test(address, clients=8, requests=1, max_tokens=4, api_key=KEY, timeout=60, stream=True)
        assert streaming["lost"] == 0 and set(streaming["statuses"]) <= {"200", "503"}
    with serving(*loaded, api_key=KEY, max_batch_size=2, max_queue=32, batch_wait_ms=0) as address:
        roomy = load_test(address, clients=16, requests=2, max_tokens=4, api_key=KEY, timeout=60)
    assert roomy["statuses"] == {"200": 32} and roomy["lost"] == 0


def test_load_test_percentiles_and_exit_code(url):
    script = load_script("load_test_serve")
    # nearest rank: p50 of 1..10 is the 5th value, p99 the 10th
    assert script.percentile([float(v) for v in range(10, 0, -1)], 50) == 5.0
    assert script.percentile([float(v) for v in range(1, 11)], 99) == 10.0
    assert script.main(["--url", url, "--clients", "2", "--requests", "1", "--max_tokens", "2"]) == 0
    assert script.main(["--url", f"http://127.0.0.1:{free_port()}", "--clients", "2", "--requests", "1",
                        "--timeout", "5"]) == 1  # nobody listening: both requests lost


# ----------------------------------------------------------------------------- tools (docs/SERVING.md#tools)

MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "Multiplies two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "The first integer."},
                                                    "b": {"type": "integer", "description": "The second integer."}},
                   "required": ["a", "b"]}}}
CALL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>'


@pytest.fixture(scope="module")
def ascii_model(tmp_path_factory):
    """A tiny model whose tokenizer spells every ASCII character (tool calls are JSON), its turns a few tokens long
    (a bias towards EOS), as tests/test_tools.py's."""
    import torch

    from helpers import ASCII_CHARS, build_tiny_model

    model, tokenizer = load(str(build_tiny_model(tmp_path_factory.mktemp("ascii"), chars=ASCII_CHARS)))
    model.config.max_position_embeddings = 4096  # a token a character: the tools block alone is ~700 (rotary)
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = 2.5
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    return model, tokenizer


def scripted(texts: list[str], prompts: list):
    """A stand-in for generate() in the batch worker: records each call's prompts (token ids) and writes the next
    of `texts`, then EOS, in every row (a tiny random model cannot write a tool call)."""
    import torch

    def fake(model, tokenizer, batch_prompts, sampling, stopping=None, **kwargs):
        prompts.append([list(p) for p in batch_prompts])
        ids = tokenizer(texts[len(prompts) - 1], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for token in ids:
            if bool(stopping(torch.tensor([[token]] * len(batch_prompts)), None).all()):
                break
    return fake


def test_tools_field_returns_tool_calls_and_frames_the_follow_up_as_training(ascii_model, monkeypatch):
    """OpenAI's `tools`: the schemas go into the prompt as training renders them; a completion that calls one
    comes back as tool_calls (not run); the follow-up with the assistant's tool_calls and the tool's result is
    rendered exactly as training frames a tool turn (tools.ToolFormat), written out by hand here."""
    import openai

    from grpo_ds.tools import ToolCall, ToolFormat, tool_instructions

    model, tokenizer = ascii_model
    prompts = []
    monkeypatch.setattr(serve, "generate", scripted([f"Let me compute.{CALL}", "It is 42."], prompts))
    question = [{"role": "user", "content": "What is 6 times 7?"}]
    with serving(model, tokenizer, prompt_format=PromptFormat(system_prompt=None)) as address:
        client = openai.OpenAI(base_url=f"{address}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        first = client.chat.completions.create(model=NAME, messages=question, tools=[MULTIPLY], temperature=0)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "multiply" and json.loads(call.function.arguments) == {"a": 6, "b": 7}
        assert choice.message.content == "Let me compute."
        follow_up = question + [choice.message.model_dump(exclude_none=True),
                                {"role": "tool", "tool_call_id": call.id, "content": "42"}]
        second = client.chat.completions.create(model=NAME, messages=follow_up, tools=[MULTIPLY], temperature=0)
    assert second.choices[0].message.content == "It is 42." and second.choices[0].finish_reason == "stop"
    assert not second.choices[0].message.tool_calls
    system = f"<|im_start|>system\n{tool_instructions([MULTIPLY])}<|im_end|>\n"
    asked = f"{system}<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n<|im_start|>assistant\n"
    answered = (f"{asked}Let me compute.{CALL}<|im_end|>\n"
                "<|im_start|>tool\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert [tokenizer.decode(p[0], skip_special_tokens=False) for p in prompts] == [asked, answered]
    # the tool turn is training's: what ToolFormat appends after a model turn that called multiply and got 42
    suffix = ToolFormat(tokenizer)._suffix_text([ToolCall("multiply", {"a": 6, "b": 7})], ["42"])
    assert answered.endswith(f"{CALL}<|im_end|>{suffix}")
    # tool_choice "none": no schemas in the prompt, and a <tool_call> in the text is returned as text
    with serving(model, tokenizer, prompt_format=PromptFormat(system_prompt=None)) as address:
        prompts.clear()
        monkeypatch.setattr(serve, "generate", scripted([CALL], prompts))
        plain = httpx.post(f"{address}/v1/chat/completions", timeout=TIMEOUT, json={
            "model": NAME, "messages": question, "tools": [MULTIPLY], "tool_choice": "none"}).json()
    assert plain["choices"][0]["message"]["content"] == CALL and plain["choices"][0]["finish_reason"] == "stop"
    assert "<tools>" not in tokenizer.decode(prompts[0][0], skip_special_tokens=False)


def test_a_run_trained_with_tools_runs_them_server_side(ascii_model, tmp_path, monkeypatch):
    """A run trained with --tools, asked without a `tools` field, runs its tools here with training's loop: the
    tools' results (one an error: the tool raised) reach the prompt of the model's next turn framed as in
    training, and the reply is the model's last turn with the episode beside it, in a stream as one chunk."""
    from grpo_ds import generation
    from grpo_ds.inference import prompt_format
    from grpo_ds.tools import ToolCall, ToolFormat, Toolbox

    model, tokenizer = ascii_model
    (tmp_path / "config.json").write_text(json.dumps({
        "rollouts_per_step": 4, "group_size": 4, "system_prompt": "none", "tools": "agent_tools:multiply,"
        "agent_tools:explode", "tool_timeout": 5.0, "max_tool_calling_iterations": 1, "max_episode_tokens": 400}))
    fmt = prompt_format(str(tmp_path))
    calls = [ToolCall("multiply", {"a": 6, "b": 7}), ToolCall("explode", {"text": "x"})]
    real_session = Toolbox.session  # the model's decisions are scripted: every turn calls both tools
    monkeypatch.setattr(Toolbox, "session", lambda self, columns, fmt, parser=None: real_session(
        self, columns, fmt, lambda text: list(calls)))
    later_turns = []  # the token ids each later turn is decoded from

    def recording(model, tokenizer, prompts, sampling, **kwargs):
        if prompts and not isinstance(prompts[0], str):
            later_turns.extend(prompts)
        return real_generate(model, tokenizer, prompts, sampling, **kwargs)

    real_generate = generation.generate
    monkeypatch.setattr(generation, "generate", recording)
    request = {"model": NAME, "messages": [{"role": "user", "content": "6*7?"}], "max_tokens": 10, "temperature": 0}
    with serving(model, tokenizer, prompt_format=fmt) as address:
        response = httpx.post(f"{address}/v1/chat/completions", json=request, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        with httpx.stream("POST", f"{address}/v1/chat/completions", json={**request, "stream": True},
                          timeout=TIMEOUT) as stream:
            events = [json.loads(line[len("data: "):]) for line in stream.iter_lines()
                      if line.startswith("data: {")]
    results = ["42", "Error: RuntimeError: the tool broke"]
    suffix = ToolFormat(tokenizer)._suffix_text(calls, results)  # training's framing of the two results
    assert suffix == ("\n<|im_start|>tool\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>tool\n"
                      "<tool_response>\nError: RuntimeError: the tool broke\n</tool_response><|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert later_turns and all(tokenizer.decode(ids, skip_special_tokens=False).endswith(suffix)
                               for ids in later_turns)
    choice = response.json()["choices"][0]
    episode = choice["episode"]
    assert [m["role"] for m in episode] == ["assistant", "tool", "tool", "assistant"]
    assert [m["content"] for m in episode[1:3]] == results
    assert choice["message"]["content"] == episode[-1]["content"] and choice["finish_reason"] in ("stop", "length")
    deltas = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert "".join(d or "" for d in deltas) == choice["message"]["content"]
    assert sum(1 for d in deltas if d) <= 1  # the answer in one chunk (none when it is empty)


def test_a_follow_up_is_framed_by_a_template_that_renders_tools(ascii_model):
    """With a template that renders tools itself (Qwen2.5's kind, tests/test_tools.py's NATIVE_TEMPLATE), the
    client's schemas, the assistant's tool_calls and the tool result are given to the template as training gives
    them: its own tool block, its own call tags, the result in its user turn."""
    from test_tools import native_tokenizer

    model, _ = ascii_model
    tokenizer = native_tokenizer()
    server = serve.Server(model, tokenizer, NAME, prompt_format=PromptFormat(system_prompt=None))
    messages = [serve.Message.model_validate(m) for m in [
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 6, "b": 7}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]]
    assert server.chat_prompt(messages, [MULTIPLY]) == (
        "<|im_start|>system\nTOOLS: multiply<|im_end|>\n<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
