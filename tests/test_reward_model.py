"""The reward model as a reward term: its scores are a plain forward of the classifier on texts rendered by hand
through its own chat template, on one rank and partitioned ZeRO-3 over two (real processes); checkpoints that are not
single-output classifiers are refused before any weight loads."""

import json
import os
import signal
import subprocess

import pytest
import torch

from grpo_ds import distributed
from grpo_ds.reward_model import check_reward_model, render
from helpers import ROOT, build_tokenizer, environment, launch_command
from reward_model_worker import ITEMS, MAX_LENGTH, SHARES


def build_classifier(path, num_labels: int = 1, scale: float = 10.0):
    """A tiny random LlamaForSequenceClassification with the char tokenizer; weights scaled up so that different
    texts get clearly different scores (at the default init they all sit near 0)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return build_classifier(tmp_path_factory.mktemp("rm") / "classifier")


def by_hand(path) -> tuple[list[float], list[int]]:
    """ITEMS scored one at a time by the plain Hugging Face model: each rendered as the tokenizer's chat template
    renders the messages written out here, cut to its last MAX_LENGTH tokens, no padding. Also the token count of
    each before the cut."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    scores, lengths = [], []
    for prompt, completion in ITEMS:
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt) + (
            [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        lengths.append(len(ids))
        with torch.no_grad():
            scores.append(model(torch.tensor([ids[-MAX_LENGTH:]])).logits[0, 0].item())
    return scores, lengths


def launch(nprocs: int, model, out, where: str, timeout: float = 300) -> None:
    """The worker on `nprocs` ranks, in a session of its own: ranks out of step hang in a collective, and then the
    whole group (launcher and ranks) is killed."""
    cmd = launch_command(str(ROOT / "tests" / "reward_model_worker.py"), nprocs, [str(model), str(out), where],
                         always_launcher=True)
    proc = subprocess.Popen(cmd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{nprocs} rank(s) still running after {timeout} s (out of step?): {output[-2000:]}")
    assert proc.returncode == 0, output[-4000:]


@pytest.mark.slow
def test_scores_on_one_and_two_ranks_equal_a_plain_forward(classifier, tmp_path):
    expected, lengths = by_hand(classifier)
    num_long = sum(n > MAX_LENGTH for n in lengths)
    assert num_long == 2  # the question repeated twice, and the system-prompted chat
    # the texts really differ in score, so scores attached to the wrong completion would show
    assert min(abs(a - b) for i, a in enumerate(expected) for b in expected[i + 1:]) > 1e-3
    # one rank; two ranks with the model partitioned between them; the same with the partitions in CPU memory
    # (--reward_model_offload)
    for world, where in ((1, "device"), (2, "device"), (2, "offload")):
        launch(world, classifier, tmp_path, where)
        records = [json.loads((tmp_path / f"scores_{world}_{where}_{r}.json").read_text()) for r in range(world)]
        for case, shares in SHARES.items():
            for rank, (start, stop) in enumerate(shares[world]):
                # each rank's scores are those of its own completions, in order; "unequal" gives rank 0 three
                # micro-batches and rank 1 two, which ZeRO-3's lockstep gathering must survive
                assert records[rank][case] == pytest.approx(expected[start:stop], abs=1e-4), (world, where, case,
                                                                                             rank)
        # the long items were cut to their last MAX_LENGTH tokens (once per case, on the rank that holds them)
        assert sum(r["num_truncated"] for r in records) == 2 * num_long
        if world == 2:
            # each rank holds half of the model, not all of it (ZeRO-3 partitioning, not replication)
            full = records[0]["full"]
            assert all(r["held"] < 0.6 * full for r in records) and sum(r["held"] for r in records) >= full


def test_the_engine_config_is_zero3_like_the_partitioned_reference():
    policy = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 2, "stage3_param_persistence_threshold": 0}}
    assert distributed.reward_model_ds_config(policy) == {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
        # no memory_efficient_linear: DeepSpeed would swap F.linear process-wide for a backward never run here
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "memory_efficient_linear": False},
        "steps_per_print": 10 ** 9}
    offloaded = distributed.reward_model_ds_config({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": False},
                                                    "zero_optimization": {"stage": 3}}, offload=True)
    assert offloaded["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": False},
                                              "memory_efficient_linear": False}
    assert offloaded["bf16"] == {"enabled": False}


def test_rendering_without_a_chat_template_is_a_plain_transcript():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    assert render(tokenizer, "what is 2+2?", "4") == ("User: what is 2+2?\nAssistant: 4", True)
    chat = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hi"}]
    assert render(tokenizer, chat, [{"role": "assistant", "content": "hello"}]) == (
        "System: be brief.\nUser: hi\nAssistant: hello", True)


def test_rendering_uses_the_reward_models_own_template():
    tokenizer = build_tokenizer()  # ChatML, written out by hand below
    text, special = render(tokenizer, "what is 2+2?", "4")
    assert text == "<|im_start|>user\nwhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert special is False  # the template holds the special tokens


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any model or its weights fails the test: the checks must decide from config.json alone."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the checkpoint was checked")

    for name in ("AutoModelForSequenceClassification", "AutoModelForCausalLM", "LlamaForSequenceClassification",
                 "LlamaForCausalLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    monkeypatch.setattr(distributed, "init_reference", refuse)


def refusal(path) -> str:
    from grpo_ds.reward_model import RewardModel

    with pytest.raises(ValueError) as info:
        RewardModel(str(path), {"bf16": {"enabled": False}})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--reward_model {path}: ")
    return message


def test_a_causal_lm_is_refused_before_loading(tiny_model, no_weights):
    assert refusal(tiny_model) == (f"--reward_model {tiny_model}: a causal LM (LlamaForCausalLM), not a sequence "
                                   f"classifier with one label; a reward model is a ...ForSequenceClassification "
                                   f"checkpoint with num_labels 1")


def test_a_classifier_with_three_labels_is_refused_before_loading(tmp_path, no_weights):
    path = build_classifier(tmp_path / "three", num_labels=3)
    assert refusal(path) == (f"--reward_model {path}: a sequence classifier with 3 labels "
                             f"(LlamaForSequenceClassification), not one; a reward model is a "
                             f"...ForSequenceClassification checkpoint with num_labels 1 (the reward is its single "
                             f"logit)")


def test_missing_paths_are_refused(tmp_path, no_weights):
    assert refusal(tmp_path / "nowhere") == f"--reward_model {tmp_path / 'nowhere'}: path does not exist"
    (tmp_path / "empty").mkdir()
    assert refusal(tmp_path / "empty") == (f"--reward_model {tmp_path / 'empty'}: folder has no config.json (not a "
                                           f"Hugging Face model folder)")
    (tmp_path / "model.gguf").write_text("")
    assert refusal(tmp_path / "model.gguf") == (f"--reward_model {tmp_path / 'model.gguf'}: a file, not a Hugging "
                                                f"Face model folder or hub id")


def test_a_single_label_classifier_passes_the_check(classifier, no_weights):
    assert check_reward_model(str(classifier)) == str(classifier)


def test_chat_rendering_is_trls():
    """For chat prompts TRL renders prompt + completion messages with trl.data_utils.apply_chat_template (the text
    its GRPOTrainer feeds an nn.Module reward model): the same text here."""
    from trl.data_utils import apply_chat_template

    tokenizer = build_tokenizer()
    for prompt, completion in ITEMS:
        if isinstance(prompt, list):
            trl_text = apply_chat_template({"messages": prompt + completion}, tokenizer)["text"]
            assert render(tokenizer, prompt, completion) == (trl_text, False)
