"""The package's structure, as the house style promises it: no import cycles inside grpo_ds (function-local imports
included), math modules that import neither DeepSpeed nor torch.distributed, and thin entry points."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "grpo_ds"
MATH_MODULES = ["loss", "rewards", "data", "experience", "generation", "logprobs", "tools"]


def package_imports(path: Path, modules: set[str]) -> set[str]:
    """The grpo_ds `modules` that `path` imports anywhere in its body (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "grpo_ds":
                parts = node.module.split(".")
                names = parts[1:2] if len(parts) > 1 else [a.name for a in node.names]
            else:
                names = []
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("grpo_ds.")]
        else:
            names = []
        found |= {n for n in names if n in modules and n != path.stem}
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {p.stem for p in package.glob("*.py")}
    return {p.stem: package_imports(p, modules) for p in package.glob("*.py") if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first == last), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 10 and any(graph.values())  # the graph was read
    assert find_cycle(graph) == []


def test_cycle_finder_sees_function_local_imports(tmp_path):
    """The detector must see what it is looking for: the cycle of the old layout, hidden in function-local imports."""
    package = tmp_path / "grpo_ds"
    package.mkdir()
    (package / "models.py").write_text("def f():\n    from .checkpoint import export\n")
    (package / "checkpoint.py").write_text("def g():\n    from . import distributed as dist\n")
    (package / "distributed.py").write_text("import torch\n\ndef h():\n    from grpo_ds.models import load\n")
    (package / "leaf.py").write_text("import json\n")
    assert find_cycle(import_graph(package)) == ["checkpoint", "distributed", "models", "checkpoint"]


def forbidden_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "deepspeed" or alias.name.startswith("torch.distributed"):
                    found.append(f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [a.name for a in node.names]
            if node.level == 0 and (module.split(".")[0] == "deepspeed" or module.startswith("torch.distributed")
                                    or (module == "torch" and "distributed" in names)
                                    or module in ("grpo_ds.distributed", "grpo_ds.trainer")
                                    or (module == "grpo_ds" and {"distributed", "trainer"} & set(names))):
                found.append(f"from {module} import {names}")
            if node.level > 0 and (module in ("distributed", "trainer")
                                   or (not module and {"distributed", "trainer"} & set(names))):
                found.append(f"from {'.' * node.level}{module} import {names}")
        elif (isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name)
              and node.value.id == "torch"):
            found.append("torch.distributed")
    return found


@pytest.mark.parametrize("module", MATH_MODULES)
def test_math_modules_import_no_deepspeed_or_collectives(module):
    assert forbidden_imports(PACKAGE / f"{module}.py") == []


def test_forbidden_imports_detector_works():
    # the detector itself must see what it is looking for
    assert forbidden_imports(PACKAGE / "distributed.py") != []
    assert forbidden_imports(PACKAGE / "trainer.py") != []


def test_library_modules_parse_no_command_lines():
    """Argument parsing lives with the entry points (scripts/), except the training config, whose flags are its
    fields."""
    for path in PACKAGE.glob("*.py"):
        if path.stem != "config":
            assert "argparse" not in path.read_text(), path.name


def test_the_suite_runs_every_docstring_example():
    """Plain `pytest` collects the package's doctests (pyproject's testpaths and --doctest-modules), and no example
    is skipped: an example that is never run rots (render_chat's raised, math_verify_reward's answered 0.1)."""
    import tomllib

    options = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "grpo_ds" in options["testpaths"] and "--doctest-modules" in options["addopts"].split()
    skipped = [f"{path.name}:{n}" for path in sorted(PACKAGE.glob("*.py"))
               for n, line in enumerate(path.read_text().splitlines(), 1) if ">>>" in line and "+SKIP" in line]
    assert not skipped, skipped
