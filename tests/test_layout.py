"""The layout's import rules, read from the source with ``ast`` (every import, function-local ones too).

- ``raymed.config`` is the schema alone: it imports no method, model or data module (validation
  against the registries lives one level above, in ``raymed.experiment``).
- Methods, models, data and run tasks never import the engine: the engine calls them, not the other
  way round.
- The engine, the config schema, the shard writer and the method base class reach a run task (report
  generation, ...) only through the registry's hooks (:mod:`raymed.tasks`), never a task's package.
- No module below the method registry imports a paper's code (OmniFM, FedKIM, FedMRG, LoRKD, MAFM3):
  the registry (``raymed.methods``) alone lists them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import raymed

PACKAGE = Path(raymed.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (a block for type checkers only: never imported at run time)."""
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def raymed_imports(path: Path) -> set[str]:
    """Every ``raymed.*`` module ``path`` imports at run time, anywhere in the file, function-local
    imports included and ``if TYPE_CHECKING:`` blocks left out (``from a import b`` counts as ``a.b``
    when ``b`` is a module, else as ``a``)."""
    found = set()
    todo = [ast.parse(path.read_text(), str(path))]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("raymed")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raymed") and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (PACKAGE.parent / Path(*sub.split("."))).is_dir()
                found.add(sub if is_module else node.module)
        if _type_checking_only(node):
            todo += node.orelse
        else:
            todo += ast.iter_child_nodes(node)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): raymed_imports(p) for p in PACKAGE.rglob("*.py")}


def test_the_config_schema_imports_no_method_model_or_data_module():
    imports = graph()["raymed.config"]
    assert imports <= {"raymed.errors", "raymed.files"}, sorted(imports)


def test_methods_models_and_data_never_import_the_engine():
    offenders = {
        module: sorted(i for i in imports if i.startswith("raymed.engine"))
        for module, imports in graph().items()
        if module.startswith(("raymed.methods", "raymed.models", "raymed.data", "raymed.tasks")) and any(i.startswith("raymed.engine") for i in imports)
    }
    assert not offenders, offenders


def test_the_engine_schema_shards_and_method_base_reach_tasks_only_through_hooks():
    hooks = {"raymed.tasks", "raymed.tasks.base", "raymed.tasks.registry"}  # the interface and its registry
    offenders = {
        module: sorted(i for i in imports if i.startswith("raymed.tasks") and i not in hooks)
        for module, imports in graph().items()
        if (module.startswith("raymed.engine") or module in ("raymed.config", "raymed.data.shards", "raymed.methods.base"))
        and any(i.startswith("raymed.tasks") and i not in hooks for i in imports)
    }
    assert not offenders, offenders


PAPERS = tuple(f"raymed.methods.{name}" for name in ("omnifm", "fedkim", "fedmrg", "lorkd", "mafm3"))


def test_only_the_method_registry_imports_a_paper():
    offenders = {
        module: sorted(i for i in imports if i.startswith(PAPERS))
        for module, imports in graph().items()
        if module != "raymed.methods" and not module.startswith(PAPERS) and any(i.startswith(PAPERS) for i in imports)
    }
    assert not offenders, offenders
    assert {p for p in PAPERS if p in graph()} == set(PAPERS)  # the names above are still the papers' modules


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``edges``: its strongly connected components of more than one module
    (Tarjan's algorithm), and modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_others():
    """No import cycle among raymed's modules, function-local imports included: a cycle is what the
    function-local imports that "dodge" it hide, and what makes one module's change break another's import."""
    modules = graph()
    edges = {m: {i for i in imports if i in modules and i != m} for m, imports in modules.items()}
    assert not cycles(edges), cycles(edges)


def test_the_walker_sees_function_local_imports_and_skips_type_checking_blocks(tmp_path):
    """The rules above would pass vacuously if the walker missed imports inside functions."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from raymed.engine import server\n"
        "def f():\n    from raymed.engine import checkpoint\n    import raymed.methods\n"
    )
    assert raymed_imports(source) == {"raymed.engine.checkpoint", "raymed.methods"}


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_readme_contents_lists_every_section_with_a_working_anchor():
    """README's Contents: one line per ## / ### heading, in order, each linking to GitHub's anchor."""
    import re

    text = (PACKAGE.parent / "README.md").read_text()
    headings = [(len(h), t) for h, t in re.findall(r"^(##|###) (.+)$", text, re.M) if t != "Contents"]
    contents = text.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^( *)- \[(.+)\]\(#(.+)\)$", contents, re.M)
    assert [(2 if not indent else 3, title) for indent, title, _ in listed] == headings
    for _, title, anchor in listed:
        assert anchor == re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"), title
