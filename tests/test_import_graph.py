"""The import graph of the packages (DESIGN.md, "Who owns what"): data <- towers (with its inference layer,
towers.inference) <- eval and serve side by side; train imports data, towers and eval, never serve. Every
import counts, those inside functions too, and no two modules import each other, directly or in a cycle."""
import ast
import pathlib

from tests.helpers import REPO

PACKAGES = ("data", "towers", "eval", "serve", "train")
# Which packages each package must not import.
FORBIDDEN = {"data": {"towers", "train", "eval", "serve"}, "towers": {"train", "eval", "serve"},
             "eval": {"serve", "train"}, "serve": {"eval", "train"}, "train": {"serve"}}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, modules: dict) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (`from data import split` -> data.split)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """{module: modules of data/towers/eval/serve/train it imports (anywhere in its body)}."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                assert not isinstance(node, ast.ImportFrom), f"{path}: relative import (use absolute imports)"
                continue
            targets |= {t for t in (_resolve(n, modules) for n in names) if t and t != module}
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_own_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's `__init__` importing its own submodules is how packages export names, and a submodule
    importing a sibling runs that `__init__` first; neither is a cycle between modules. Edges from a package
    to modules inside it are dropped."""
    return {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph.items()}


def test_no_package_imports_upwards_or_sideways():
    bad = [f"{m} -> {t}" for m, targets in import_graph().items() for t in sorted(targets)
           if t.split(".")[0] in FORBIDDEN[m.split(".")[0]]]
    assert not bad, bad


def test_the_inference_layer_sits_below_eval_and_serve_which_both_use_it():
    graph = import_graph()
    layer = [m for m in graph if m.startswith("towers.inference")]
    assert {"towers.inference.embed", "towers.inference.search", "towers.inference.exact",
            "towers.inference.vocab"} <= set(layer)
    users = {m.split(".")[0] for m, targets in graph.items() for t in targets if t.startswith("towers.inference")}
    assert {"eval", "serve"} <= users


def test_no_import_cycles_between_modules():
    cycles = _cycles(_without_own_package_inits(import_graph()))
    assert not cycles, cycles


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The walk finds imports inside functions, and the cycle finder reports a two-module cycle."""
    graph = import_graph()
    assert "towers.inference.exact" in graph["serve.candidates.search"]      # imported inside a method
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
