"""The trainer as the tests run it, under the deepspeed launcher or plain python: train, record after every step
each rank's weight fingerprint, how much of the reference it holds, and what spy() sees (whole-policy gathers for
generation, the held-out evaluation's completions, the trained groups' rewards, the reference log-probs), and
inject the fault named by GRPO_DS_TEST_FAULT (test code only; the package has no fault hooks):

- nan_rank1_step2: rank 1's loss is NaN in step 2 only (the other rank's is finite)
- nan_always:      every loss is NaN
- disk_full_save2: the second checkpoint's writes fail with ENOSPC
- kill_in_save2:   the process is SIGKILLed in the middle of writing the second checkpoint
- sigterm_mid_step3: rank 0 receives SIGTERM while step 3 generates (a preemption in the middle of a step)
- trainer_temperature_1: the update scores log-probs at temperature 1 whatever --temperature says (a sampler/trainer
  mismatch, the bug the sampling/* metrics exist to show)
- lose_rank{R}_in_{PHASE}_step{N}:   rank R is SIGKILLed in PHASE (rollout, reference, update, eval, save: in the
                                     middle of its checkpoint files) of step N, as a crashed process or node is
- vanish_rank{R}_in_{PHASE}_step{N}: rank R stops there (SIGSTOP) with its connections open, as a node that drops
                                     off the network or a hung GPU does; the test kills it afterwards
  Either writes the time it happened to OUTPUT_DIR/fault_at first.
- slow_conversion: converting a checkpoint to a universal one takes 65 s longer (a large checkpoint)
- scripted_tool_calls: the model's tool calls are scripted (a tiny random model cannot write one): every turn calls
  the environment's `increment` with a step read from the turn's text (1 to 3), and a turn whose text has a length
  divisible by 4 also calls an unknown tool (an error the model is told about); and turns end sooner: every loaded
  model's EOS logit is raised by 2.5 (the same model for sampling and training)

Each record also lists the questions of every global batch the step drew from the data order. With
GRPO_DS_TEST_DUMP_STEP=N, rank 0 saves the full fp32 weights and AdamW moments of every trained parameter, gathered by
DeepSpeed (safe_get_full_*), to OUTPUT_DIR/full_state_stepN.pt after step N, and to full_state_loaded.pt right
after a resume has loaded its checkpoint.
"""

import errno
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # for the learnable reward module

from grpo_ds import checkpoint as ckpt  # noqa: E402
from grpo_ds import distributed  # noqa: E402
from grpo_ds import loss as loss_module  # noqa: E402
from grpo_ds import trainer  # noqa: E402
from grpo_ds.config import parse_args  # noqa: E402
from grpo_ds.trainer import NonFiniteError, Preempted, train  # noqa: E402

FAULT = os.environ.get("GRPO_DS_TEST_FAULT", "")


def lose_rank(output_dir: str) -> None:
    """The lose_/vanish_ faults: wrap the phase's function (or, for save, torch.save into a staging folder)."""
    match = re.fullmatch(r"(lose|vanish)_rank(\d+)_in_(\w+)_step(\d+)", FAULT)
    if not match:
        return
    how, victim, phase, at_step = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
    step = [0]  # the step under way (a step's checkpoint is written after on_step_end has run)

    def fault() -> None:
        if step[0] != at_step or torch.distributed.get_rank() != victim:
            return
        Path(output_dir, "fault_at").write_text(str(time.time()))
        print(f"fault: rank {victim} {'killed' if how == 'lose' else 'stopped'} in {phase} of step {at_step}",
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL if how == "lose" else signal.SIGSTOP)

    real_rollout = trainer.rollout

    def rollout(run, step_, *args, **kwargs):
        step[0] = step_
        if phase == "rollout":
            fault()
        return real_rollout(run, step_, *args, **kwargs)

    trainer.rollout = rollout
    if phase == "save":
        original_save = torch.save

        def faulty_save(obj, f, *args, **kwargs):
            result = original_save(obj, f, *args, **kwargs)
            if ".staging-" in str(f):  # some of this rank's checkpoint files are written, then it is gone
                fault()
            return result

        torch.save = faulty_save
    elif phase != "rollout":
        name = {"reference": "make_experience", "update": "update", "eval": "evaluate_policy"}[phase]
        original = getattr(trainer, name)

        def faulty(*args, **kwargs):
            fault()
            return original(*args, **kwargs)

        setattr(trainer, name, faulty)


def inject_faults(current_step: list) -> None:
    if FAULT == "trainer_temperature_1":
        import dataclasses

        real_plan = trainer.Run.update_plan
        trainer.Run.update_plan = lambda self, step: dataclasses.replace(real_plan(self, step), temperature=1.0)
    if FAULT == "sigterm_mid_step3":
        real_generate = trainer.generate

        def interrupted(*args, **kwargs):
            if current_step[0] == 3 and torch.distributed.get_rank() == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_generate(*args, **kwargs)

        trainer.generate = interrupted
    if FAULT == "scripted_tool_calls":
        from grpo_ds.tools import ToolCall, Toolbox

        real_session = Toolbox.session

        def scripted(text):
            calls = [ToolCall("increment", {"step": len(text) % 3 + 1})]
            return calls + ([ToolCall("nosuch", {})] if len(text) % 4 == 0 else [])

        Toolbox.session = lambda self, columns, fmt, parser=None: real_session(self, columns, fmt, scripted)
        real_load_model = trainer.load_model

        def load_with_eos_bias(*args, **kwargs):
            model = real_load_model(*args, **kwargs)
            eos = model.config.eos_token_id

            def raise_eos(module, inputs, logits):
                bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
                bias[eos] = 2.5
                return logits + bias

            model.get_output_embeddings().register_forward_hook(raise_eos)
            return model

        trainer.load_model = load_with_eos_bias
    if FAULT == "slow_conversion":
        real_convert = ckpt.convert_to_universal

        def slow_convert(*args, **kwargs):
            time.sleep(65)
            return real_convert(*args, **kwargs)

        ckpt.convert_to_universal = slow_convert
    if FAULT.startswith("nan"):
        original = loss_module.GRPOLoss.__call__

        def nan_loss(self, *args, **kwargs):
            loss, stats = original(self, *args, **kwargs)
            if FAULT == "nan_always" or (current_step[0] == 2 and torch.distributed.get_rank() == 1):
                loss = loss * float("nan")
            return loss, stats

        loss_module.GRPOLoss.__call__ = nan_loss
    if FAULT in ("disk_full_save2", "kill_in_save2"):
        original_save = torch.save
        saves = {"started": 0}
        original_ckpt_save = ckpt.save

        def counting_save(*args, **kwargs):
            saves["started"] += 1
            return original_ckpt_save(*args, **kwargs)

        def failing_torch_save(obj, f, *args, **kwargs):
            if saves["started"] == 2 and ".staging-" in str(f):
                if FAULT == "disk_full_save2":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
                original_save(obj, f, *args, **kwargs)  # some files written, then the machine dies
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(obj, f, *args, **kwargs)

        ckpt.save = counting_save
        torch.save = failing_torch_save


def full_state(engine) -> dict:
    """Every trained parameter's fp32 weights and AdamW moments, gathered whole by DeepSpeed (all ranks call)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = {name: {"fp32": safe_get_full_fp32_param(p).cpu(),
                     **{key: safe_get_full_optimizer_state(p, key).cpu() for key in ("exp_avg", "exp_avg_sq")}}
              for name, p in engine.module.named_parameters() if p.requires_grad}
    adam_steps = sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s})
    return {"params": params, "adam_steps": adam_steps, "global_steps": engine.global_steps,
            "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None}


def record_dumps(output_dir: str) -> None:
    original_load = ckpt.load

    def load_and_dump(engine, path):
        state = original_load(engine, path)
        dump = full_state(engine)
        if torch.distributed.get_rank() == 0:
            torch.save(dump, Path(output_dir, "full_state_loaded.pt"))
        return state

    ckpt.load = load_and_dump

def spy() -> dict:
    """Count DeepSpeed's whole-model gathers for generation (what distributed.gathered_for_generation enters under
    ZeRO-3); keep each evaluation's completions, the rewards of the groups the step trained on, and the step's
    reference log-probs with the rows they score."""
    import deepspeed.runtime.zero

    seen = {"full_gathers": 0, "eval_completions": None, "trained_rewards": None, "reference": None,
            "linear_without_backward": set()}
    real_unwrap, real_evaluate = deepspeed.runtime.zero.unwrap_model_for_generation, trainer.evaluate
    real_make_experience, real_logprob_passes = trainer.make_experience, trainer.logprob_passes

    def recording_make_experience(run, groups, *args, **kwargs):
        seen["trained_rewards"] = groups.rewards_BG.tolist()
        return real_make_experience(run, groups, *args, **kwargs)

    def recording_logprob_passes(run, experience, *args, **kwargs):
        ref, old = real_logprob_passes(run, experience, *args, **kwargs)
        if ref is not None:
            seen["reference"] = {"sequences": experience.sequences_NT.tolist(),
                                 "attention_mask": experience.attention_mask_NT.tolist(),
                                 "completion_mask": experience.completion_mask_NC.tolist(),
                                 "logprobs": ref.tolist()}
        return ref, old

    def noting_linear(fn, only_without_grad):  # which F.linear the passes without a backward run: torch's (True)
        def noted(*args, **kwargs):
            if not (only_without_grad and torch.is_grad_enabled()):  # not the training pass
                seen["linear_without_backward"].add(torch.nn.functional.linear is torch._C._nn.linear)
            return fn(*args, **kwargs)
        return noted

    def counting_unwrap(*args, **kwargs):
        seen["full_gathers"] += 1
        return real_unwrap(*args, **kwargs)

    def recording_evaluate(*args, **kwargs):
        summary, rows = real_evaluate(*args, **kwargs)
        seen["eval_completions"] = [row["completion"] for row in rows]
        return summary, rows

    deepspeed.runtime.zero.unwrap_model_for_generation = counting_unwrap
    trainer.evaluate = recording_evaluate
    trainer.make_experience = recording_make_experience
    trainer.logprob_passes = recording_logprob_passes
    trainer.generate = noting_linear(trainer.generate, only_without_grad=False)
    trainer.completion_logprobs = noting_linear(trainer.completion_logprobs, only_without_grad=True)
    return seen


def main() -> int:
    cfg = parse_args()
    records, current_step, drawn = [], [1], []
    inject_faults(current_step)
    lose_rank(cfg.output_dir)
    dump_step = int(os.environ.get("GRPO_DS_TEST_DUMP_STEP", "0"))
    if dump_step:
        record_dumps(cfg.output_dir)
    next_batch = trainer.PromptSampler.next_batch

    def recorded_batch(self, batch_size):
        batch = next_batch(self, batch_size)
        drawn.append([p.question for p in batch])
        return batch

    trainer.PromptSampler.next_batch = recorded_batch
    seen = spy()

    def on_step_end(step, policy, reference, metrics):
        held = full = 0
        for p in (reference.module.parameters() if reference is not None else []):
            full += getattr(p, "ds_numel", p.numel())
            # a partitioned ZeRO-3 parameter's data is empty and its shard lives in ds_tensor; a persistent or
            # replicated one holds all of its data
            held += p.data.numel() or p.ds_tensor.numel()
        records.append({"step": step, "fingerprint": float(distributed.weights_fingerprint(policy)),
                        "reference_held": held, "reference_full": full, "metrics": metrics, "drawn": list(drawn),
                        # DeepSpeed's ZeRO-3 engines may replace F.linear process-wide with a slower autograd
                        # Function (memory_efficient_linear): is torch's own still in place?
                        "torch_linear": torch.nn.functional.linear is torch._C._nn.linear,
                        "linear_without_backward": sorted(seen["linear_without_backward"]),
                        "full_gathers": seen["full_gathers"], "eval_completions": seen["eval_completions"],
                        "trained_rewards": seen["trained_rewards"], "reference": seen["reference"]})
        drawn.clear()
        seen.update(eval_completions=None, trained_rewards=None, reference=None, linear_without_backward=set())
        if step == dump_step:
            dump = full_state(policy)
            if torch.distributed.get_rank() == 0:
                torch.save(dump, Path(cfg.output_dir, f"full_state_step{step}.pt"))
        current_step[0] = step + 1

    code = 0
    try:
        train(cfg, on_step_end=on_step_end)
    except Preempted as err:
        print(f"preempted: {err}", flush=True)
        code = 143
    except NonFiniteError as err:
        print(f"non-finite: {err}", flush=True)
        code = 3
    except ValueError as err:  # bad input, as scripts/train.py reports it
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    rank = torch.distributed.get_rank()
    Path(cfg.output_dir, f"rank{rank}.json").write_text(json.dumps(records))
    return code


if __name__ == "__main__":
    sys.exit(distributed.run(main))
