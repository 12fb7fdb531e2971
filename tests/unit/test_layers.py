"""The package's import structure (issue 23): no import circle between its modules, counting imports inside
functions too, and no module importing from a higher layer: base (config, dist, atomic, precision) < data, model,
method < accel < engine < inference < entry. Read from the source with ast, so it covers code no test happens to
run. And method/ is plain maths: no environment reads, caches, threads, compiled libraries or kernels."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "u2pl_scale"
LAYERS = {"config": 0, "config_schema": 0, "dist": 0, "atomic": 0, "precision": 0, "data": 1, "model": 1,
          "method": 1, "accel": 1.5, "engine": 2, "inference": 3, "entry": 4}
# what u2pl_scale/method must not use: the process-global or device-specific machinery that u2pl_scale/accel holds
NOT_IN_METHOD = ("os.environ", "getenv", "lru_cache", "functools.cache", "import threading", "ctypes",
                 "import triton", "torch.cuda", "set_num_threads", "global ", "_POOL")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The u2pl_scale modules a file imports (absolute or relative, at any depth of the file)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("u2pl_scale")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("u2pl_scale"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}  # `from . import native` names a module
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in imports(p) if t in files and t != name} for name, p in files.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the circle it closes. A package's own __init__ imported by one
    of its modules is not followed (importing a package runs its __init__, which may name its modules)."""
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(m, t) for m, ts in edges.items() for t in ts
            if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)]


def test_no_import_circle():
    assert cycles(graph()) == []


def test_no_import_from_a_higher_layer():
    assert upward(graph()) == []


def test_method_holds_no_process_state_and_no_device_knowledge():
    found = [(path.name, word) for path in sorted((PACKAGE / "method").glob("*.py"))
             for word in NOT_IN_METHOD if word in path.read_text()]
    assert found == []
    assert not list((PACKAGE / "method").glob("*.c"))


def test_the_checks_find_a_planted_circle_and_an_upward_import(tmp_path, monkeypatch):
    """data.a imports engine.b at module level, engine.b imports data.a inside a function."""
    pkg = tmp_path / "u2pl_scale"
    for folder in ("data", "engine"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from ..engine import b\n")
    (pkg / "engine" / "b.py").write_text("def f():\n    from u2pl_scale.data.a import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    edges = graph()
    assert cycles(edges) == [["u2pl_scale.data.a", "u2pl_scale.engine.b", "u2pl_scale.data.a"]]
    assert ("u2pl_scale.data.a", "u2pl_scale.engine.b") in upward(edges)
