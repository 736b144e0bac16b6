"""One rank of the reward-model tests (tests/test_reward_model.py): a RewardModel partitioned ZeRO-3 over however many
ranks this launch has scores this rank's share of ITEMS, twice (shares of equal size, then of unequal size, so that
the ranks run different numbers of micro-batches); each rank writes its scores and how much of the model it holds. Arguments: model folder, output folder, and "offload"
(the partitions in CPU memory, --reward_model_offload) or "device"."""

import json
import sys
from pathlib import Path

from grpo_ds import distributed
from grpo_ds.reward_model import RewardModel

MICRO, MAX_LENGTH = 2, 64
LONG = "count the apples, then the pears, then add them and say how many there are in all. " * 2
# (prompt, completion): string prompts with text completions, chat prompts with chat completions, varied lengths;
# the fourth is longer than MAX_LENGTH tokens once rendered
ITEMS = [
    ("what is 2+3?", "5"),
    ("what is 2+3?", "<answer>6</answer>"),
    ([{"role": "user", "content": "name a color."}], [{"role": "assistant", "content": "red"}]),
    (LONG, "seven"),
    ([{"role": "system", "content": "be brief."}, {"role": "user", "content": "1+1?"}],
     [{"role": "assistant", "content": "2, i think, or maybe 3"}]),
    ("why?", "because."),
    ("what is 9*9?", "81"),
    ([{"role": "user", "content": "say hi"}], [{"role": "assistant", "content": "hi!"}]),
]
# rank -> [start, stop) of ITEMS, for 1 and 2 ranks
SHARES = {"equal": {1: [(0, 8)], 2: [(0, 4), (4, 8)]}, "unequal": {1: [(0, 8)], 2: [(0, 5), (5, 8)]}}


def main() -> int:
    model_path, out, offload = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][:3]
    rank, world = distributed.init_distributed()
    # as the trainer's policy config would be after build_ds_config; threshold 0 so that even the tiny model's
    # parameters are partitioned
    policy_ds = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": False},
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    scorer = RewardModel(model_path, distributed.reward_model_ds_config(policy_ds, offload=offload == "offload"), micro_batch_size=MICRO,
                         max_length=MAX_LENGTH)
    record = {}
    for case, shares in SHARES.items():
        start, stop = shares[world][rank]
        prompts, completions = [p for p, _ in ITEMS[start:stop]], [c for _, c in ITEMS[start:stop]]
        record[case] = scorer(prompts, completions, completion_ids=None, answer=["x"] * len(prompts),
                              trainer_state=None)
    held = full = 0
    for p in scorer.engine.module.parameters():
        full += getattr(p, "ds_numel", p.numel())
        held += p.data.numel() or p.ds_tensor.numel()
    record.update(held=held, full=full, num_truncated=scorer.num_truncated)
    Path(out, f"scores_{world}_{offload}_{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(distributed.run(main))
