"""LoRA through peft on 2 CPU ranks (ZeRO-2 and ZeRO-3) and 1 process: only the adapters train, the reference is
the policy with its adapters off (no second engine), checkpoints hold the adapters and resume exactly, final/ is a
merged model that plain transformers loads, final_adapter/ a peft folder that evaluation accepts, and bad LoRA
input is refused before any model loads."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo_ds import checkpoint
from helpers import TINY_FLAGS, load_script, records, run, zero_config

pytestmark = pytest.mark.slow

LORA = ["--lora_r", "4", "--lora_alpha", "8"]


def metrics(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logits(path, ids=torch.arange(1, 20).unsqueeze(0)):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path)(ids).logits


def assert_reference_is_the_base_model(reference: dict, base_path) -> None:
    """The reference log-probs a step used (tests/run_train.py records them with their rows) equal the base model's
    own, computed here with plain transformers: a log-softmax of its logits at each completion token."""
    seq, att = torch.tensor(reference["sequences"]), torch.tensor(reference["attention_mask"])
    mask = torch.tensor(reference["completion_mask"]).bool()
    c = mask.shape[1]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        out = base(input_ids=seq, attention_mask=att, position_ids=(att.cumsum(dim=1) - 1).clamp(min=0)).logits
    expected = torch.log_softmax(out[:, -c - 1:-1].float(), dim=-1).gather(-1, seq[:, -c:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(reference["logprobs"])[mask], expected[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_lora_trains_the_adapters_only_and_resumes_exactly(tmp_path, tiny_model, ds_config):
    flags = ["--ds_config", zero_config(tmp_path, ds_config), "--model", str(tiny_model), *TINY_FLAGS, *LORA,
             "--save_steps", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run([*flags, "--output_dir", str(straight), "--max_steps", "4"], tmp_path)
    rank0, rank1 = records(straight)
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
    assert len({r["fingerprint"] for r in rank0}) == 4  # the adapters move every step
    assert rank0[0]["reference_full"] == 0  # no reference engine: the base is the policy with adapters off
    # ...and that is the base model itself, also after the adapters moved (step 1 starts with B = 0, base = policy)
    for row in (rank0[-1], rank1[-1]):
        assert_reference_is_the_base_model(row["reference"], tiny_model)
    assert all(r["metrics"]["kl"] is not None for r in rank0[1:]) and rank0[-1]["metrics"]["kl"] > 0

    # the checkpoint holds the adapters (and their optimizer state) only
    ckpt = checkpoint.latest_checkpoint(str(straight))
    states = torch.load(next(ckpt.glob("*model_states.pt")), weights_only=False)["module"]
    assert states and all("lora_" in key for key in states), sorted(states)[:5]

    run([*flags, "--output_dir", str(split), "--max_steps", "2"], tmp_path)
    run([*flags, "--output_dir", str(split), "--max_steps", "4", "--resume_from", "latest"], tmp_path)
    for row_a, row_b in zip(metrics(straight), metrics(split)):
        for key in ("loss", "reward_mean", "kl", "grad_norm"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-7), (row_a["step"], key)
    assert records(split)[0][-1]["fingerprint"] == pytest.approx(rank0[-1]["fingerprint"], rel=1e-6)

    # final/ is the merged model (plain transformers), final_adapter/ the same weights as base + adapter
    from peft import PeftModel

    merged = logits(straight / "final")
    assert not torch.allclose(merged, logits(tiny_model))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    adapter = json.loads((straight / "final_adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model) and adapter["r"] == 4
    with torch.no_grad():
        via_peft = PeftModel.from_pretrained(base, straight / "final_adapter").merge_and_unload()(
            torch.arange(1, 20).unsqueeze(0)).logits
    torch.testing.assert_close(via_peft, merged, rtol=1e-5, atol=1e-5)
    # a DeepSpeed LoRA checkpoint exports (merged into its base) to the same model
    rebuilt = checkpoint.export_checkpoint(str(straight / "checkpoints"), str(tmp_path / "rebuilt"),
                                           resolve_base=str)
    torch.testing.assert_close(logits(rebuilt), merged, rtol=1e-5, atol=1e-5)


def test_lora_in_one_process_and_evaluation_of_the_adapter(tmp_path, tiny_model):
    out = tmp_path / "run"
    run(["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0",
         *TINY_FLAGS, *LORA], tmp_path, nprocs=1)
    eval_script = load_script("eval")
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "7"}) + "\n" for q in ("what is 3+4?", "7 or 8?")))
    for model, name in ((out / "final", "merged"), (out / "final_adapter", "adapter")):
        assert eval_script.main([str(model), "--data", str(data), "--max_new_tokens", "8",
                                 "--output_dir", str(tmp_path / name)]) == 0
    completions = [[json.loads(line)["completion"] for line in (tmp_path / name / "predictions.jsonl").open()]
                   for name in ("merged", "adapter")]
    assert completions[0] == completions[1]


@pytest.mark.parametrize("overrides, message", [
    (dict(lora_r=-1), "--lora_r -1: must be >= 0 (0: no LoRA, full fine-tuning)"),
    (dict(lora_alpha=16.0), "--lora_alpha 16.0: has no effect without --lora_r (the LoRA rank; 0 means full "
                            "fine-tuning)"),
    (dict(lora_r=4, lora_target_modules="q_proj,wq"), "--lora_target_modules q_proj,wq: the model has no linear "
                                                       "layer named 'wq'; its block layers are down_proj, gate_proj, "
                                                       "k_proj, o_proj, q_proj, up_proj, v_proj"),
])
def test_bad_lora_input_is_refused_before_any_model_loads(refuse, overrides, message):
    refuse(message, **overrides)


def test_resuming_across_lora_and_full_fine_tuning_is_refused(tmp_path, tiny_model):
    out = tmp_path / "run"
    flags = ["--model", str(tiny_model), "--output_dir", str(out), "--max_steps", "1", "--save_steps", "1",
             *TINY_FLAGS]
    run([*flags, *LORA], tmp_path, nprocs=1)
    proc = run([*flags, "--max_steps", "2", "--resume_from", "latest"], tmp_path, nprocs=1, expect=2)
    assert "--lora_r 0: the checkpoint" in proc.stderr and "holds LoRA adapters (rank 4); add --lora_r 4" in proc.stderr
    full = tmp_path / "full"
    run([*flags[:2], "--output_dir", str(full), *flags[4:]], tmp_path, nprocs=1)
    proc = run([*flags[:2], "--output_dir", str(full), *flags[4:], "--max_steps", "2", "--resume_from", "latest",
                *LORA], tmp_path, nprocs=1, expect=2)
    assert "holds a full fine-tune; drop --lora_r" in proc.stderr
