"""The package's shape, checked: no import cycle (imports inside functions and under TYPE_CHECKING count),
each layer importing only from the layers below it, short pipeline functions, and one list of the
generation options."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from openldm.pipelines.options import GenerationOptions, OptionFields

PACKAGE = Path(__file__).resolve().parent.parent / "openldm"
# What each part of the package may import from the package, by the first name below ``openldm``
# (a module or a sub-package); each layer may use those below it (see docs/architecture.md).
LAYERS: list[set[str]] = [
    {"config", "devices", "files"},
    {"nn", "sampling", "tokenizer", "images", "prompts", "shapes", "control_images"},
    {"checkpoints"},
    {"embedded", "adapters"},
    {"pipelines"},
    {"model"},
    {"train", "commands"},
    {"server"},
    {"cli"},
    {"__main__"},
]
PIPELINE_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> Iterator[str]:
    """The package modules that ``path`` imports anywhere in it (functions and TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # ``from openldm.pipelines import common`` imports the module openldm.pipelines.common.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
        else:
            continue
        yield from (t for t in targets if t in known and t != name)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: set(_imports(path, name, known)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_each_layer_imports_only_from_the_layers_below() -> None:
    level = {part: i for i, layer in enumerate(LAYERS) for part in layer}
    wrong = []
    for module, targets in _graph().items():
        part = _part(module)
        if part == "__init__":
            continue  # the package's entry points reach up, lazily, by design
        for target in targets:
            other = _part(target)
            if other != part and other != "__init__" and level[other] >= level[part]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_checkpoints_import_nothing_from_the_pipelines() -> None:
    graph = _graph()
    reached = {t for m, ts in graph.items() if _part(m) == "checkpoints" for t in ts}
    assert not {t for t in reached if _part(t) in ("pipelines", "model", "commands", "train", "cli")}


def test_pipeline_functions_are_short() -> None:
    long = []
    for path in (PACKAGE / "pipelines").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > PIPELINE_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_option_keywords_are_the_options_fields() -> None:
    fields = {f.name for f in dataclasses.fields(GenerationOptions)} - {"prompt", "negative_prompt"}
    assert set(OptionFields.__annotations__) == fields


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"steps": 0}, "steps"), ({"sampler": "x"}, "sampler"), ({"eta": -1.0}, "eta"), ({"seed": -1}, "seed")],
)
def test_options_are_checked_when_built(changes, field) -> None:
    from openldm.pipelines.options import OptionError

    with pytest.raises(OptionError) as error:
        GenerationOptions("a fox", **changes)
    assert error.value.field == field
    options = GenerationOptions("a fox", negative_prompt="blurry", n_samples=2)
    assert options.prompt == ("a fox",) and options.negative_prompt == ("blurry",)
    assert options.batch() == (["a fox", "a fox"], ["blurry", "blurry"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.steps = 3  # type: ignore[misc]
