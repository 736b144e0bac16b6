"""Tests for grpo_ds.config (defaults, CLI, validation, batch layout) and the pure DeepSpeed-config functions of
grpo_ds.distributed (build_ds_config, resolve_precision, reference_ds_config, load_ds_json)."""

import copy
import dataclasses
import json

import pytest
import torch

import yaml

from grpo_ds.config import (EMBEDDED_RECIPE, LOSS_TYPES, BatchLayout, Config, build_parser, dumps,
                            parse_args, validate)
from grpo_ds import distributed
from grpo_ds.distributed import build_ds_config, load_ds_json, reference_ds_config, resolve_precision

# ----------------------------------------------------------------------------- defaults and help


def test_defaults_are_the_tutorials():
    cfg = Config()
    assert (cfg.seed, cfg.train_batch_size, cfg.lr, cfg.kl_weight, cfg.clip_eps, cfg.group_size,
            cfg.rollouts_per_step, cfg.epochs_per_step, cfg.max_length, cfg.temperature, cfg.top_p) == (
        42, 16, 5e-6, 0.01, 0.2, 12, 32, 1, 1024, 1.0, 1.0)
    assert cfg.loss_type == "grpo" and cfg.scale_rewards == "group"
    assert cfg.clip_eps_high is None and cfg.clip_high() == 0.2
    assert cfg.gradient_accumulation_steps is None


def test_every_field_has_help():
    fields = dataclasses.fields(Config)
    assert len(fields) > 20
    for f in fields:
        text = f.metadata.get("help")
        assert isinstance(text, str) and text.strip(), f.name
    help_text = build_parser().format_help()
    for f in fields:
        assert f"--{f.name}" in help_text


def test_help_shows_the_defaults_and_the_precedence():
    """scripts/train.py --help prints the parser parse_args uses, which parses with SUPPRESS (so that --config and
    the recipe can fill what the command line leaves out); its help must still show every default, and say that a
    --config file replaces the built-in recipe."""
    import re

    help_text = " ".join(build_parser(suppress=True).format_help().split())
    for f in dataclasses.fields(Config):
        shown = getattr(Config(), f.name)
        shown = repr(shown) if shown == "" else str(shown)
        assert re.search(rf"--{f.name} \S+ .*?\(default: {re.escape(shown)}\)", help_text), f.name
    assert "(default: 5e-06)" in help_text and "(default: ==SUPPRESS==)" not in help_text
    assert "replaces the built-in recipe rather than adding to it" in help_text
    assert "(default: " not in build_parser(suppress=True).format_usage()


def test_default_config_validates_on_one_rank():
    # 32 prompts x 12 completions = 384 per rank, 384 / 16 = 24 micro-batches, all accumulated: one optimizer step
    assert validate(Config(), 1) == BatchLayout(world_size=1, prompts_per_rank=32, completions_per_rank=384,
                                                micro_batches_per_epoch=24, gradient_accumulation_steps=24,
                                                optimizer_steps_per_step=1)


# ----------------------------------------------------------------------------- CLI


def test_parse_args_no_flags_gives_defaults():
    # another model: the dataclass defaults (the tutorial's)
    assert parse_args(["--model", "some/model"]) == Config(model="some/model")
    assert parse_args(["--dataset", "openai/gsm8k"]) == Config(dataset="openai/gsm8k")


def test_the_embedded_model_on_arithmetic_takes_the_cpu_recipe():
    """With no flags (the embedded model on the built-in arithmetic problems) every setting the recipe file names
    comes from it; a flag still wins, and --config FILE replaces the recipe."""
    recipe = yaml.safe_load(EMBEDDED_RECIPE.read_text())
    assert len(recipe) >= 8, "the recipe should set the settings that learn"
    cfg = parse_args([])
    assert cfg.config == "grpo_ds/recipes/smollm2_arithmetic.yaml"
    for key, value in recipe.items():
        assert getattr(cfg, key) == value, key
    assert cfg.seed == Config().seed  # what the recipe leaves out keeps its default
    assert parse_args(["--max_steps", "3"]).max_steps == 3
    assert parse_args(["--max_steps", "3"]).lr == recipe["lr"]


def test_the_calculator_control_recipe_differs_from_the_tool_recipe_only_by_the_tool():
    """The no-tool control measures what the calculator adds, so every other setting (model, data, rewards, worked
    examples' questions and answers, training knobs) is the tool recipe's; only the tool's own settings differ."""
    recipes = EMBEDDED_RECIPE.parent
    tool = parse_args(["--config", str(recipes / "smollm2_calculator.yaml")])
    control = parse_args(["--config", str(recipes / "smollm2_calculator_no_tool.yaml")])
    assert tool.tools and not control.tools and not control.example_tool_call
    tool_only = {"config", "tools", "example_tool_call", "response_prefix", "turn_prefix", "system_prompt",
                 "max_tool_calling_iterations", "max_episode_tokens"}
    differ = {f.name for f in dataclasses.fields(Config) if getattr(tool, f.name) != getattr(control, f.name)}
    assert differ <= tool_only, differ - tool_only
    assert control.response_prefix == tool.turn_prefix  # the answer opens as the tool recipe's answer turn does
    validate(control, 2)


def test_config_file_under_flags(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("lr: 2.0e-5\ngroup_size: 6\ngradient_checkpointing: false\nresponse_prefix: \"<think>\\n\"\n"
                    "clip_eps_high: null\nmodel: some/model\n")
    cfg = parse_args(["--config", str(path), "--group_size", "4"])
    assert (cfg.lr, cfg.group_size, cfg.gradient_checkpointing, cfg.response_prefix) == (2e-5, 4, False, "<think>\n")
    assert cfg.clip_eps_high is None and cfg.config == str(path)
    assert cfg.rollouts_per_step == Config().rollouts_per_step  # neither the file nor the embedded recipe
    as_json = tmp_path / "mine.json"
    as_json.write_text(json.dumps({"lr": 2e-5, "kl_weight": 0}))
    assert (parse_args(["--config", str(as_json)]).lr, parse_args(["--config", str(as_json)]).kl_weight) == (2e-5, 0)


@pytest.mark.parametrize("text, message", [
    ("temprature: 0.7\n", "unknown field 'temprature'"),
    ("lr: fast\n", "lr: could not convert string to float: 'fast'"),
    ("gradient_checkpointing: maybe\n", "gradient_checkpointing: expected true or false"),
    ("- lr\n", "expected a mapping of flag names to values"),
    ("lr: [1\n", "not valid YAML or JSON"),
])
def test_config_file_errors_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        parse_args(["--config", str(path)])
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^--config 'nope.yaml': file not found$"):
        parse_args(["--config", "nope.yaml"])


def test_parse_args_types():
    cfg = parse_args(["--group_size", "4", "--lr", "1e-4", "--gradient_checkpointing", "false",
                      "--reference_offload", "true", "--clip_eps_high", "0.28", "--gradient_accumulation_steps",
                      "auto", "--num_problems", "100", "--run_name", "exp1", "--loss_type", "dapo",
                      "--local_rank=3"])
    assert cfg.group_size == 4 and isinstance(cfg.group_size, int)
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.gradient_checkpointing is False
    assert cfg.reference_offload is True
    assert cfg.clip_eps_high == 0.28
    assert cfg.gradient_accumulation_steps is None
    assert cfg.num_problems == 100
    assert cfg.run_name == "exp1"
    assert cfg.loss_type == "dapo"
    assert not hasattr(cfg, "local_rank")


@pytest.mark.parametrize("text,expected", [("false", False), ("False", False), ("0", False), ("no", False),
                                           ("off", False), ("true", True), ("1", True), ("yes", True),
                                           ("ON", True)])
def test_parse_args_bools(text, expected):
    assert parse_args(["--gradient_checkpointing", text]).gradient_checkpointing is expected


@pytest.mark.parametrize("text", ["none", "auto", "None", "AUTO"])
def test_parse_args_optional_none(text):
    cfg = parse_args(["--clip_eps_high", text, "--gradient_accumulation_steps", text, "--num_problems", text])
    assert cfg.clip_eps_high is None and cfg.gradient_accumulation_steps is None and cfg.num_problems is None


def changed_value(f: dataclasses.Field, default):
    """A value of the field's type that differs from its default (parse_args does not check choices)."""
    kind = str(f.type)
    if kind == "bool":
        return not default
    if kind == "int":
        return default + 3
    if kind == "float":
        return default + 0.25
    if kind == "str":
        return f"{default}_x"
    return {"Optional[int]": 7, "Optional[float]": 0.3, "Optional[str]": f"x-{f.name}"}[kind]


def flag_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_parse_args_round_trip_of_every_field():
    """A Config whose every field differs from the default survives flags -> Config."""
    default = Config()
    fields = [f for f in dataclasses.fields(Config) if f.name != "config"]  # a file: tested above
    changed = Config(**{f.name: changed_value(f, getattr(default, f.name)) for f in fields})
    for f in fields:
        assert getattr(changed, f.name) != getattr(default, f.name), f.name
    argv = []
    for f in fields:
        argv += [f"--{f.name}", flag_text(getattr(changed, f.name))]
    assert parse_args(argv + ["--local_rank=3"]) == changed
    # and with the flag=value spelling
    assert parse_args([f"--{f.name}={flag_text(getattr(changed, f.name))}"
                       for f in fields] + ["--local_rank", "0"]) == changed


@pytest.mark.parametrize("argv", [["--gradient_checkpointing", "maybe"], ["--group_size", "two"],
                                  ["--no_such_flag", "1"], ["--lr", "fast"]])
def test_parse_args_rejects(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_a_runs_config_json_reruns_it(tmp_path):
    """The config.json a run writes is a --config file that gives the same settings back."""
    cfg = Config(model="some/model", group_size=4, clip_eps_high=0.3, run_name="a", response_prefix="<think>\n",
                 config="first.yaml")
    path = tmp_path / "config.json"
    path.write_text(dumps(cfg))
    assert parse_args(["--config", str(path)]) == dataclasses.replace(cfg, config=str(path))


# ----------------------------------------------------------------------------- validate

# world 2, 4 prompts, G 4, micro-batch 2: 2 prompts and 8 completions per rank, 4 micro-batches
BASE = dict(rollouts_per_step=4, group_size=4, train_batch_size=2)


def base(**overrides) -> Config:
    return Config(**{**BASE, **overrides})


def test_layout_values():
    layout = validate(base(), 2)
    assert layout == BatchLayout(world_size=2, prompts_per_rank=2, completions_per_rank=8,
                                 micro_batches_per_epoch=4, gradient_accumulation_steps=4,
                                 optimizer_steps_per_step=1)
    assert layout.on_policy is True


def test_layout_two_epochs_is_off_policy():
    layout = validate(base(epochs_per_step=2), 2)
    assert layout.gradient_accumulation_steps == 4
    assert layout.optimizer_steps_per_step == 2  # 2 epochs x 4 micro-batches / 4
    assert layout.on_policy is False


def test_layout_gradient_accumulation_two():
    layout = validate(base(gradient_accumulation_steps=2), 2)
    assert layout.gradient_accumulation_steps == 2
    assert layout.optimizer_steps_per_step == 2  # 1 epoch x 4 micro-batches / 2
    assert layout.on_policy is False
    # the same, 2 epochs: 2 x 4 / 2 = 4
    assert validate(base(gradient_accumulation_steps=2, epochs_per_step=2), 2).optimizer_steps_per_step == 4


def test_layout_explicit_full_accumulation_is_on_policy():
    assert validate(base(gradient_accumulation_steps=4), 2).on_policy is True


@pytest.mark.parametrize("overrides,world,prefix", [
    (dict(group_size=1), 2, "--group_size 1: must be at least 2"),
    (dict(rollouts_per_step=3), 2, "--rollouts_per_step 3: must be divisible by the number of ranks (2)"),
    (dict(train_batch_size=5), 2, "--train_batch_size 5: must divide each rank's completions"),
    (dict(train_batch_size=0), 2, "--train_batch_size 0: must be at least 1"),
    (dict(gradient_accumulation_steps=3), 2, "--gradient_accumulation_steps 3: must divide the 4 micro-batches"),
    (dict(gradient_accumulation_steps=0), 2, "--gradient_accumulation_steps 0: "),
    (dict(gradient_accumulation_steps=8), 2, "--gradient_accumulation_steps 8: "),
    (dict(epochs_per_step=0), 2, "--epochs_per_step 0: "),
    (dict(max_new_tokens=0), 2, "--max_new_tokens 0: "),
    (dict(max_steps=0), 2, "--max_steps 0: "),
    (dict(max_length=0), 2, "--max_length 0: "),
    (dict(lr=0.0), 2, "--lr 0.0: "),
    (dict(example_question="1 + 1?"), 2, "--example_answer : is empty while the other of --example_question/"),
    (dict(example_answer="<answer>2</answer>"), 2, "--example_question : is empty while the other"),
    (dict(kl_weight=-0.1), 2, "--kl_weight -0.1: "),
    (dict(clip_eps=0.0), 2, "--clip_eps 0.0: "),
    (dict(clip_eps_high=0.1), 2, "--clip_eps_high 0.1: must be >= --clip_eps 0.2"),
    (dict(temperature=0.0), 2, "--temperature 0.0: "),
    (dict(top_p=0.0), 2, "--top_p 0.0: "),
    (dict(top_p=1.5), 2, "--top_p 1.5: "),
    (dict(max_norm=-1.0), 2, "--max_norm -1.0: "),
    (dict(rollout_batch_size=-1), 2, "--rollout_batch_size -1: "),
    (dict(difficulty=4), 2, "--difficulty 4: "),
    (dict(loss_type="ppo"), 2, "--loss_type ppo: expected one of grpo, bnpo, dr_grpo, dapo, cispo"),
    (dict(scale_rewards="std"), 2, "--scale_rewards std: expected one of group, batch, none"),
    (dict(precision="fp16"), 2, "--precision fp16: expected one of auto, bf16, fp32"),
    (dict(report_to="mlflow"), 2, "--report_to mlflow: expected one of none, tensorboard, wandb"),
    (dict(bad_answers="keep"), 2, "--bad_answers keep: expected one of skip, error"),
    (dict(save_steps=-1), 2, "--save_steps -1: must be >= 0"),
    (dict(max_nonfinite_skips=0), 2, "--max_nonfinite_skips 0: must be at least 1"),
    (dict(export_dtype="fp16"), 2, "--export_dtype fp16: expected one of auto, bf16, fp32"),
    (dict(loss_type="cispo"), 2, "--loss_type cispo: needs --clip_eps_high"),
    # below 1 + clip_eps_high, delta would lower the upper clip (TRL only recommends > 1 + epsilon)
    (dict(delta=1.0), 2, "--delta 1.0: must be >= 1 + clip_eps_high = 1.2: it caps the ratios above the upper clip"),
    (dict(delta=1.25, clip_eps_high=0.28), 2, "--delta 1.25: must be >= 1 + clip_eps_high = 1.28"),
    (dict(delta=2.0, loss_type="cispo", clip_eps_high=5.0), 2, "--delta 2.0: has no effect with --loss_type cispo"),
    (dict(kl_estimator="k1"), 2, "--kl_estimator k1: as a loss term k1's gradient is zero in expectation on-policy"),
    (dict(top_entropy_quantile=1.5), 2, "--top_entropy_quantile 1.5: must be in [0, 1]"),
    (dict(kl_in_reward=True, kl_weight=0.0), 2, "--kl_in_reward True: needs --kl_weight > 0"),
    (dict(max_sampling_rounds=0), 2, "--max_sampling_rounds 0: must be at least 1"),
    (dict(overlong_buffer=8, max_new_tokens=8), 2, "--overlong_buffer 8: must be in [0, --max_new_tokens 8)"),
    (dict(overlong_penalty=-1.0), 2, "--overlong_penalty -1.0: must be >= 0"),
    (dict(importance_sampling_level="group"), 2, "--importance_sampling_level group: expected one of token, "
                                                 "sequence"),
    (dict(kl_estimator="k4"), 2, "--kl_estimator k4: expected one of k1, k2, k3"),
    (dict(lora_r=-1), 2, "--lora_r -1: must be >= 0"),
    (dict(lora_dropout=0.5), 2, "--lora_dropout 0.5: has no effect without --lora_r"),
    (dict(lora_r=8, lora_alpha=0.0), 2, "--lora_alpha 0.0: must be positive"),
    (dict(lora_r=8, lora_dropout=1.0), 2, "--lora_dropout 1.0: must be in [0, 1)"),
])
def test_validate_rejects_with_one_line(overrides, world, prefix):
    with pytest.raises(ValueError) as err:
        validate(base(**overrides), world)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(prefix), message


def test_validate_train_batch_size_message_shows_the_arithmetic():
    with pytest.raises(ValueError) as err:
        validate(base(train_batch_size=5), 2)
    assert "4 / 2 x 4 = 8" in str(err.value)


@pytest.mark.parametrize("overrides", [dict(clip_eps_high=0.2), dict(clip_eps_high=0.28), dict(kl_weight=0.0),
                                       dict(top_p=1.0), dict(max_norm=0.0)]
                         + [dict(loss_type=t, clip_eps_high=5.0 if t == "cispo" else None) for t in LOSS_TYPES]
                         + [dict(delta=1.2), dict(delta=1.28, clip_eps_high=0.28), dict(top_entropy_quantile=0.0),
                            dict(kl_estimator="k1", kl_in_reward=True), dict(kl_estimator="k1", kl_weight=0.0),
                            dict(lora_r=1, lora_alpha=0.5),
                            dict(overlong_buffer=7, max_new_tokens=8), dict(importance_sampling_level="sequence")])
def test_validate_accepts_boundaries(overrides):
    assert validate(base(**overrides), 2).completions_per_rank == 8


# ----------------------------------------------------------------------------- build_ds_config


def built(raw=None, gpu=False, world=2, source="", **overrides):
    cfg = base(**overrides)
    layout = validate(cfg, world)
    raw = load_ds_json("ds_configs/zero2.json") if raw is None else raw
    return build_ds_config(raw, cfg, layout, gpu, source)


def test_build_fills_auto_fields_zero2_cpu():
    raw = load_ds_json("ds_configs/zero2.json")
    pristine = copy.deepcopy(raw)
    ds, precision = built(raw)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16  # micro 2 x accumulation 4 x 2 ranks
    assert ds["gradient_clipping"] == 1.0
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 5e-6, "weight_decay": 0.0, "betas": [0.9, 0.999],
                                                           "eps": 1e-8, "torch_adam": True}}
    assert precision == "fp32" and ds["bf16"] == {"enabled": False}  # auto on a CPU host
    assert "fp16" not in ds and "scheduler" not in ds
    assert "tensorboard" not in ds and "wandb" not in ds
    assert ds["zero_optimization"] == pristine["zero_optimization"]  # engine settings kept as written
    assert raw == pristine  # the input is not modified
    assert "auto" not in json.dumps(ds)


def test_build_gpu_follows_json_bf16():
    ds, precision = built(gpu=True)
    assert precision == "bf16" and ds["bf16"]["enabled"] is True
    assert "torch_adam" not in ds["optimizer"]["params"]  # FusedAdam on GPUs


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_build_real_files(name, stage):
    ds, precision = built(load_ds_json(f"ds_configs/{name}.json"), gradient_accumulation_steps=2)
    assert ds["zero_optimization"]["stage"] == stage
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        2, 2, 8)
    assert precision == "fp32"
    # with the optimizer offloaded to CPU DeepSpeed uses its CPU Adam; torch's AdamW only otherwise
    assert ("torch_adam" in ds["optimizer"]["params"]) == (name != "zero3_offload")
    assert "auto" not in json.dumps(ds)


def test_build_other_flags():
    ds, _ = built(lr=1e-4, weight_decay=0.1, max_norm=0.0, train_batch_size=4, world=1)
    # 1 rank: 4 prompts x 4 = 16 completions, micro 4 -> 4 micro-batches accumulated
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        4, 4, 16)
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["gradient_clipping"] == 0.0


@pytest.mark.parametrize("raw,flag,key", [
    # --train_batch_size 16 below (1 rank, 16 completions)
    ({"train_micro_batch_size_per_gpu": 8}, "--train_batch_size 16", "train_micro_batch_size_per_gpu=8"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "--lr 5e-06", "lr=0.001"),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.01}}}, "--weight_decay 0.0", "weight_decay=0.01"),
    ({"gradient_accumulation_steps": 3}, "--gradient_accumulation_steps 1", "gradient_accumulation_steps=3"),
    ({"train_batch_size": 32}, "--train_batch_size x gradient_accumulation_steps x ranks", "train_batch_size=32"),
    ({"gradient_clipping": 0.5}, "--max_norm 1.0", "gradient_clipping=0.5"),
])
def test_build_refuses_contradictions(raw, flag, key):
    cfg = Config(rollouts_per_step=4, group_size=4, train_batch_size=16)
    layout = validate(cfg, 1)
    with pytest.raises(ValueError) as err:
        build_ds_config(raw, cfg, layout, False, "my_ds.json")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("my_ds.json: "), message
    assert flag in message and key in message, message


def test_build_contradiction_names_the_ds_config_flag_by_default():
    cfg = Config(rollouts_per_step=4, group_size=4, train_batch_size=16, ds_config="conf/mine.json")
    with pytest.raises(ValueError, match=r"^conf/mine\.json: train_micro_batch_size_per_gpu=8"):
        build_ds_config({"train_micro_batch_size_per_gpu": 8}, cfg, validate(cfg, 1), False)


def test_build_accepts_agreeing_numbers_and_keeps_json_choices():
    raw = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "train_batch_size": 16,
           "optimizer": {"type": "AdamW", "params": {"lr": 5e-6, "betas": [0.8, 0.95], "eps": 1e-6}}}
    ds, _ = built(raw)
    assert ds["optimizer"]["params"]["betas"] == [0.8, 0.95] and ds["optimizer"]["params"]["eps"] == 1e-6
    assert ds["train_batch_size"] == 16


def test_build_bad_zero_stage():
    with pytest.raises(ValueError, match="zero_optimization.stage"):
        built({"zero_optimization": {"stage": 4}})


@pytest.mark.parametrize("raw_bf16,requested,gpu,expected", [
    ({"enabled": "auto"}, "auto", False, "fp32"),  # CPU: fp32 whatever the JSON says
    ({"enabled": True}, "auto", False, "fp32"),
    ({"enabled": "auto"}, "bf16", False, "bf16"),  # forced
    ({"enabled": "auto"}, "auto", True, "bf16"),  # GPU follows the JSON
    ({"enabled": True}, "auto", True, "bf16"),
    ({"enabled": False}, "auto", True, "fp32"),
    (None, "auto", True, "fp32"),  # no bf16 section
    ({"enabled": "auto"}, "fp32", True, "fp32"),  # forced
])
def test_build_precision(raw_bf16, requested, gpu, expected):
    raw = {} if raw_bf16 is None else {"bf16": dict(raw_bf16)}
    ds, precision = built(raw, gpu=gpu, precision=requested)
    assert precision == expected
    assert ds["bf16"]["enabled"] is (expected == "bf16")
    assert resolve_precision(raw, requested, gpu, "x.json") == expected


@pytest.mark.parametrize("fp16", [{"enabled": True}, {"enabled": "auto"}])
def test_build_refuses_fp16(fp16):
    with pytest.raises(ValueError, match=r"^my\.json: fp16 is not supported"):
        built({"fp16": fp16}, source="my.json")


def test_build_drops_disabled_fp16():
    ds, _ = built({"fp16": {"enabled": False}})
    assert "fp16" not in ds


def test_build_tensorboard_section():
    ds, _ = built(report_to="tensorboard", output_dir="runs/exp7")
    assert ds["tensorboard"] == {"enabled": True, "output_path": "runs/exp7/tensorboard", "job_name": "exp7"}
    assert "wandb" not in ds
    ds, _ = built(report_to="tensorboard", output_dir="runs/exp7", run_name="named")
    assert ds["tensorboard"]["job_name"] == "named"


def test_build_wandb_section():
    ds, _ = built(report_to="wandb", output_dir="runs/exp7")
    assert ds["wandb"] == {"enabled": True, "project": "grpo_ds", "group": "exp7"}
    assert "tensorboard" not in ds


def test_build_warmup_scheduler():
    ds, _ = built(warmup_steps=10, lr=2e-5)
    assert ds["scheduler"] == {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-5,
                                                              "warmup_num_steps": 10, "warmup_type": "linear"}}


def test_build_scheduler_auto_params_filled():
    raw = {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": "auto",
                                                             "warmup_min_lr": "auto", "total_num_steps": 100}}}
    ds, _ = built(raw, warmup_steps=5, lr=1e-5)
    assert ds["scheduler"] == {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-5, "warmup_num_steps": 5,
                                                                   "warmup_min_lr": 0.0, "total_num_steps": 100}}


# ----------------------------------------------------------------------------- load_ds_json


def test_load_ds_json_real_files_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths fall back to the repository root
    assert load_ds_json("ds_configs/zero2.json")["zero_optimization"]["stage"] == 2
    assert load_ds_json("ds_configs/zero3.json")["zero_optimization"]["stage"] == 3
    offload = load_ds_json("ds_configs/zero3_offload.json")["zero_optimization"]
    assert offload["offload_param"]["device"] == "cpu" and offload["offload_optimizer"]["device"] == "cpu"


def test_load_ds_json_missing(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError) as err:
        load_ds_json(missing)
    assert str(err.value) == f"--ds_config '{missing}': file not found"


def test_load_ds_json_invalid_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": "auto",\n  "bf16": {"enabled": true,}\n}\n')  # trailing comma, line 3
    with pytest.raises(ValueError) as err:
        load_ds_json(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:3: invalid JSON ("), message
    assert "\n" not in message


def test_load_ds_json_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_ds_json(str(path))


# ----------------------------------------------------------------------------- reference_ds_config


def test_reference_for_zero2_policy_is_partitioned_by_default():
    policy, _ = built()
    # a ZeRO-3 inference engine asks DeepSpeed not to replace F.linear process-wide (a wrapper for a backward pass
    # the reference never runs; it would slow the policy's every linear layer)
    assert reference_ds_config(policy, base(), 2)["zero_optimization"] == {"stage": 3, "memory_efficient_linear": False}
    ref = reference_ds_config(policy, base(reference_partitioned=False), 2)
    assert ref == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                   "bf16": {"enabled": False}, "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
    assert "optimizer" not in ref and "scheduler" not in ref


def test_one_rank_replicates_the_reference_it_has_nothing_to_partition_over():
    policy, _ = built()
    ref = reference_ds_config(policy, base(), 1)
    assert ref["zero_optimization"] == {"stage": 0}
    # offload needs ZeRO-3, and a ZeRO-3 policy's reference stays ZeRO-3, on one rank too
    assert reference_ds_config(policy, base(reference_offload=True), 1)["zero_optimization"]["stage"] == 3
    zero3, _ = built(load_ds_json("ds_configs/zero3.json"))
    assert reference_ds_config(zero3, base(), 1)["zero_optimization"]["stage"] == 3


def test_reference_for_zero3_policy_is_stage_3():
    policy, _ = built(load_ds_json("ds_configs/zero3.json"), gpu=True)
    ref = reference_ds_config(policy, base(), 2)
    assert ref["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 100000,
                                        "memory_efficient_linear": False}
    assert ref["bf16"] == {"enabled": True}
    assert "optimizer" not in ref


def test_reference_zero3_drops_auto_threshold():
    policy, _ = built({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}})
    assert reference_ds_config(policy, base(), 2)["zero_optimization"] == {"stage": 3, "memory_efficient_linear": False}


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
@pytest.mark.parametrize("gpu", [True, False])
def test_reference_offload(name, gpu, monkeypatch):
    cfg = base(reference_offload=True)
    policy, _ = built(load_ds_json(f"ds_configs/{name}.json"), reference_offload=True)
    monkeypatch.setattr(distributed, "on_gpu", lambda: gpu)
    zero = reference_ds_config(policy, cfg, 2)["zero_optimization"]
    assert zero["stage"] == 3
    # pinned host memory speeds up copies to a GPU; a CPU-only host has nothing to pin for
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": gpu}
    assert zero["memory_efficient_linear"] is False
    assert "optimizer" not in reference_ds_config(policy, cfg, 2)


def test_reference_without_offload_for_offloading_policy():
    policy, _ = built(load_ds_json("ds_configs/zero3_offload.json"))
    zero = reference_ds_config(policy, base(), 2)["zero_optimization"]
    assert zero["stage"] == 3 and "offload_param" not in zero


def test_flag_table_matches_the_config():
    from pathlib import Path

    from grpo_ds.config import flags_markdown

    page = (Path(__file__).resolve().parent.parent / "docs" / "FLAGS.md").read_text()
    assert flags_markdown() in page, (
        "docs/FLAGS.md's flag table is stale; the table ends the page, so regenerate it with\n"
        "  .venv/bin/python -c \"from pathlib import Path; from grpo_ds.config import flags_markdown; "
        "p = Path('docs/FLAGS.md'); s = p.read_text(); "
        "p.write_text(s[:s.index('| flag | default | meaning |')] + flags_markdown())\"")


def test_torch_linear_restores_the_installed_linear_even_on_error():
    import torch.nn.functional as F

    def wrapper(input, weight, bias=None):  # stands in for DeepSpeed's zero3_linear_wrap
        raise AssertionError("the wrapper ran inside torch_linear")

    real = F.linear
    try:
        F.linear = wrapper
        with distributed.torch_linear():
            assert F.linear is torch._C._nn.linear
            torch.nn.Linear(2, 3)(torch.ones(1, 2))  # nn.Linear reads F.linear at call time
        assert F.linear is wrapper
        with pytest.raises(RuntimeError, match="inside"):
            with distributed.torch_linear():
                raise RuntimeError("inside")
        assert F.linear is wrapper
    finally:
        F.linear = real
    with distributed.torch_linear():  # torch's already: left as it is
        assert F.linear is real
    assert F.linear is real
