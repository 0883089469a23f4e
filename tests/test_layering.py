"""The house rule (issue 16): roles meet only through the contracts in common/.

``rollout/``, ``reward_server/`` and ``learner/`` import from ``common/`` (and from themselves),
never from each other or from ``deploy/``; ``common/`` imports no role at all. Only ``deploy/``
composes roles. Every import counts, including the lazy ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "rollout", "reward_server", "learner", "deploy")
ROLES = ("rollout", "reward_server", "learner")


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level project package) of every import in ``path`` (absolute imports only)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in PACKAGES]
    return found


def allowed(package: str) -> set[str]:
    if package == "common":
        return {"common"}
    if package in ROLES:
        return {"common", package}
    return set(PACKAGES)  # deploy composes


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, target in project_imports(path):
            if target not in allowed(package):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return bad


@pytest.mark.parametrize("package", PACKAGES)
def test_roles_import_only_common(package):
    assert violations(package) == []


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import common.types\nfrom learner.weight_sync import X\n"
                   "def f():\n    import rollout.sampler as s\n    from . import y\n")
    assert sorted(project_imports(src)) == [(1, "common"), (2, "learner"), (4, "rollout")]
