"""The layout's import rules, read from the source with ``ast`` (every import, function-local ones too).

- ``raymed.config`` is the schema alone: it imports no method, model or data module (validation
  against the registries lives one level above, in ``raymed.experiment``).
- Methods, models, data and run tasks never import the engine: the engine calls them, not the other
  way round.
- The engine, the config schema, the shard writer and the method base class reach a run task (report
  generation, ...) only through the registry's hooks (:mod:`raymed.tasks`), never a task's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import raymed

PACKAGE = Path(raymed.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def raymed_imports(path: Path) -> set[str]:
    """Every ``raymed.*`` module ``path`` imports, anywhere in the file (``from a import b`` counts as
    ``a.b`` when ``b`` is a module, else as ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("raymed")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raymed") and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (PACKAGE.parent / Path(*sub.split("."))).is_dir()
                found.add(sub if is_module else node.module)
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
    task_packages = ("raymed.tasks.",)  # raymed.tasks itself (the registry and its hooks) is allowed
    offenders = {
        module: sorted(i for i in imports if i.startswith(task_packages))
        for module, imports in graph().items()
        if (module.startswith("raymed.engine") or module in ("raymed.config", "raymed.data.shards", "raymed.methods.base"))
        and any(i.startswith(task_packages) for i in imports)
    }
    assert not offenders, offenders


def test_the_walker_sees_function_local_imports(tmp_path):
    """The rules above would pass vacuously if the walker missed imports inside functions."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from raymed.engine import checkpoint\n    import raymed.methods\n")
    assert raymed_imports(source) == {"raymed.engine.checkpoint", "raymed.methods"}
