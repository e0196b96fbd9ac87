"""No product module imports another package's private (``_x``) module.

A package's ``_x`` modules are its inside; other packages go through what its
``__init__`` exports.  (The standard library's own ``re._parser`` and similar are
outside this rule: only the project's packages are checked.)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("broker", "payload_wrapper")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, importer: str, is_package: bool) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = importer.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def _is_module(parts: list[str]) -> bool:
    where = ROOT.joinpath(*parts)
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def private_imports() -> list[str]:
    found = []
    for top in PROJECT:
        for path in sorted((ROOT / top).rglob("*.py")):
            importer = _module_name(path)
            tree = ast.parse(path.read_text(), str(path))
            for name in _imported(tree, importer, path.name == "__init__.py"):
                parts = name.split(".")
                if parts[0] not in PROJECT:
                    continue
                for i, part in enumerate(parts):
                    if (
                        part.startswith("_")
                        and not part.startswith("__")
                        and _is_module(parts[: i + 1])
                    ):
                        owner = ".".join(parts[:i])  # the package the private module belongs to
                        if importer != owner and not importer.startswith(owner + "."):
                            found.append(f"{importer} imports {name}")
                        break
    return found


def test_no_module_imports_another_packages_private_module() -> None:
    assert private_imports() == []


def test_the_check_sees_a_private_import() -> None:
    tree = ast.parse("from broker.policy._patterns import Subject\nfrom . import _x\n")
    assert "broker.policy._patterns.Subject" in _imported(tree, "broker.api.app", False)
    assert "broker.api._x" in _imported(tree, "broker.api.app", False)
    assert _is_module(["broker", "policy", "_patterns"])
    assert not _is_module(["broker", "policy", "_no_such_module"])
