"""The package's layers, read from the imports (ast): no cycle, no upward import, methods independent of each other,
no library module over ~600 lines, and the training step's hooks called from one place."""
import ast
import shutil
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module may import from its own layer or a lower one; `nn` and `data` share a layer but are
# independent of each other.
LAYERS = [
    ["sparsetrain", "sparsetrain.errors", "sparsetrain.config", "sparsetrain.progress", "sparsetrain.plots",
     "sparsetrain.frontier"],
    ["sparsetrain.nn", "sparsetrain.data"],
    ["sparsetrain.store"],
    ["sparsetrain.methods"],
    ["sparsetrain.training"],
    ["sparsetrain.cli"],
    ["sparsetrain_bench"],
]
INDEPENDENT = [("sparsetrain.nn", "sparsetrain.data")]
# What every method may share; anything else under methods/ is one method, which no other method imports.
METHOD_SHARED = {"sparsetrain.methods", "sparsetrain.methods.base", "sparsetrain.methods.units",
                 "sparsetrain.methods.frozen", "sparsetrain.methods.shards"}
# Imports inside functions: only where the command line loads a command's heavy dependencies when it runs.
LAZY_IMPORTS_ALLOWED = {"sparsetrain.cli.commands"}
# The one import that goes up a layer: `sparsetrain bench` / `sparsetrain report` dispatch to the benchmarks.
DISPATCH = ("sparsetrain.cli.commands", "sparsetrain_bench")
MAX_LINES = 600


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for top in ("sparsetrain", "sparsetrain_bench"):
        for p in (src / top).rglob("*.py"):
            rel = p.relative_to(src).with_suffix("")
            out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a project module."""
    tree = ast.parse(path.read_text())
    in_function = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(fn) if n is not fn}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            # a module importing its own package (`from sparsetrain.methods.ssd.x import`) is not a dependency on it
            if t and t != name and not name.startswith(t + "."):
                out.append((t, node.lineno, id(node) in in_function))
                break
    return out


def layer_of(module: str) -> int:
    best = max((p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def group_of(module: str) -> str:
    return max((p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")), key=len)


def method_of(module: str) -> str | None:
    """'sparsetrain.methods.sat' for methods.sat and for every module of methods/ssd/ as methods.ssd; None for the
    shared pieces and modules outside methods."""
    if not module.startswith("sparsetrain.methods.") or module in METHOD_SHARED:
        return None
    return ".".join(module.split(".")[:3])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def violations(src: Path) -> list[str]:
    known = modules(src)
    graph = {m: set() for m in known}
    out = []
    for name, path in sorted(known.items()):
        for target, line, lazy in imports(name, path, known):
            graph[name].add(target)
            where = f"{path.relative_to(src)}:{line}: {name} imports {target}"
            if (name, target.split(".")[0]) == DISPATCH or (name.startswith(DISPATCH[0]) and target == DISPATCH[1]):
                if not lazy:
                    out.append(f"{where}: the benchmark dispatch must stay inside the command")
                continue
            if layer_of(target) > layer_of(name):
                out.append(f"{where}: an upward import ({group_of(name)} is below {group_of(target)})")
            if {group_of(name), group_of(target)} in [set(pair) for pair in INDEPENDENT]:
                out.append(f"{where}: {group_of(name)} and {group_of(target)} are independent")
            mine, theirs = method_of(name), method_of(target)
            if name.startswith("sparsetrain.methods.") and theirs is not None and mine != theirs:
                out.append(f"{where}: a method imports another method (shared pieces go to units/frozen/shards)")
            if lazy and name not in LAZY_IMPORTS_ALLOWED:
                out.append(f"{where}: an import inside a function (only the command line loads lazily)")
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            out.append(f"{path.relative_to(src)}: {lines} lines (more than {MAX_LINES})")
    out += ["import cycle: " + " -> ".join(c) for c in cycles(graph)]
    return out


def test_the_package_has_layers_and_no_cycles():
    assert violations(SRC) == []


def test_an_upward_import_a_cycle_and_a_method_importing_another_are_caught(tmp_path):
    def tree_with(path: str, line: str) -> Path:
        src = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
        target = src / path
        target.write_text(line + "\n" + target.read_text())
        return src

    upward = violations(tree_with("sparsetrain/nn/model.py", "from sparsetrain.training.loop import train"))
    assert any("upward import" in v and "sparsetrain.nn.model imports sparsetrain.training.loop" in v for v in upward)
    assert any(v.startswith("import cycle") for v in upward)  # training imports nn: now a circle
    across = violations(tree_with("sparsetrain/methods/sat.py", "from sparsetrain.methods.upcycle import Upcycle"))
    assert any("a method imports another method" in v for v in across)
    hidden = violations(tree_with("sparsetrain/store/hf.py", "def f():\n    from sparsetrain.nn import moe"))
    assert any("inside a function" in v for v in hidden)
    bench = violations(tree_with("sparsetrain/training/loop.py", "import sparsetrain_bench.steps"))
    assert any("upward import" in v for v in bench)


def test_the_step_hooks_are_called_in_one_place():
    """The training step (hook order, micro-batches, clipping, optimizer) is written once, in training/step.py: the
    trainer, the step benchmarks, the bench scripts and the tests' helpers call it (unit tests may still call one
    hook to look at a method's state after it)."""
    calls = [f"{p.relative_to(SRC.parent)}:{n}" for d in (SRC, SRC.parent / "bench")
             for p in sorted(d.rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if ".before_optimizer(" in line and not line.strip().startswith(("def ", "#"))]
    assert len(calls) == 1 and calls[0].startswith("src/sparsetrain/training/step.py:"), calls
