"""
Guards the layout of the house, read from the source files' import statements (nothing is imported):

- the graph of imports between the project's own modules has no cycle;
- model.py imports none of ours; no module but the studies in bench/ imports a training stage (sft.py,
  grpo.py): objectives.py plugs into grpo.py and must not import it back;
- no stage or shared module imports a benchmark or study (bench/).
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"sft", "grpo"}


def project_modules():
    """{module name: path} of the top-level modules, data/ and bench/ (as data.x, bench.x)."""
    modules = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    for package in ("data", "bench"):
        for name in os.listdir(os.path.join(ROOT, package)):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                modules[module] = os.path.join(ROOT, package, name)
    return modules


def imports_of(path, modules):
    """The project modules a file imports (import x, from x import y, from x.y import z)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in modules}
    return found


def graph():
    modules = project_modules()
    return {module: imports_of(path, modules) - {module} for module, path in modules.items()}


def find_cycle(edges):
    """A list of modules forming a cycle, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    edges = graph()
    assert "grpo" in edges and "generate" in edges["grpo"]  # the graph is really read
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_stages_import_no_benchmark_and_no_other_stage():
    edges = graph()
    assert edges["model"] == set(), "model.py imports none of ours"
    for module, imported in edges.items():
        if module.startswith("bench") or module == "bench":
            continue
        assert not {m for m in imported if m.startswith("bench")}, f"{module} imports a benchmark"
        others = (imported & STAGES) - {module}
        assert not others, f"{module} imports the training stage(s) {others}"
