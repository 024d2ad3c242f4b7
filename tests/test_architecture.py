"""The structure docs/architecture.md describes, checked by static analysis of harness/ (ast only: nothing is
imported, so this runs in well under a second): no module over 500 lines, no function over 80, and imports
pointing one way, down the layers below. Every test lists all its violations at once.

Run as a script to print every violation: ``python tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "harness"
DOC = ROOT / "docs" / "architecture.md"

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

# The layers, lowest first: a module may import its own layer and the layers below it, never one above.
# A name stands for the module and, for a package, everything in it. Keep in step with docs/architecture.md.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("harness._version", "harness.errors", "harness.exitcodes", "harness.config", "harness.faults",
              "harness.dist", "harness.exiting", "harness.state", "harness.determinism", "harness.stepsync",
              "harness.sameconfig", "harness.progress", "harness.data", "harness.workloads", "harness.synthetic",
              "harness.layout", "harness.torchcompat", "harness.hostinfo", "harness.gcpause",
              "harness.launch_folder", "harness.stopping", "harness.srun")),
    ("storage", ("harness.storage",)),
    ("checkpoint", ("harness.checkpoint", "harness.lease", "harness.prefetch")),
    ("recipe", ("harness.recipe",)),
    ("interop", ("harness.interop",)),
    ("trainer", ("harness.trainer",)),
    ("entry points", ("harness.ckpt_cli", "harness.ckpt_parser", "harness.ckpt_folder", "harness.ckpt_interop",
                      "harness.ckpt_render", "harness.launch", "harness.launch_args",
                      "harness.rendezvous",
                      "harness.workerstart", "harness.preload",
                      "harness.cli",
                      "harness.__main__")),
    # The package root re-exports the public API from every layer, so importing it from inside the package
    # (`import harness` for __version__, say) is an import from the top.
    ("public API", ("harness",)),
]

# Inside a package, the facade sits on top: (package, facade module) - no module of the package but its
# __init__ imports the facade (the storage backends never use the Storage facade; save/restore never go
# through the CheckpointManager).
FACADES: list[tuple[str, str]] = [
    ("harness.storage", "harness.storage.facade"),
    ("harness.checkpoint", "harness.checkpoint.manager"),
]


@dataclass(frozen=True)
class Module:
    name: str     # dotted: harness.checkpoint.save
    path: Path
    rel: str      # harness/checkpoint/save.py
    is_package: bool


@dataclass(frozen=True)
class Import:
    target: str   # dotted module the statement imports
    line: int


def modules(package: Path = PACKAGE) -> list[Module]:
    out = []
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out.append(Module(".".join(parts), path, path.relative_to(package.parent).as_posix(), is_package))
    return out


def layer_of(name: str) -> int | None:
    """Index in LAYERS of the longest name that is ``name`` or a package containing it; None if unmapped."""
    best: tuple[int, int] | None = None
    for index, (_, names) in enumerate(LAYERS):
        for prefix in names:
            if name == prefix or (name.startswith(prefix + ".") and prefix != "harness"):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    return None if best is None else best[1]


def imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every harness module imported anywhere in the tree: top level, inside functions (lazy imports are
    dependencies too), ``if TYPE_CHECKING`` blocks, and importlib.import_module("harness.x") calls.
    ``from P import n`` imports P.n when that is a module in ``known``, else P itself."""
    out: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append(Import(sub if sub in known else base, node.lineno))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in ("import_module", "__import__"):
                out.append(Import(node.args[0].value, node.lineno))
    return [i for i in out if i.target == "harness" or i.target.startswith("harness.")]


def dependency_violations(mods: list[Module] | None = None) -> list[str]:
    mods = modules() if mods is None else mods
    known = {m.name for m in mods}
    problems = []
    for m in mods:
        own = layer_of(m.name)
        if own is None:
            problems.append(f"{m.rel}: {m.name} is in no layer: add it to LAYERS in tests/test_architecture.py "
                            f"and to docs/architecture.md")
            continue
        if m.name == "harness":
            continue  # the public API on top may import anything
        tree = ast.parse(m.path.read_text(), filename=str(m.path))
        for imp in imports(tree, m.name, m.is_package, known):
            target = layer_of(imp.target)
            if target is not None and target > own:
                allowed = ", ".join(name for name, _ in LAYERS[:own + 1])
                problems.append(f"{m.rel}:{imp.line}: {m.name} (layer '{LAYERS[own][0]}') imports {imp.target} "
                                f"(layer '{LAYERS[target][0]}', above it; allowed: {allowed})")
            for package, facade in FACADES:
                inside = m.name.startswith(package + ".") and m.name != facade
                if inside and (imp.target == facade or imp.target.startswith(facade + ".")):
                    problems.append(f"{m.rel}:{imp.line}: {m.name} imports the facade {facade} of its own "
                                    f"package (only {package.replace('.', '/')}/__init__.py may)")
    return problems


def long_functions(tree: ast.AST, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function or method, nested ones included, longer than ``limit``
    lines from its ``def`` to its last line."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    found.append((name, lines))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def function_violations(mods: list[Module] | None = None) -> list[str]:
    out = []
    for m in modules() if mods is None else mods:
        tree = ast.parse(m.path.read_text(), filename=str(m.path))
        out += [f"{m.rel}:{name}:{lines} lines" for name, lines in long_functions(tree)]
    return out


def module_violations(mods: list[Module] | None = None) -> list[str]:
    out = []
    for m in modules() if mods is None else mods:
        lines = len(m.path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            out.append(f"{m.rel}: {lines} lines")
    return out


def _report(what: str, problems: list[str]) -> str:
    return f"{len(problems)} {what}:\n  " + "\n  ".join(problems)


# -- the checks -------------------------------------------------------------------------------------------

def test_no_module_over_500_lines():
    problems = module_violations()
    assert not problems, _report(f"modules in harness/ over {MAX_MODULE_LINES} lines", problems)


def test_no_function_over_80_lines():
    problems = function_violations()
    assert not problems, _report(f"functions in harness/ over {MAX_FUNCTION_LINES} lines (file:function:lines)",
                                 problems)


def test_dependencies_point_one_way():
    problems = dependency_violations()
    assert not problems, _report("imports against the one-way dependency rule (docs/architecture.md)", problems)


def test_every_layer_is_in_the_doc():
    """docs/architecture.md names every module and package of the layer map (`name` or `name/`)."""
    doc = DOC.read_text()
    names = [name.split(".", 1)[1] for _, group in LAYERS for name in group if name != "harness"]
    missing = [n for n in names if f"`{n}`" not in doc and f"`{n}/" not in doc and f"{n}.py" not in doc]
    assert not missing, f"docs/architecture.md does not mention: {missing}"


# -- the checker catches what it should (a checker that finds nothing must not pass by accident) -----------

def _fake_tree(tmp_path: Path, files: dict[str, str]) -> list[Module]:
    for rel, src in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(src)
    return modules(tmp_path / "harness")


def test_checker_finds_upward_imports_of_every_form(tmp_path):
    mods = _fake_tree(tmp_path, {
        "harness/__init__.py": "from harness.checkpoint.save import save\n__version__ = '0'\n",
        "harness/trainer.py": "from harness.checkpoint import save\n",
        "harness/recipe.py": "",
        "harness/cli.py": "",
        "harness/faults.py": "",
        "harness/storage/__init__.py": "from .local import LocalBackend\n",
        "harness/storage/local.py": "from ..checkpoint import format\n",
        "harness/checkpoint/__init__.py": "",
        "harness/checkpoint/format.py": "from harness.storage import local\n",
        "harness/checkpoint/manager.py": "from harness.checkpoint.save import save\n",
        "harness/checkpoint/restore.py": "from . import manager\n",
        "harness/checkpoint/save.py": ("import harness\n"
                                       "from harness import trainer, faults\n"
                                       "def f():\n    from harness.recipe import build\n"
                                       "    import importlib\n    importlib.import_module('harness.cli')\n"),
        "harness/extra.py": "",
    })
    got = dependency_violations(mods)
    text = "\n".join(got)
    for expected in ["harness/storage/local.py:1: harness.storage.local (layer 'storage') imports harness.checkpoint",
                     "harness/checkpoint/save.py:1: harness.checkpoint.save (layer 'checkpoint') imports harness ",
                     "save.py:2: harness.checkpoint.save (layer 'checkpoint') imports harness.trainer",
                     "save.py:4: harness.checkpoint.save (layer 'checkpoint') imports harness.recipe",
                     "save.py:6: harness.checkpoint.save (layer 'checkpoint') imports harness.cli",
                     "harness/extra.py: harness.extra is in no layer",
                     "harness/checkpoint/restore.py:1: harness.checkpoint.restore imports the facade "
                     "harness.checkpoint.manager"]:
        assert expected in text, f"{expected!r} not in:\n{text}"
    assert len(got) == 7, text  # nothing else: downward and same-layer imports are fine


def test_checker_measures_modules_and_functions(tmp_path):
    def body(n: int, indent: str) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    source = ("class A:\n    def m(self):\n" + body(80, " " * 8)           # def + 80 lines: 81
              + "def ok():\n" + body(79, " " * 4)                          # def + 79 lines: 80, the limit
              + "def outer():\n    def inner():\n" + body(81, " " * 8))   # 83 and 82
    source += "\n" * (MAX_MODULE_LINES + 1 - len(source.splitlines()))
    mods = _fake_tree(tmp_path, {"harness/errors.py": source})
    assert function_violations(mods) == ["harness/errors.py:A.m:81 lines", "harness/errors.py:outer:83 lines",
                                         "harness/errors.py:outer.inner:82 lines"]
    assert module_violations(mods) == [f"harness/errors.py: {MAX_MODULE_LINES + 1} lines"]
    (tmp_path / "harness/errors.py").write_text(source.rstrip("\n") + "\n")
    assert module_violations(mods) == []


if __name__ == "__main__":
    found = 0
    for title, problems in [("modules over %d lines" % MAX_MODULE_LINES, module_violations()),
                            ("functions over %d lines" % MAX_FUNCTION_LINES, function_violations()),
                            ("dependency violations", dependency_violations())]:
        print(_report(title, problems) if problems else f"0 {title}")
        found += len(problems)
    sys.exit(1 if found else 0)
