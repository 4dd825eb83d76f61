"""The package reads as floors: no import circles, and the floor rules of docs/ARCHITECTURE.md hold.

Every import statement counts, function-level (lazy) ones too: a lazy import that points back up is a
circle all the same. `from pkg import name` counts as an import of `pkg.name` when that is a module.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("qdit4sr_jax", "converters")


def _module_name(p: pathlib.Path) -> str:
    parts = list(p.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """{module: {imported project modules}} over the project's packages (package __init__ files included)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for mod, p in files.items():
        deps = set()
        is_pkg = p.name == "__init__.py"
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:                                   # relative import
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    pkg = ".".join(base + ([node.module] if node.module else []))
                else:
                    pkg = node.module or ""
                targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in files else pkg for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:                     # `import a.b.c` of a name: its module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """A package __init__ counts as a module: its re-exports are imports of its children, so a child that
    imports from its own package's __init__ closes a circle (as it does for Python)."""
    cycles = _cycles(import_graph())
    assert not cycles, "import circles (each a set of modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_floor_rules():
    graph = import_graph()
    q = "qdit4sr_jax.quant."
    rules = [
        # (importer prefix, forbidden import prefix, why)
        ("qdit4sr_jax.quant.kernels", "qdit4sr_jax.quant.linear", "kernels never import linear() back"),
        ("qdit4sr_jax.model", q + "api", "the model uses only linear() from quant"),
        ("qdit4sr_jax.metrics", "qdit4sr_jax.quant", "metrics are floor 1"),
        ("qdit4sr_jax.config", "qdit4sr_jax.quant.api", "config is floor 1"),
    ]
    for low in ("quantizer", "transforms", "qweight"):                   # floor 2 primitives
        for high in ("plan", "hsvd", "vasmp", "vatmp", "baselines", "qdit4sr", "api", "calibrate"):
            rules.append((q + low, q + high, f"{low} is a primitive (floor 2), {high} sits above it"))
    for mid in ("plan", "hsvd", "vasmp", "vatmp"):                       # floor 3 planning / solvers
        for high in ("baselines", "qdit4sr", "api"):
            rules.append((q + mid, q + high, f"{mid} (floor 3) must not import the recipe / entry {high}"))
    bad = [f"{a} imports {b}: {why}" for a, deps in graph.items() for b in deps
           for imp, forb, why in rules if a.startswith(imp) and b.startswith(forb)]
    assert not bad, "\n".join(bad)
