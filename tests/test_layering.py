"""Package layering: ``tensors`` below ``merge`` below ``state``, with no cycle.

Parses every module's source with ``ast`` (lazy imports inside functions count too), so a lazy
import that would hide a cycle from ``import`` itself still fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "policy_server"


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` (a file under the ``root`` package) imports, anywhere in the file,
    as absolute dotted names."""
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under policy_server/{package}"
    bad = []
    for f in files:
        for mod in sorted(imported_modules(f)):
            if any(mod == p or mod.startswith(p + ".") for p in forbidden):
                bad.append(f"{f.relative_to(ROOT.parent)} imports {mod}")
    return bad


@pytest.mark.parametrize("package, forbidden", [
    ("merge", ("policy_server.state",)),
    ("tensors", ("policy_server.merge", "policy_server.state")),
])
def test_lower_packages_do_not_import_upper_ones(package, forbidden):
    assert offenders(package, forbidden) == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """The parser must catch the forms a cycle hides behind: a function-level import and a
    relative one."""
    probe = tmp_path / "policy_server" / "merge" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from ..state import store\n    import policy_server.state.x\n")
    found = imported_modules(probe, root=tmp_path / "policy_server")
    assert "policy_server.state.store" in found and "policy_server.state.x" in found
