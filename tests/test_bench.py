"""scripts/bench.py end to end on the tiny model: the figures it reports are consistent with the run's own rows."""

import json
import statistics
import subprocess
import sys

import pytest

from helpers import ROOT, environment

pytestmark = pytest.mark.slow


def test_bench_reports_medians_of_the_measured_steps(tmp_path, tiny_model):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--model", str(tiny_model), "--steps", "3",
         "--warmup", "1", "--fixed_length", "true", "--max_new_tokens", "10", "--rollouts_per_step", "2",
         "--group_size", "4", "--train_batch_size", "4", "--output_dir", str(out)],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    steps = result["steps"]
    assert [s["step"] for s in steps] == [2, 3, 4]  # the warm-up step is not measured
    # fixed length: EOS suppressed, every completion exactly max_new_tokens long
    assert all(s["completion_len_mean"] == 10 and s["truncated_frac"] == 1.0 for s in steps)
    assert result["median"]["step_s"] == statistics.median(s["step_s"] for s in steps)
    assert result["completions_per_s"] == pytest.approx(8 / result["median"]["step_s"])
    assert result["completion_tokens_per_s"] == pytest.approx(80 / result["median"]["step_s"])
    assert len(result["peak_memory_gib_per_rank"]) == 1 and result["peak_memory_gib_per_rank"][0] > 0.1
    assert "completions/s (end to end)" in proc.stdout


def test_trl_side_gets_grpo_ds_prompts_in_grpo_ds_order(tiny_model):
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_trl import build_dataset
    from transformers import AutoTokenizer

    from grpo_ds.config import Config
    from grpo_ds.data import PromptSampler, load_problems, render_prompt

    cfg = Config(model=str(tiny_model), rollouts_per_step=3, seed=7)
    rows = build_dataset(cfg, num_steps=2)
    sampler = PromptSampler(load_problems("arithmetic", "train", difficulty=cfg.difficulty, seed=7), 7)
    expected = sampler.next_batch(3) + sampler.next_batch(3)  # what the trainer takes at steps 1 and 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert [r["answer"] for r in rows] == [p.answer for p in expected]
    # TRL renders a conversational prompt with the chat template: the same text grpo_ds generates from
    assert [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows] \
        == [render_prompt(tokenizer, p.question) for p in expected]
    # and with a worked example, the same turns the trainer renders (Run.prompt)
    from grpo_ds.trainer import Run

    cfg = Config(model=str(tiny_model), rollouts_per_step=3, seed=7, system_prompt="Be brief.",
                 example_question="1 + 1?", example_answer="<answer>2</answer>")
    run = object.__new__(Run)  # only what Run.prompt reads, as setup() fills it
    run.cfg, run.tokenizer, run.example = cfg, tokenizer, cfg.example()
    trained = [run.prompt(p.question) for p in expected]
    assert all("1 + 1?" in t and "<answer>2</answer>" in t for t in trained)
    assert [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            for r in build_dataset(cfg, num_steps=2)] == trained


def test_side_by_side_with_trl_alternates_and_reports_ratios(tmp_path, tiny_model):
    out = tmp_path / "vs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--vs", "trl", "--rounds", "2", "--model",
         str(tiny_model), "--steps", "2", "--warmup", "1", "--fixed_length", "true", "--max_new_tokens", "6",
         "--rollouts_per_step", "2", "--group_size", "4", "--train_batch_size", "4", "--reward", "hash",
         "--output_dir", str(out)],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    starts = [line for line in proc.stdout.splitlines() if line.startswith("[bench] round")]
    assert starts == ["[bench] round 1/2: grpo_ds, 1 rank(s)", "[bench] round 1/2: trl, 1 rank(s)",
                      "[bench] round 2/2: trl, 1 rank(s)", "[bench] round 2/2: grpo_ds, 1 rank(s)"]
    result = json.loads((out / "bench_vs_trl.json").read_text())
    for impl in ("grpo_ds", "trl"):
        steps = [s for run in result["runs"][impl] for s in run["steps"]]
        assert len(steps) == 4  # 2 measured steps x 2 rounds, warm-ups excluded
        assert all(s["completion_len_mean"] == 6 for s in steps)  # identical fixed-length work on both sides
        assert result["median"][impl]["step_s"] == statistics.median(s["step_s"] for s in steps)
    assert result["runs"]["trl"][0]["settings"]["kl_weight"] == result["runs"]["grpo_ds"][0]["settings"]["kl_weight"]
    ratio = result["ratio_trl_over_grpo_ds"]
    assert ratio["step_s"] == pytest.approx(result["median"]["trl"]["step_s"] / result["median"]["grpo_ds"]["step_s"])
    assert ratio["completions_per_s"] == pytest.approx(ratio["step_s"])
    assert "TRL/grpo_ds" in proc.stdout


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path, tiny_model):
    """The GPU check is run on lent GPUs only; here its whole path runs on the CPU with a tiny architecture, so the
    script is known to work before a GPU is spent on it: both engines, both ZeRO stages, the rollout-only shape."""
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--arch", str(tiny_model / "config.json"),
         "--tokenizer", str(tiny_model), "--stages", "2,3", "--engines", "hf,compiled", "--steps", "1", "--warmup", "0",
         "--rollouts_per_step", "2", "--group_size", "2", "--max_new_tokens", "6", "--train_batch_size", "4",
         "--rollout_only", "2x2x6", "--rollout_repeats", "1", "--out", str(out)],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(s["zero_stage"], s["engine"], s["exit_code"]) for s in report["stages"]] == [
        (2, "hf", 0), (2, "compiled", 0), (3, "hf", 0), (3, "compiled", 0)]
    assert all(s["median"]["completion_len_mean"] == 6 for s in report["stages"])
    assert [r["engine"] for r in report["rollout_only"]] == ["hf", "compiled"]
    assert all(r["rows"] == 4 and r["tokens_per_s"] > 0 for r in report["rollout_only"])


def test_bench_layers_config_files_and_the_recipe_as_train_does(tmp_path):
    # bench.py used to build its Config from argparse defaults alone: --config FILE was accepted and ignored, so a
    # "benchmark of the recipe" ran 32 x 12 completions of 512 tokens instead of the recipe's 4 x 8 of 48
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import bench_config, bench_parser

    from grpo_ds.config import parse_args

    def config_of(argv):
        args = vars(bench_parser().parse_args(argv))
        for own in ("steps", "warmup", "json", "local_rank"):
            args.pop(own)
        return bench_config(args, "runs/bench", max_steps=3)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_new_tokens: 48\ntemperature: 0.7\nsave_steps: 20\ngroup_size: 6\neval_steps: 10\n")
    cfg = config_of(["--config", str(recipe), "--temperature", "0.9", "--dataset", "problems.jsonl"])
    assert cfg.max_new_tokens == 48 and cfg.group_size == 6  # from the file
    assert cfg.temperature == 0.9  # the command line over the file
    assert cfg.save_steps == 0 and cfg.log_completions_steps == 0 and cfg.eval_steps == 0  # the benchmark's own
    assert cfg.max_steps == 3 and cfg.output_dir == "runs/bench"

    # the embedded model on the built-in problems: the same recipe as scripts/train.py with the same flags
    bench, train = config_of(["--rollout_engine", "hf"]), parse_args(["--rollout_engine", "hf"])
    assert bench.config == train.config and bench.config.endswith("smollm2_arithmetic.yaml")
    for name in ("system_prompt", "response_prefix", "reward", "max_new_tokens", "rollouts_per_step", "group_size",
                 "train_batch_size", "lr", "kl_weight", "temperature", "rollout_engine"):
        assert getattr(bench, name) == getattr(train, name), name


def test_bench_decode_counts_every_linear_layer_of_a_decode_step(tiny_model):
    """The decode step's FLOPs come from these shapes: hidden 32, 2 key-value heads of 8, MLP 64, 2 layers, and the
    tied output head (a Linear sharing the embedding), counted once."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_decode import linear_shapes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    per_layer = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]  # q k v o gate up down
    assert sorted(linear_shapes(model)) == sorted(per_layer * 2 + [(32, model.config.vocab_size)])


def test_bench_decode_runs_every_engine(tmp_path, tiny_model):
    out = tmp_path / "decode.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_decode.py"), "--model", str(tiny_model), "--rows", "4",
         "--group_size", "2", "--prompt_tokens", "12", "--tokens", "4", "12", "--repeats", "1", "--json", str(out),
         "--engine", "hf", "static", "compiled"],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["engines"]) == {"hf", "static", "compiled"}
    # Eager engines compile nothing; the compiled one compiled its decode step (rows 4, one cache, one window).
    assert result["engines"]["hf"]["engine_compiles"] == result["engines"]["static"]["engine_compiles"] == 0
    assert result["engines"]["compiled"]["engine_compiles"] >= 1
    assert result["streamed_linear_s"] > 0 and result["multinomial_noise_s"] > 0
    for r in result["engines"].values():
        # No sign asserted: a step is the difference of two timings, which a busy machine can invert.
        assert r["tokens_per_s"] == pytest.approx(4 / (r["decode_step_ms"] / 1e3))
        floor_ms = (result["streamed_linear_s"] + result["multinomial_noise_s"]) * 1e3
        assert r["fraction_of_floor"] == pytest.approx(floor_ms / r["decode_step_ms"])
