"""Reward models and remote scorers wired into training: each drives a 2-rank run whose logged rewards are what the
model or the server returns for those completions; a dead URL or a wrong head is refused before any model loads;
a scorer that stops answering mid-run ends the run with one line and loses no checkpoint."""

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from grpo_ds import checkpoint
from helpers import ROOT, TINY_FLAGS, free_port, records, run, zero_config
from test_reward_model import build_classifier

sys.path.insert(0, str(ROOT / "tests"))
from learnable import sevens_dense  # noqa: E402

def with_reward(spec: str) -> list:
    flags = list(TINY_FLAGS)
    flags[flags.index("--reward") + 1] = spec
    return flags


def logged(out: Path) -> list:
    return [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]


def rm_score(model, tokenizer, question: str, completion: str) -> float:
    """The reward model's score by hand: the conversation through its own chat template, one plain forward."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": completion}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item()


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_a_reward_model_drives_a_two_rank_run(tmp_path, tiny_model, ds_config):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = build_classifier(tmp_path / "rm")
    out = tmp_path / "run"
    run(["--ds_config", zero_config(tmp_path, ds_config), "--model", str(tiny_model), "--output_dir", str(out),
         "--max_steps", "2", *with_reward("model:1.0,learnable:sevens_dense:0.5"), "--reward_model", str(rm)],
        tmp_path)
    rank0, rank1 = records(out)
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
    model = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm)
    rows = logged(out)
    assert rows
    scores = [rm_score(model, tokenizer, r["question"], r["completion"]) for r in rows]
    assert len({round(s, 3) for s in scores}) > 1  # the model tells completions apart, so a mix-up would show
    for row, score in zip(rows, scores):
        assert row["reward"] == pytest.approx(score + 0.5 * sevens_dense(row["completion"], row["gold"]), abs=1e-4)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/model" in m for m in metrics)


def example_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "reward_server_example.py"), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the example reward server did not start")


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_a_remote_scorer_drives_a_two_rank_run(tmp_path, tiny_model, ds_config):
    spec = __import__("importlib.util").util.spec_from_file_location("example_server",
                                                                      ROOT / "scripts" / "reward_server_example.py")
    server_module = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(server_module)
    port = free_port()
    server = example_server(port)
    try:
        out = tmp_path / "run"
        run(["--ds_config", zero_config(tmp_path, ds_config), "--model", str(tiny_model), "--output_dir", str(out),
             "--max_steps", "2", *with_reward("remote:1.0,learnable:sevens_dense:0.5"),
             "--reward_url", f"http://127.0.0.1:{port}/"], tmp_path)
    finally:
        server.kill()
    rows = logged(out)
    assert rows and any(server_module.score(r["question"], r["completion"], {"answer": r["gold"]}) is not None
                        for r in rows)
    for row in rows:
        expected = server_module.score(row["question"], row["completion"], {"answer": row["gold"]})
        assert row["reward"] == pytest.approx(expected + 0.5 * sevens_dense(row["completion"], row["gold"]))


def test_a_dead_url_is_refused_before_any_model(monkeypatch, tmp_path, tiny_model):
    from grpo_ds import distributed
    from grpo_ds.config import Config
    from grpo_ds.trainer import train

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "init_policy", lambda *a, **k: pytest.fail("a model loaded first"))
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/"
    with pytest.raises(ValueError) as info:
        train(Config(model=str(tiny_model), output_dir=str(tmp_path / "run"), max_steps=1, rollouts_per_step=2,
                     group_size=2, train_batch_size=2, reward="remote", reward_url=url, reward_url_timeout=2.0))
    assert str(info.value).startswith(f"--reward_url {url}: the start-up check (an empty batch) failed: cannot "
                                      f"connect") and "\n" not in str(info.value)


def test_a_reward_model_with_the_wrong_head_is_refused_before_any_model(refuse, tiny_model):
    refuse(f"--reward_model {tiny_model}: a causal LM (LlamaForCausalLM), not a sequence classifier with one label; "
           f"a reward model is a ...ForSequenceClassification checkpoint with num_labels 1", reward="model",
           reward_model=str(tiny_model))


class Flaky(BaseHTTPRequestHandler):
    """Answers the start-up check and the first two batches (step 1 on both ranks), then never answers in time."""
    answered = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["completions"]:
            Flaky.answered += 1
            if Flaky.answered > 2:
                time.sleep(5)  # past the run's 1 s timeout
                return
        data = json.dumps({"rewards": [float(len(str(c))) for c in body["completions"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_scorer_that_stops_answering_ends_the_run_and_keeps_its_checkpoint(tmp_path, tiny_model):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = tmp_path / "run"
        proc = run(["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "4", "--save_steps", "1",
                    *with_reward("remote:1.0,learnable:sevens_dense:1.0"),
                    "--reward_url", f"http://127.0.0.1:{server.server_address[1]}/", "--reward_url_timeout", "1",
                    "--reward_url_retries", "0"], tmp_path, expect=2)
    finally:
        server.shutdown()
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error and "--reward_url" in error[0] and "stopped at step 2" in error[0], proc.stderr[-2000:]
    latest = checkpoint.latest_checkpoint(str(out))
    assert latest is not None and latest.name.endswith("1")  # step 1's checkpoint, whole
    assert checkpoint.read_state(latest)["step"] == 1
