"""grpo_ds: GRPO (Group Relative Policy Optimization) for math reasoning on DeepSpeed ZeRO-2/3."""

__version__ = "0.1.0"
