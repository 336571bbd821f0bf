"""The package layout as an architecture: import direction and the explicit registry."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from coblax.lowrank import registry

ROOT = Path(__file__).resolve().parents[1]

# A sub-package may import only the ones listed (besides itself): app → lowrank/compress → nn → util.
ALLOWED = {
    "util": set(),
    "nn": {"util"},
    "lowrank": {"nn", "util"},
    "compress": {"nn", "util"},
    "app": {"lowrank", "compress", "nn", "util"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "coblax":  # from coblax import lowrank
                names.update(f"coblax.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("sub", sorted(ALLOWED))
def test_imports_flow_one_way(sub):
    bad = []
    for path in sorted((ROOT / "coblax" / sub).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "baselines" or parts[:2] == ["coblax", "baselines"]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            if parts[0] != "coblax" or len(parts) < 2 or parts[1] == sub:
                continue
            if parts[1] in ALLOWED and parts[1] not in ALLOWED[sub]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_registry_has_no_import_side_effects():
    # Importing the registry (and listing names) must not import any allocator module.
    code = (
        "import sys; from coblax.lowrank import registry; registry.allocator_names(); "
        "print(sorted(m for m in sys.modules if m.startswith(('coblax.lowrank.cobla', "
        "'coblax.lowrank.uniform', 'coblax.baselines', 'baselines'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_baselines_found_without_entry_points(monkeypatch):
    # A source checkout has no installed entry points: the explicit table must suffice.
    monkeypatch.setattr(registry.metadata, "entry_points", lambda **kw: [])
    names = registry.allocator_names()
    for name in ("cobla", "uniform", "cptv", "pos_greedy", "pos_exact", "vbmf", "gavish_donoho"):
        assert name in names
    assert type(registry.get_allocator("cptv")).__module__ == "coblax.baselines.cptv"


def test_unknown_method_lists_valid_ones():
    with pytest.raises(registry.UnknownMethodError, match="valid methods: .*cobla"):
        registry.get_allocator("nope")


def test_user_registration_overrides_builtin(monkeypatch):
    monkeypatch.setattr(registry, "_USER", {})
    sentinel = object()
    registry.register_allocator("uniform", lambda **kw: sentinel)
    assert registry.get_allocator("uniform") is sentinel


def test_baselines_install_under_coblax_only(tmp_path):
    # The repository's baselines/ folder installs as coblax.baselines; a top-level
    # `baselines` would shadow an unrelated, widely installed package of that name.
    code = (
        "import importlib.util as u; import coblax.baselines.pos, paper_figs; "
        "print(u.find_spec('baselines') is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
