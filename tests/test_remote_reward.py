"""The remote reward term against real HTTP servers on the loopback interface: a scorer whose answers are known by
hand, servers that are slow, fail once, fail always, answer the wrong length or not in JSON, and a dead port. Every
server is stopped by its test; a slow one is released at teardown."""

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grpo_ds.remote_reward import RemoteReward, RewardServerError
from helpers import ROOT, free_port


class Scorer:
    """A server whose behaviour is `reply(body, request_number) -> (status, payload_bytes)`; it records every
    request's body and Authorization header."""

    def __init__(self, reply):
        self.reply, self.bodies, self.auth = reply, [], []
        self.release = threading.Event()  # a sleeping handler wakes when the test ends
        scorer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                scorer.bodies.append(body)
                scorer.auth.append(self.headers.get("Authorization"))
                status, payload = scorer.reply(body, len(scorer.bodies))
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


@pytest.fixture
def serve():
    started = []

    def start(reply) -> Scorer:
        started.append(Scorer(reply))
        return started[-1]

    yield start
    for scorer in started:
        scorer.stop()


def ok(payload) -> tuple:
    return 200, json.dumps(payload).encode()


def lengths(body, _):
    """Reward = the completion's length in characters; null for rows whose `skip` column is true."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in body["completions"]]
    skips = body.get("skip", [False] * len(texts))
    return ok({"rewards": [None if s else len(t) for t, s in zip(texts, skips)]})


PROMPTS = ["what is 2+3?", [{"role": "user", "content": "hi"}], "why?"]
COMPLETIONS = ["five", [{"role": "assistant", "content": "hello there"}], "because."]


def test_rewards_are_the_servers_and_the_body_follows_the_protocol(serve, monkeypatch):
    monkeypatch.setenv("GRPO_DS_REWARD_API_KEY", "secret")
    scorer = serve(lengths)
    rewards = RemoteReward(scorer.url)(PROMPTS, COMPLETIONS, completion_ids=[[1, 2], [3], [4, 5, 6]],
                                       skip=[False, False, True], answer=["5", "x", "y"], trainer_state={"step": 3},
                                       log_metric=print)
    assert rewards == [4.0, 11.0, None]  # len("five"), len("hello there"), skipped
    # the columns under their names; no trainer_state, no callable
    assert scorer.bodies == [{"prompts": PROMPTS, "completions": COMPLETIONS,
                              "completion_ids": [[1, 2], [3], [4, 5, 6]], "skip": [False, False, True],
                              "answer": ["5", "x", "y"]}]
    assert scorer.auth == ["Bearer secret"]


def test_completion_ids_are_omitted_when_absent_and_no_key_no_header(serve, monkeypatch):
    monkeypatch.delenv("GRPO_DS_REWARD_API_KEY", raising=False)
    scorer = serve(lengths)
    assert RemoteReward(scorer.url)(["a"], ["xyz"]) == [3.0]
    assert scorer.bodies == [{"prompts": ["a"], "completions": ["xyz"]}] and scorer.auth == [None]


def test_a_server_error_is_retried_then_succeeds(serve):
    scorer = serve(lambda body, n: (500, b"busy") if n == 1 else lengths(body, n))
    assert RemoteReward(scorer.url, retries=2, backoff=0.01)(["a", "b"], ["xy", "xyz"]) == [2.0, 3.0]
    assert len(scorer.bodies) == 2


def one_line_error(reward: RemoteReward, *args) -> str:
    with pytest.raises(RewardServerError) as info:
        reward(*args)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--reward_url {reward.url}: ")
    return message


def test_a_server_failing_every_time_gives_one_line_after_the_retries(serve):
    scorer = serve(lambda body, n: (500, b"out of\nmemory"))
    message = one_line_error(RemoteReward(scorer.url, retries=2, backoff=0.01), ["a"], ["b"])
    assert message == f"--reward_url {scorer.url}: HTTP 500 Internal Server Error (out of memory) (3 attempts)"
    assert len(scorer.bodies) == 3


def test_a_slow_server_times_out(serve):
    def slow(body, n):
        scorer.release.wait(10)  # far past the timeout; released when the test ends
        return lengths(body, n)

    scorer = serve(slow)
    start = time.monotonic()
    message = one_line_error(RemoteReward(scorer.url, timeout=0.3, retries=1, backoff=0.01), ["a"], ["b"])
    assert message == f"--reward_url {scorer.url}: no answer within 0.3 s (2 attempts)"
    assert time.monotonic() - start < 5 and len(scorer.bodies) == 2


def test_a_wrong_length_is_not_retried(serve):
    scorer = serve(lambda body, n: ok({"rewards": [1.0]}))
    message = one_line_error(RemoteReward(scorer.url, retries=3, backoff=0.01), ["a", "b"], ["c", "d"])
    assert message == f"--reward_url {scorer.url}: 1 rewards for 2 completions"
    assert len(scorer.bodies) == 1  # the server answered: asking again would get the same answer


@pytest.mark.parametrize("payload, what", [
    (b"oops", "the answer is not JSON ('oops')"),
    (b'{"scores": [1]}', 'the answer is not {"rewards": [...]}'),
    (b'{"rewards": ["high"]}', "reward 0 is 'high', not a finite number or null"),
    (b'{"rewards": [NaN]}', "reward 0 is nan, not a finite number or null"),
])
def test_a_malformed_answer_is_named(serve, payload, what):
    scorer = serve(lambda body, n: (200, payload))
    assert one_line_error(RemoteReward(scorer.url, backoff=0.01), ["a"], ["b"]) == f"--reward_url {scorer.url}: {what}"


def test_a_client_error_is_not_retried(serve):
    scorer = serve(lambda body, n: (401, b'{"error": "bad key"}'))
    message = one_line_error(RemoteReward(scorer.url, retries=3, backoff=0.01), ["a"], ["b"])
    assert message == f'--reward_url {scorer.url}: HTTP 401 Unauthorized ({{"error": "bad key"}})'
    assert len(scorer.bodies) == 1


def test_a_dead_port_fails_with_one_line():
    url = f"http://127.0.0.1:{free_port()}/"  # bound, then closed: nobody listens
    message = one_line_error(RemoteReward(url, retries=1, backoff=0.01), ["a"], ["b"])
    assert message.startswith(f"--reward_url {url}: cannot connect (") and message.endswith("(2 attempts)")
    assert "refused" in message.lower()


def test_check_accepts_a_live_scorer_and_refuses_dead_slow_or_wrong_ones(serve):
    live = serve(lengths)
    RemoteReward(live.url).check()
    assert live.bodies == [{"prompts": [], "completions": []}]

    dead = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(ValueError) as info:
        RemoteReward(dead, retries=5, backoff=10).check()  # one attempt: no retry, no backoff
    assert str(info.value).startswith(f"--reward_url {dead}: the start-up check (an empty batch) failed: cannot "
                                      f"connect (")
    assert "\n" not in str(info.value)

    slow = serve(lambda body, n: (slow.release.wait(10), lengths(body, n))[1])
    with pytest.raises(ValueError) as info:
        RemoteReward(slow.url, timeout=0.2).check()
    assert str(info.value) == (f"--reward_url {slow.url}: the start-up check (an empty batch) failed: no answer "
                               f"within 0.2 s")

    wrong = serve(lambda body, n: ok({"rewards": [0.0]}))
    with pytest.raises(ValueError) as info:
        RemoteReward(wrong.url).check()
    assert str(info.value) == (f"--reward_url {wrong.url}: the start-up check (an empty batch) failed: 1 rewards "
                               f"for 0 completions")


@pytest.mark.parametrize("kwargs, message", [
    (dict(url="ftp://127.0.0.1/x"), "--reward_url ftp://127.0.0.1/x: not an http:// or https:// address"),
    (dict(url="127.0.0.1:8000"), "--reward_url 127.0.0.1:8000: not an http:// or https:// address"),
    (dict(url="http://127.0.0.1/", timeout=0), "--reward_url_timeout 0: must be a positive number of seconds"),
    (dict(url="http://127.0.0.1/", retries=-1), "--reward_url_retries -1: must be 0 or more"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError) as info:
        RemoteReward(**kwargs)
    assert str(info.value) == message


def test_the_example_server_scores_by_the_answer_column(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_DS_REWARD_API_KEY", "k")  # the server (its environment) and the client both read it
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "reward_server_example.py"), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "reward server on" in server.stdout.readline()  # listening once it prints
        reward = RemoteReward(f"http://127.0.0.1:{port}/")
        reward.check()
        rewards = reward(["q1", "q2", [{"role": "user", "content": "q3"}], "q4"],
                         ["so it is 1,234", "<answer>7</answer> or 8", [{"role": "assistant", "content": "42"}], "9"],
                         answer=["1234", "7", "42", None])
        assert rewards == [1.0, 0.0, 1.0, None]  # last number right, last number 8 not 7, chat right, no answer
        with pytest.raises(RewardServerError, match="HTTP 401"):
            RemoteReward(f"http://127.0.0.1:{port}/", api_key="wrong")(["q"], ["1"], answer=["1"])
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_loopback_scorer_is_reached_past_an_http_proxy(serve, monkeypatch):
    """Where http_proxy is set (many clusters), urllib would send even 127.0.0.1 to the proxy: here a dead one."""
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    scorer = serve(lengths)
    assert RemoteReward(scorer.url, retries=0)(["a"], ["xyz"]) == [3.0]
