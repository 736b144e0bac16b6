"""A tiny random chat model whose greedy output depends on the prompt: tests/tiny.py's model with its weight
matrices scaled up, so that its logits are far from uniform. Built offline, in a second."""

from pathlib import Path

from tiny import build_tiny_model


def build_varied_model(path, scale: float = 20.0, seed: int = 0) -> Path:
    """tiny.py's model with every weight matrix multiplied by `scale`. At the default init (std 0.02) the tiny
    model repeats one token whatever it is asked, which would let a test of batching or sharding pass even if
    completions were attached to the wrong prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(Path(path), seed=seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(scale)
    model.save_pretrained(path)
    return path
