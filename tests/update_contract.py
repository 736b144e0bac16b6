"""One rank of the normalization-contract test (tests/test_update.py): the same 8-row experience is updated once,
by however many ranks this launch has, each taking its contiguous share of the rows; rank 0 writes the weights after
the update and the reported gradient norm, for every loss type (VARIANTS)."""

import json
import sys
from pathlib import Path

import torch

from grpo_ds import distributed
from grpo_ds.config import LOSS_TYPES
from grpo_ds.experience import Experience
from grpo_ds.logprobs import completion_logprobs
from grpo_ds.loss import GRPOLoss
from grpo_ds.models import load_model
from grpo_ds.trainer import UpdatePlan, update

N, G, P, C, MICRO = 8, 4, 6, 5, 2
CISPO_CAP = 1.1  # cispo's clip_eps_high: the cap on its detached importance weight (some of the ratios exceed it)
# every loss type of the config, and GSPO (grpo with one importance ratio per sequence)
VARIANTS = {**{t: dict(loss_type=t) for t in LOSS_TYPES}, "gspo": dict(loss_type="grpo",
                                                                        importance_sampling_level="sequence")}
VARIANTS["cispo"]["clip_eps_high"] = CISPO_CAP


def experience(model) -> Experience:
    """2 prompts x 4 completions of varied lengths; old and reference log-probs near the model's own, so that some
    ratios leave the clip range and the KL is not zero."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = torch.randint(3, vocab, (2, P), generator=g)
    prompt_mask = torch.ones(2, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # the second prompt is left-padded
    lengths = torch.tensor([5, 3, 1, 4, 2, 5, 3, 4])
    completion_mask = (torch.arange(C).unsqueeze(0) < lengths.unsqueeze(1)).long()
    sequences = torch.cat([prompts.repeat_interleave(G, dim=0), torch.randint(3, vocab, (N, C), generator=g)], 1)
    attention = torch.cat([prompt_mask.repeat_interleave(G, dim=0), completion_mask], dim=1)
    with torch.no_grad():
        current = completion_logprobs(model, sequences, attention, C)
    advantages = torch.tensor([1.2, -0.4, -1.0, 0.2, 0.9, -0.9, 0.5, -0.5])
    old = current + 0.3 * torch.randn(N, C, generator=g)
    ref = current + 0.2 * torch.randn(N, C, generator=g)
    return Experience(sequences, attention, completion_mask, torch.zeros(N), advantages, old_logprobs_NC=old,
                      ref_logprobs_NC=ref)


def main() -> int:
    model_path, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][:2]
    out = Path(out)
    rank, world = distributed.init_distributed()
    share = N // world
    results = {}
    for loss_type, options in VARIANTS.items():
        import deepspeed

        torch.manual_seed(0)
        model = load_model(model_path, torch.float32)
        rows = experience(model).select(torch.arange(rank * share, (rank + 1) * share))
        ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": share // MICRO,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "steps_per_print": 10 ** 9}
        # plain SGD at lr 1: the weight change is exactly minus the gradient, so any error in its scale shows
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
        plan = UpdatePlan(micro_batch_size=MICRO, accumulation=share // MICRO, epochs=1, world_size=world,
                          max_new_tokens=C, temperature=1.0, group_size=G)
        stats = update(engine, rows, GRPOLoss(clip_eps=0.2, kl_weight=0.1, **options), plan)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()},
                       out / f"weights_{loss_type}_{world}.pt")
            results[loss_type] = {"grad_norms": stats.grad_norms, "finite_steps": stats.finite_steps,
                                  "num_tokens": stats.num_tokens, "clipped_tokens": stats.clipped_tokens}
        engine.destroy()
    if rank == 0:
        (out / f"stats_{world}.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(distributed.run(main))
