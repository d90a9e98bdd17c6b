"""The import graph of app/, read from the source (imports inside functions counted, relative imports resolved): the
floors under the tasks import no task, and no two modules import each other, directly or round a circle. The engine
reads in small functions with few parameters. Also the tiny tokenizer, whose corpus lives in app/lm/, is the one every
test's figures were measured with."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from conftest import ROOT

APP = ROOT / "app"
FLOORS_UNDER_THE_TASKS = ("app.engine", "app.lm", "app.metrics", "app.config")
ALLOWED_UPHILL: set[str] = set()  # modules of those floors allowed to import a task (none)
ENGINE_MAX_LINES = 80  # lines of one function of app/engine, decorators and docstring included
ENGINE_MAX_PARAMETERS = 6  # parameters of one function of app/engine, `self` and `cls` not counted


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module `name` is, or lies in (`app.data.Row` -> `app.data`); None outside app."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.AST, package: str, modules: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {_resolve(a.name, modules) for a in node.names if a.name.split(".")[0] == "app"} - {None}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    if base.split(".")[0] != "app":
        return set()
    # `from app.x import y` imports the module app.x.y when there is one, else a name of app.x
    return {_resolve(f"{base}.{a.name}", modules) if f"{base}.{a.name}" in modules else _resolve(base, modules)
            for a in node.names} - {None}


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of app it imports, anywhere in its code."""
    files = {module_name(p): p for p in APP.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = set().union(*(_imported(n, package, set(files)) for n in ast.walk(tree))) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_reader_sees_lazy_relative_and_package_imports():
    graph = import_graph()
    assert "app.registry" in graph["app.config"]  # a module-level import
    assert "app.sources" in graph["app.data"]
    assert "app.tasks.nli_cot.backends" in graph["app.tasks.nli_cot.predict"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    package, modules = "app.tasks.ranking", {"app.tasks.ranking.model", "app.tasks.ranking", "app.data"}
    relative = ast.parse("def f():\n    from .model import build_objective\n    from ...data import Row\n")
    assert set().union(*(_imported(n, package, modules) for n in ast.walk(relative))) == {
        "app.tasks.ranking.model", "app.data"}


def test_the_floors_under_the_tasks_import_no_task():
    graph = import_graph()
    uphill = {(module, target) for module, targets in graph.items() for target in targets
              if module.startswith(FLOORS_UNDER_THE_TASKS) and module not in ALLOWED_UPHILL
              and target.split(".")[:2] == ["app", "tasks"]}
    assert not uphill, sorted(uphill)
    assert all(m in graph for m in ALLOWED_UPHILL)  # an exception that outlived its module goes


def test_the_engine_leaves_the_run_directory_side_work_to_its_command():
    """The base model, data sources, model card, curves and run report come in through the engine's hooks
    (app/train.py), so the engine imports none of the modules that write them, nor a command."""
    graph = import_graph()
    commands = ("app.train", "app.cli", "app.runs", "app.sources", "app.modelcard", "app.report")
    reached = {(m, t) for m, targets in graph.items() if m.startswith("app.engine") for t in targets
               if t.startswith(commands)}
    assert not reached, sorted(reached)


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def function_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """`Class.function` or `function` -> (lines from its first decorator to its last line, parameters besides self
    and cls), for every function of a source file, nested ones included."""
    sizes = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = f"{prefix}{getattr(child, 'name', '')}"
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                args = child.args
                params = [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, [args.vararg, args.kwarg])]
                sizes[name] = (child.end_lineno - first + 1, len([p for p in params if p.arg not in ("self", "cls")]))
                walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{name}.")

    walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), "")
    return sizes


def test_function_sizes_are_measured_from_the_source(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("class A:\n    @property\n    def f(self, a, *b, c=1, **d):\n        return 1\n\n"
                      "def g():\n    def h(x):\n        pass\n    return h\n", encoding="utf-8")
    assert function_sizes(source) == {"A.f": (3, 4), "g": (4, 0), "g.h": (2, 1)}


def test_engine_functions_are_short_and_take_few_parameters():
    """A training run reads in parts: no function of app/engine over 80 lines, none with more than 6 parameters (the
    run's state travels in one object, app.engine.loop.Run)."""
    sizes = {f"{path.relative_to(ROOT)}:{name}": size for path in sorted((APP / "engine").rglob("*.py"))
             for name, size in function_sizes(path).items()}
    assert len(sizes) > 50  # the engine's functions were read
    long = {name: lines for name, (lines, _) in sizes.items() if lines > ENGINE_MAX_LINES}
    wide = {name: params for name, (_, params) in sizes.items() if params > ENGINE_MAX_PARAMETERS}
    assert not long, long
    assert not wide, wide


def test_tiny_tokenizer_is_the_one_every_figure_was_measured_with():
    """Its corpus moved from the NLI sample set into app/lm/tiny.py: the same vocabulary and merges, so the tiny model
    (and every number the tests compute on it) stays the same."""
    from app.lm.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    digest = lambda value: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()  # noqa: E731
    assert len(tokenizer) == 532
    assert digest(model["vocab"]) == "cc0d647e16b3d84e4bc54e3825c7e2cd0d40ff25ec85422cbee254dc545c40c9"
    assert digest(model["merges"]) == "e065ecd40fe3174ca2b6ef8cfaf19d08fdcdf24b7477e384d515c814607b145e"
