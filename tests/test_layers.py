"""A layered house without loops: the import graph of src/fsku, read with `ast` (module-level AND
function-level imports, relative and absolute), has no cycle; no module imports from a floor above
its own; only fsku.tracking imports mlflow.

Edges. ``import a.b.c`` and ``from a.b.c import X`` depend on a.b.c and on the packages a and a.b
(their __init__ runs first), except packages that contain the importer (already initialising).
``from P import name`` depends on P.name when that is a submodule; it depends on P itself when some
name is not a submodule (an attribute of P's __init__) or when P does not contain the importer.
So ``from . import prompts`` is an edge to the sibling only, while ``from . import Generation`` in a
submodule is an edge to its package's __init__ (which, importing the submodule, closes a loop). A
package __init__ importing one of its submodules, even lazily inside a function, is an edge too.
Imports under ``if TYPE_CHECKING:`` would count as well (there are none); importlib strings do not.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The floors, bottom up: a module may import modules of its own floor and of floors below, never above.
# A name matches a module and everything under it (``fsku.llm`` covers fsku.llm.hf); the longest
# matching name decides. Every module must have a floor: a new module is placed here on purpose.
FLOORS: dict[str, int] = {
    # 0, ground floor: settings, named choices, the project home, stores, text, retrieval maths,
    # indexes and the LLM runtimes. Importable anywhere; imports no stage (and no torch to validate a config).
    "fsku": 0,  # the package __init__ (version only)
    "fsku.choices": 0, "fsku.config": 0, "fsku.home": 0, "fsku.stores": 0, "fsku.jsonl": 0,
    "fsku.ingest": 0, "fsku.chunk": 0, "fsku.retrieve": 0, "fsku.index": 0, "fsku.llm": 0,
    "fsku.hierarchy": 0,  # statute levels and the references between articles (text rules)
    "fsku.rerank": 0,  # second-stage scoring of retrieved passages (a cross-encoder or the LLM runtime)
    "fsku.outputs": 0,  # outputs that never overwrite an input nor replace a folder another wrote
    "fsku.errors": 0,  # the expected errors of a command and their one-line form (the bundle uses it too)
    # 1: the knowledge base (built from the ground floor) and tracking, the only MLflow importer (its
    # pyfunc wrappers load a KB or an LLM); bulk retrieval over a loaded KB
    "fsku.kb": 1, "fsku.tracking": 1, "fsku.bulk_retrieve": 1,
    # 2: the stages
    "fsku.infer": 2, "fsku.synth": 2, "fsku.distill": 2, "fsku.quantize": 2, "fsku.evaluate": 2,
    "fsku.tune": 2, "fsku.package": 2, "fsku.registry": 2,
    # 3: entry points: where config, files and MLflow meet
    "fsku.steps": 3, "fsku.cli": 3,
}
FLOOR_NAMES = {0: "ground floor", 1: "kb/tracking", 2: "stages", 3: "entry points"}
MLFLOW_IMPORTERS = {"fsku.tracking"}


def discover(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package __init__) for every .py file under src/package."""
    mods = {}
    for path in sorted((src / package).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def build_graph(src: Path, package: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> the project modules it imports, project module -> the top-level external
    names it imports)."""
    mods = discover(src, package)
    graph: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        containing = set(_prefixes(mod)[:-1]) | ({mod} if is_pkg else set())  # packages already initialising
        here = mod if is_pkg else mod.rpartition(".")[0]
        deps: set[str] = set()
        ext: set[str] = set()

        def depend_on(target: str, needs_attribute: bool = False) -> None:
            # the target and the packages above it, minus those already initialising around the
            # importer, unless an attribute of the target itself (its __init__'s namespace) is needed
            for name in _prefixes(target):
                if name in mods and (name not in containing or (needs_attribute and name == target)):
                    deps.add(name)

        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        depend_on(alias.name)
                    else:
                        ext.add(alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != package:
                    ext.add(target.split(".")[0])
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                for sub in subs:
                    depend_on(sub)
                # an attribute of `target` itself needs its __init__, even when it contains the importer
                depend_on(target, needs_attribute=len(subs) < len(node.names))
        deps.discard(mod)
        graph[mod] = deps
        external[mod] = ext
    return graph, external


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (a path back to its start) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan, recursive (the graph is small)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in components:
        start = min(comp)
        # breadth-first inside the component from start back to start: the shortest loop through it
        paths = {start: [start]}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == start:
                        found = paths[v] + [start]
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        cycles.append(found or sorted(comp))
    return cycles


def floor_of(module: str) -> int | None:
    # the package root names only its __init__: as a prefix it would give every module a floor
    matches = [name for name in FLOORS if module == name or (name != "fsku" and module.startswith(name + "."))]
    return FLOORS[max(matches, key=len)] if matches else None


@pytest.fixture(scope="module")
def fsku_graph():
    return build_graph(SRC, "fsku")


def test_no_import_cycles(fsku_graph):
    graph, _ = fsku_graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/fsku:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_every_module_has_a_floor(fsku_graph):
    graph, _ = fsku_graph
    missing = sorted(m for m in graph if floor_of(m) is None)
    assert not missing, f"modules without a floor (add them to FLOORS in {Path(__file__).name}): {missing}"


def test_no_module_imports_from_a_floor_above(fsku_graph):
    graph, _ = fsku_graph
    upward = [f"{m} ({FLOOR_NAMES[floor_of(m)]}) -> {d} ({FLOOR_NAMES[floor_of(d)]})"
              for m in sorted(graph) for d in sorted(graph[m])
              if floor_of(m) is not None and floor_of(d) is not None and floor_of(d) > floor_of(m)]
    assert not upward, "imports from a higher floor:\n" + "\n".join("  " + u for u in upward)


def test_ground_floor_imports_no_stage(fsku_graph):
    """The requirement the floors exist for, stated on its own: config, llm, stores, jsonl, ingest,
    chunk, retrieve and index import nothing from the stages (nor kb, tracking, steps)."""
    graph, _ = fsku_graph
    bad = {m: sorted(d for d in deps if floor_of(d) != 0) for m, deps in graph.items() if floor_of(m) == 0}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_config_validation_needs_no_torch(fsku_graph):
    """Building (and so validating) a config reaches only the ground floor's plain modules, and in a
    fresh interpreter imports neither torch nor any stage."""
    import subprocess
    import sys

    graph, external = fsku_graph
    seen, todo = set(), ["fsku.config"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    assert seen <= {"fsku", "fsku.config", "fsku.choices"}, sorted(seen)
    assert not any("torch" in external[m] for m in seen)
    code = ("import sys, fsku.config as c\n"
            "for name in ('DistillConfig', 'QuantizeConfig', 'InferConfig', 'EvaluateConfig'):\n"
            "    getattr(c, name)()\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('fsku')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['fsku', 'fsku.choices', 'fsku.config']", out


def test_only_tracking_imports_mlflow(fsku_graph):
    _, external = fsku_graph
    importers = {m for m, ext in external.items() if "mlflow" in ext}
    assert importers <= MLFLOW_IMPORTERS, f"modules importing mlflow besides tracking: {sorted(importers - MLFLOW_IMPORTERS)}"


def test_the_layers_match_the_documented_ground_floor():
    """The ground floor named in the issue is in the table as such (a guard against a silent re-floor)."""
    for name in ("fsku.config", "fsku.llm", "fsku.llm.hf", "fsku.stores", "fsku.jsonl", "fsku.ingest", "fsku.chunk",
                 "fsku.retrieve", "fsku.index.dense", "fsku.choices", "fsku.home"):
        assert floor_of(name) == 0, name
    for name in ("fsku.infer", "fsku.synth.pipeline", "fsku.distill.losses", "fsku.quantize", "fsku.evaluate",
                 "fsku.tune", "fsku.package", "fsku.steps.build_kb", "fsku.registry", "fsku.kb", "fsku.tracking"):
        assert floor_of(name) > 0, name


# ----------------------------------------------------------------------------- the checker itself

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    _write(tmp_path, {
        "toy/__init__.py": "",
        "toy/a.py": "from .b import helper\n",
        "toy/b.py": "def helper():\n    from . import a\n    return a\n",
        "toy/c.py": "from toy import a\n",
    })
    graph, _ = build_graph(tmp_path, "toy")
    assert graph["toy.a"] == {"toy.b"} and graph["toy.b"] == {"toy.a"} and graph["toy.c"] == {"toy.a"}
    assert find_cycles(graph) == [["toy.a", "toy.b", "toy.a"]]


def test_checker_sees_a_submodule_using_its_package_init(tmp_path):
    """The old fsku.llm shape: the __init__ defines the interface and imports a backend lazily; the
    backend imports the interface from the package."""
    _write(tmp_path, {
        "toy/__init__.py": "",
        "toy/llm/__init__.py": "class Base: ...\n\ndef load():\n    from .hf import Backend\n    return Backend()\n",
        "toy/llm/hf.py": "from . import Base\n\nclass Backend(Base): ...\n",
        "toy/llm/tiny.py": "from . import hf\n",  # a sibling submodule only: no edge to the __init__
    })
    graph, _ = build_graph(tmp_path, "toy")
    assert graph["toy.llm.tiny"] == {"toy.llm.hf"}
    assert find_cycles(graph) == [["toy.llm", "toy.llm.hf", "toy.llm"]]


def test_checker_counts_package_inits_and_external_imports(tmp_path):
    _write(tmp_path, {
        "toy/__init__.py": "",
        "toy/low/__init__.py": "from ..high import thing\n",
        "toy/low/x.py": "import mlflow.pyfunc\nimport os\n",
        "toy/high.py": "from .low.x import y\nthing = 1\n",
    })
    graph, external = build_graph(tmp_path, "toy")
    assert graph["toy.high"] == {"toy.low", "toy.low.x"}  # importing toy.low.x runs toy/low/__init__ first
    assert external["toy.low.x"] == {"mlflow", "os"}
    assert find_cycles(graph) == [["toy.high", "toy.low", "toy.high"]]


def test_choice_tables_are_shared_with_their_implementations():
    """The named-choice tables live in fsku.choices; the implementing modules use the very same objects
    (fsku.quantize also checks at import that it implements exactly the listed methods)."""
    from fsku import choices, quantize
    from fsku.distill import losses
    from fsku.infer import prompts

    assert losses.LOSS_TYPES is choices.LOSS_TYPES and losses.LossSpec is choices.LossSpec
    assert prompts.MC_STYLES is choices.MC_STYLES and prompts.MCStyle is choices.MCStyle
    assert quantize.METHODS is choices.QUANT_METHODS and set(quantize.IMPLEMENTATIONS) == set(choices.QUANT_METHODS)
    assert all(spec.name == name for name, spec in choices.QUANT_METHODS.items())
