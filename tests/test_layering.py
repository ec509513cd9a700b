"""The package layering of docs/architecture.md: `eval` builds on `train`, never the other way round.

Read from the source with `ast`, so imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    """src/sparsek/train/loop.py -> "sparsek.train.loop"; a package's __init__.py -> the package."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it, as absolute names: `from . import checkpoint` in
    sparsek/train/loop.py gives both "sparsek.train" and "sparsek.train.checkpoint" (the name may be a module)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports_of(package: str) -> dict[str, set[str]]:
    """{module: the modules it imports} for every module of `package` ("sparsek.train")."""
    folder = SRC.joinpath(*package.split("."))
    return {module_name(path): imported_modules(path) for path in sorted(folder.rglob("*.py"))}


def test_imports_resolve_relative_names():
    """The resolution the layering checks rest on: relative imports become the modules they name."""
    loop = imported_modules(SRC / "sparsek" / "train" / "loop.py")
    assert {"sparsek.train.checkpoint", "sparsek.train.steps", "sparsek.models", "torch"} <= loop
    assert "sparsek.train.loop" in imported_modules(SRC / "sparsek" / "train" / "__init__.py")


def test_train_never_imports_eval():
    """`train` runs its held-out evaluations through `sparsek.heldout` and plots its runs itself (`train.plots`),
    so no module of it imports `eval`; `eval` may import `train` (its run loaders and distillation)."""
    offenders = {module: sorted(name for name in names if within(name, "sparsek.eval"))
                 for module, names in imports_of("sparsek.train").items()}
    assert not {module: names for module, names in offenders.items() if names}


def test_heldout_loss_imports_neither_train_nor_eval():
    """The held-out loss both use sits below both."""
    names = imported_modules(SRC / "sparsek" / "heldout.py")
    assert not [name for name in names if within(name, "sparsek.train") or within(name, "sparsek.eval")]
