"""The pack's layer rule, read from the source (an AST walk; no ComfyUI needed).

Arrows go nodes -> core -> bridge -> ComfyUI: the core (``syncdiff_core/`` outside ``comfy/``) is plain torch and
imports neither ComfyUI nor the bridge; only the bridge (``syncdiff_core/comfy/``) imports ComfyUI's internals; the
nodes import nothing of ComfyUI but its public node API (``comfy_api``); and no module imports itself back through
a cycle of module-level imports.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK = "pack"  # the repository's own package name in this walk
#: Top-level modules of ComfyUI (and its bundled packages) that custom nodes can import.
COMFYUI = ("comfy", "comfy_extras", "comfy_api", "comfy_execution", "comfy_config", "folder_paths", "latent_preview",
           "nodes", "server", "node_helpers", "execution", "app", "utils")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACK,) + parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


SOURCES = {module_name(p): p for d in ("syncdiff_core", "nodes") for p in (ROOT / d).rglob("*.py")}
SOURCES[PACK] = ROOT / "__init__.py"


def imports(path: Path, top_level_only: bool = False):
    """``(line, absolute module name)`` of every import in ``path``; relative imports resolved against the pack,
    ``from a import b`` also yields ``a.b`` when that is one of the pack's modules."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    package = here if is_package(path) else here.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level includes the bodies of if / try at module level
        nodes = [n for stmt in nodes for n in ast.walk(stmt) if not isinstance(stmt, (ast.FunctionDef, ast.ClassDef,
                                                                                       ast.AsyncFunctionDef))]
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield node.lineno, target
            for alias in node.names:
                if f"{target}.{alias.name}" in SOURCES:
                    yield node.lineno, f"{target}.{alias.name}"


def comfyui_module(name: str) -> bool:
    return name.split(".")[0] in COMFYUI


def layer(name: str) -> str:
    if name.startswith(f"{PACK}.syncdiff_core.comfy"):
        return "bridge"
    if name.startswith(f"{PACK}.syncdiff_core"):
        return "core"
    return "nodes"


def violations(rule) -> list[str]:
    found = []
    for name, path in sorted(SOURCES.items()):
        for line, target in imports(path):
            why = rule(layer(name), target)
            if why:
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {target} ({why})")
    return found


def test_the_walk_sees_the_pack():
    """The walk finds every layer and resolves relative imports (else the rules below would pass vacuously)."""
    layers = {layer(n) for n in SOURCES}
    assert layers == {"core", "bridge", "nodes"}
    sampling = SOURCES[f"{PACK}.syncdiff_core.comfy.sampling"]
    targets = {t for _, t in imports(sampling)}
    assert f"{PACK}.syncdiff_core.sampler" in targets and "comfy.samplers" in targets


def test_the_core_imports_neither_comfyui_nor_the_bridge():
    def rule(where, target):
        if where != "core":
            return None
        if comfyui_module(target):
            return "the core is plain torch"
        if target.startswith(f"{PACK}.syncdiff_core.comfy") or target.startswith(f"{PACK}.nodes"):
            return "arrows go nodes -> core -> bridge, never back"
        return None
    assert violations(rule) == []


def test_the_nodes_use_only_comfyuis_public_node_api():
    def rule(where, target):
        if where == "nodes" and comfyui_module(target) and target.split(".")[0] != "comfy_api":
            return "nodes import ComfyUI's public API (comfy_api) only; the bridge does the rest"
        return None
    assert violations(rule) == []


def test_no_import_cycles():
    graph = {name: {t for _, t in imports(path, top_level_only=True) if t in SOURCES and t != name}
             for name, path in SOURCES.items()}
    # a package's __init__ importing its own submodules is how packages export; a cycle needs a submodule that
    # imports back into a module that (transitively) imports it
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(c == nxt or nxt.startswith(c + ".") or c.startswith(nxt + ".") for c in cycle):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


@pytest.mark.parametrize("snippet,where,expect", [
    ("import comfy.samplers\n", "syncdiff_core/x.py", "the core is plain torch"),
    ("from .comfy import sampling\n", "syncdiff_core/x.py", "never back"),
    ("import folder_paths\n", "nodes/x.py", "public API"),
])
def test_the_rules_catch_a_stray_import(tmp_path, monkeypatch, snippet, where, expect):
    """A stray import in a new file is reported (the rules are not vacuous)."""
    fake = ROOT / where
    monkeypatch.setitem(SOURCES, module_name(fake), fake)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: snippet if self == fake else
                        Path.read_bytes(self).decode())
    core = test_the_core_imports_neither_comfyui_nor_the_bridge
    check = core if where.startswith("syncdiff_core") else test_the_nodes_use_only_comfyuis_public_node_api
    with pytest.raises(AssertionError, match=expect):
        check()
