"""The shape of the code: imports only go down the layers of docs/architecture.md, no import cycles
(imports inside functions count too), small files, and a module map that names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "diffusekit"

# docs/architecture.md's layers, bottom to top; a module may import its own layer and the ones below.
LAYERS = {
    1: ["errors", "files", "devices", "seeds", "durations", "precision", "layout", "compiled", "sigmas", "flow", "schedule", "denoiser", "losses", "samplers", "guidance", "inpaint", "distributed",
        "optim", "version", "distill_losses", "control"],
    2: ["nn"],
    3: ["config", "config_checks", "models", "io", "data", "images", "figures", "annotators"],
    4: ["trainer", "training_state", "diffusion_batches", "diffusion_training", "autoencoder_training", "distill", "finetune", "controlnet_training", "conditioning", "sampling", "pipeline", "pipeline_lora", "pipeline_controlnet", "image_info", "evaluate", "metrics",
        "attention_maps", "explain", "process_view"],
    5: ["cli", "__main__", "__init__", "serve"],
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """diffusekit modules `path` imports, at the top, inside functions or under `if TYPE_CHECKING:` (a cycle of
    annotations is a cycle a reader follows too)."""
    found, tree = set(), ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("diffusekit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffusekit") and node.level == 0:
            for alias in node.names:  # `from diffusekit.io import diffusers` imports the module diffusekit.io.diffusers
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {name for name in found if name in MODULES} - {module_name(path)}


GRAPH = {name: imported_modules(path) for name, path in MODULES.items()}


def layer_of(name: str) -> int:
    parts = name.split(".")[1:] or ["__init__"]
    top = parts[0]
    for layer, names in LAYERS.items():
        if top in names:
            return layer
    raise AssertionError(f"{name} has no layer in tests/test_structure.py LAYERS; add it (and to the README module map)")


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_imports_only_go_down_the_layers():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})" for a, deps in GRAPH.items() for b in deps if layer_of(b) > layer_of(a)]
    assert upward == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a -> ... -> a, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_are_small_enough_to_read_in_one_sitting(name):
    assert len(MODULES[name].read_text().splitlines()) < 400


def test_the_readme_module_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| module |"):]
    named = set(re.findall(r"`([\w/]+)\.py`", table)) | {f"{folder}/{m}" for folder, mods in re.findall(r"`(\w+)/`\s*\|\s*([^|]+)\|", table)
                                                        for m in re.findall(r"`(\w+)\.py`", mods)}
    missing = [str(p.relative_to(PACKAGE).with_suffix("")) for p in MODULES.values()
               if p.name not in ("__init__.py", "__main__.py") and str(p.relative_to(PACKAGE).with_suffix("")) not in named
               and p.stem not in named]
    assert missing == [], f"add these modules to the README module map: {missing}"


def test_every_link_in_the_docs_stays_inside_the_repository():
    """Relative links of README.md and docs/*.md name files of this repository that exist (no ../shared, no dead link)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor of the same page
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
            assert path.exists(), f"{page.name} links to a missing file: {target}"
