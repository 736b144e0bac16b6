"""The documentation stays true to the code: the TRL mapping of docs/COMING_FROM_TRL.md names real GRPOConfig fields
and real grpo_ds flags and leaves no GRPOConfig field out, its defaults are the classes' own, every local link in
the README and docs/ resolves (anchors included), the recipe shown in docs/RECIPE_CPU.md is the recipe file, the
README keeps the Quickstart's two commands, and commands are written with the virtual environment's programs."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from grpo_ds.config import EMBEDDED_RECIPE, Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_FIELDS = {f.name for f in dataclasses.fields(Config)}
# The renamings a TRL user looks for first; each must be in the mapping, to this flag.
RENAMED = {"num_iterations": "epochs_per_step", "epsilon": "clip_eps", "epsilon_high": "clip_eps_high",
           "beta": "kl_weight", "per_device_train_batch_size": "train_batch_size", "num_generations": "group_size",
           "max_completion_length": "max_new_tokens", "learning_rate": "lr", "max_grad_norm": "max_norm",
           "generation_batch_size": "rollouts_per_step", "ds3_gather_for_generation": "zero3_gather_for_generation",
           "vllm_importance_sampling_correction": "importance_sampling_correction",
           "vllm_importance_sampling_mode": "importance_sampling_mode",
           "vllm_importance_sampling_clip_min": "importance_sampling_clip_min",
           "vllm_importance_sampling_clip_max": "importance_sampling_clip_max"}


def table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table under `heading`, header and separator rows dropped."""
    section = text.split(heading, 1)[1]
    rows, started = [], False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not set("".join(cells)) <= set("- "):
                rows.append(cells)
        elif started:
            break
    return rows[1:]


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


@pytest.fixture(scope="module")
def grpo_config_fields():
    trl = pytest.importorskip("trl")
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(trl.GRPOConfig)}
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    return fields, {name for name in fields if name not in inherited}


@pytest.fixture(scope="module")
def trl_page():
    return (ROOT / "docs" / "COMING_FROM_TRL.md").read_text()


def test_trl_mapping_names_real_fields_and_real_flags(grpo_config_fields, trl_page):
    fields, own = grpo_config_fields
    mapping = {}
    for trl_cell, flag_cell, _ in table_after(trl_page, "## GRPOConfig fields and their flags"):
        names, flags = ticked(trl_cell), ticked(flag_cell)
        assert names and flags, f"a row without a field or a flag: {trl_cell} | {flag_cell}"
        for name in names:
            assert name in fields, f"COMING_FROM_TRL.md: '{name}' is not a field of TRL's GRPOConfig"
        for flag in flags:
            assert flag.startswith("--") and flag[2:] in CONFIG_FIELDS, \
                f"COMING_FROM_TRL.md: '{flag}' (for {names}) is not a grpo_ds flag"
        mapping.update({name: [flag[2:] for flag in flags] for name in names})
    for name, flag in RENAMED.items():
        assert flag in mapping.get(name, []), f"COMING_FROM_TRL.md should map {name} to --{flag}"
    for name in fields:  # a field grpo_ds has under the same name must be listed as such
        if name in CONFIG_FIELDS:
            assert name in mapping.get(name, []), f"COMING_FROM_TRL.md should list {name} (the same flag name)"

    lacking = {name for cells in table_after(trl_page, "## What grpo_ds lacks") for name in ticked(cells[0])}
    for name in lacking:
        assert name in fields, f"COMING_FROM_TRL.md lacks table: '{name}' is not a field of TRL's GRPOConfig"
        assert name not in mapping, f"'{name}' is both mapped and listed as lacking"
    missing = sorted(own - set(mapping) - lacking)
    assert not missing, f"GRPOConfig fields neither mapped nor listed as lacking in COMING_FROM_TRL.md: {missing}"


def test_trl_defaults_table_matches_both_classes(grpo_config_fields, trl_page):
    fields, _ = grpo_config_fields
    rows = table_after(trl_page, "## Defaults that differ")
    assert len(rows) >= 8
    for name_cell, trl_cell, flag_cell, ours_cell, _ in rows:
        (name,), (trl_default,), (flag,), (ours,) = ticked(name_cell), ticked(trl_cell), ticked(flag_cell), \
            ticked(ours_cell)
        declared = fields[name].default
        assert ast.literal_eval(trl_default) == declared, f"{name}: TRL's default is {declared!r}, not {trl_default}"
        assert ast.literal_eval(ours) == getattr(Config(), flag[2:]), f"{flag}: grpo_ds's default is not {ours}"
        assert ast.literal_eval(ours) != declared, f"{name}: the defaults agree; the row does not belong here"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text, inside_code = [], False
    for line in path.read_text().splitlines():
        inside_code = not inside_code if line.startswith("```") else inside_code
        if not inside_code and line.startswith("#"):
            text.append(github_anchor(line.lstrip("#")))
    return set(text)


def test_every_local_link_resolves():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_keeps_the_quickstart_commands():
    """A newcomer copies the first; .ci/run runs the second, step by step (a step CI adds must be in the README)."""
    quickstart = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    first = ("bash scripts/setup_cpu.sh && .venv/bin/deepspeed --num_gpus 2 scripts/train.py --max_steps 6 "
             "--output_dir runs/quickstart")
    assert f"\n    {first}\n" in quickstart, first
    ci_steps = [line.removesuffix(" || exit 1") for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.startswith(("bash ", ".venv/bin/"))]
    assert ci_steps[-1] == ".venv/bin/python -m pytest", ci_steps
    second = " && ".join(ci_steps)
    assert f"\n    {second}\n" in quickstart, f"README's Quickstart should hold .ci/run's command: {second}"


def test_the_recipe_shown_is_the_recipe_file():
    page = (ROOT / "docs" / "RECIPE_CPU.md").read_text()
    shown = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert shown == EMBEDDED_RECIPE.read_text(), "docs/RECIPE_CPU.md: copy grpo_ds/recipes/smollm2_arithmetic.yaml"


def test_commands_use_the_virtual_environment():
    """After scripts/setup_cpu.sh only .venv has grpo_ds's dependencies: a bare `python scripts/...` or
    `deepspeed ...` fails unless the venv is activated, so the docs write .venv/bin/ every time."""
    bare = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if re.search(r"(?<![/\w.-])(python3? scripts/|deepspeed --)", line):
                bare.append(f"{doc.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bare, "\n".join(bare)


def test_the_readme_maps_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    unlisted = [page.name for page in DOCS[1:] if f"](docs/{page.name})" not in readme]
    assert not unlisted, f"pages missing from the README's map of docs/: {unlisted}"


def test_a_figure_lives_in_one_place():
    """Each image is embedded once (house style); other pages link to it."""
    embedded = [(doc.parent / target).resolve() for doc in DOCS
                for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", doc.read_text())]
    assert len(embedded) == len(set(embedded)), "an image is embedded on more than one page"
