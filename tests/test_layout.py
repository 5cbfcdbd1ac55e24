"""Imports point one way -- tfbit (the library) <- conversion (the converter) <- benchmarks and
tools -- and no two modules import each other, even through imports inside functions."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["tfbit", "conversion", "benchmarks"]  # each may import only the ones before it


def _modules():
    modules = {}
    for package in LAYERS:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if file.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].replace(os.sep, ".")
                    modules[rel.removesuffix(".__init__")] = os.path.join(folder, file)
    return modules


def _imports(path, name, is_package, known):
    """Every module `path` imports, at any depth of its code (lazy imports included).
    `from package import module` is an import of that module (the package's __init__ runs
    first whatever a module does, so it is not a dependency of the importer's design)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            submodules = {f"{module}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {module})
            if len(submodules) < len(node.names):
                found.add(module)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    edges = {}
    for name, path in modules.items():
        targets = _imports(path, name, path.endswith("__init__.py"), set(modules))
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def test_modules_are_found(graph):
    assert {"tfbit.models.bit", "tfbit.weights.hf", "conversion.convert", "tfbit.finetune.trainer"} <= set(graph)
    assert "tfbit.weights.hub" in graph["tfbit.weights.hf"] and "tfbit.models.bit" in graph["tfbit.models.pretrained"]
    assert "tfbit.weights" in graph["tfbit.models.bit"]  # from_pretrained's lazy import is seen


def test_imports_point_from_the_application_to_the_library(graph):
    wrong = [
        f"{a} imports {b}"
        for a, targets in graph.items()
        for b in targets
        if LAYERS.index(b.split(".")[0]) > LAYERS.index(a.split(".")[0])
    ]
    assert not wrong, wrong


def test_no_import_cycles(graph):
    cycles = []

    def visit(node, path):
        for target in graph[node]:
            if target in path:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(node)

    done = set()
    for node in sorted(graph):
        if node not in done:
            visit(node, [node])
    assert not cycles, cycles


# Constructors whose parameters are transformers' own (a user passes them by the same names).
MIRRORS_TRANSFORMERS = {"tfbit/preprocessing/processor.py:BitImageProcessor.__init__"}
MAX_PARAMETERS, MAX_LINES = 8, 60


def _functions():
    """(where, parameter count, line count) of every function of the library and the CLIs;
    self/cls and *args/**kwargs are not counted, nested functions count in their parent too."""
    for package in ("tfbit", "conversion"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for file in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, file)
                tree = ast.parse(open(path, encoding="utf-8").read())
                for owner in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]:
                    prefix = "" if owner is tree else f"{owner.name}."
                    for node in owner.body:
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            args = node.args
                            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                            count = len(names) - (1 if names[:1] in (["self"], ["cls"]) and prefix else 0)
                            where = f"{os.path.relpath(path, ROOT)}:{prefix}{node.name}"
                            yield where, count, node.end_lineno - node.lineno + 1


def test_functions_take_at_most_8_parameters_and_60_lines():
    """Issue 21: state travels in request/options objects, long functions are split into steps."""
    functions = list(_functions())
    assert len(functions) > 300 and any(w.endswith("convert.py:main") for w, _, _ in functions)
    wide = [f"{w} ({n} parameters)" for w, n, _ in functions if n > MAX_PARAMETERS and w not in MIRRORS_TRANSFORMERS]
    long = [f"{w} ({n} lines)" for w, _, n in functions if n > MAX_LINES]
    assert not wide and not long, wide + long
