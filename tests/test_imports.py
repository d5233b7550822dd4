"""The package's import structure: no import cycles, and `import posttrain.online` loads no backend.

The graph is read from the source with `ast`, counting every import statement, also those inside functions:
a function-level import that closes a loop (the engine interface importing its backends, which import the
interface) is a cycle too, one that only shows when that function runs first.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "posttrain"


def _modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its body). ``from pkg import name`` points at
    ``pkg.name`` when that is a module, else at ``pkg`` (its ``__init__``)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    targets.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_sees_a_cycle_closed_by_a_function_level_import(tmp_path):
    # the shape online/engines.py had: the interface imports a backend inside a function, the backend
    # imports the interface at module level; and `from . import x` / `from .pkg import name` edges
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .engines import Engine\n")
    (pkg / "engines.py").write_text("class Engine: ...\n\ndef make():\n    from .engine_hf import HF\n    return HF()\n")
    (pkg / "engine_hf.py").write_text("from .engines import Engine\nfrom . import sub\n\nclass HF(Engine): ...\n")
    (pkg / "sub" / "__init__.py").write_text("from ..engines import Engine\n")
    graph = import_graph(pkg)
    assert graph == {"p": {"p.engines"}, "p.engines": {"p.engine_hf"}, "p.engine_hf": {"p.engines", "p.sub"},
                     "p.sub": {"p.engines"}}
    assert find_cycle(graph) == ["p.engines", "p.engine_hf", "p.engines"]
    (pkg / "engines.py").write_text("class Engine: ...\n")  # the factory moved out: acyclic
    assert find_cycle(import_graph(pkg)) is None


def test_posttrain_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and "posttrain.online.rewards.compose" in graph  # the walk saw the package
    assert "posttrain.online.engines" in graph["posttrain.online.engine_hf"]  # edges are read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _fresh_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_posttrain_online_loads_no_backend():
    out = _fresh_python(
        "import sys, posttrain.online as o\n"
        "print(o.__file__)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('posttrain', 'vllm')))))\n"
        "o.RolloutServerError\n"  # a lazy name still resolves, and only then loads the client
        "print('client' if 'posttrain.online.client' in sys.modules else 'no client')\n"
    )
    where, loaded, client = out.strip().splitlines()
    assert where.startswith(str(ROOT))  # this checkout, not an installed copy
    loaded = set(loaded.split())
    for backend in ("vllm", "posttrain.online.engine_vllm", "posttrain.online.engine_hf", "posttrain.online.server",
                    "posttrain.online.client", "posttrain.online.rewards"):
        assert backend not in loaded, f"import posttrain.online loaded {backend}"
    assert {"posttrain.online.engines", "posttrain.online.engine_factory"} <= loaded
    assert client == "client"


def test_every_module_imports():
    """Every module imports (one fresh interpreter, in name order): no stale import after a move."""
    names = sorted(_modules())
    out = _fresh_python("import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names) + "print('ok')")
    assert out.strip() == "ok"
