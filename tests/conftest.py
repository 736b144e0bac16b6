"""Shared fixtures: the tiny model, and train() refusing bad input before any model loads."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from grpo_ds import distributed  # noqa: E402
from grpo_ds.config import Config  # noqa: E402
from grpo_ds.trainer import train  # noqa: E402
from helpers import free_port  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRPO_DS_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random chat model folder (2 layers, char tokenizer, ChatML template)."""
    from helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def refuse(monkeypatch, tmp_path, tiny_model):
    """train() in this process (a world of one), with model loading forbidden: every refusal must come first."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(distributed, "init_policy", no_model)
    monkeypatch.setattr(distributed, "init_reference", no_model)

    def check(expected: str, **overrides) -> None:
        fields = dict(model=str(tiny_model), output_dir=str(tmp_path / "run"), max_steps=1, rollouts_per_step=2,
                      group_size=2, train_batch_size=2)
        fields.update(overrides)
        with pytest.raises(ValueError) as info:
            train(Config(**fields))
        assert str(info.value) == expected
        assert "\n" not in str(info.value)

    return check
