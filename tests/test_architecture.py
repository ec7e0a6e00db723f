"""The layering of ``architecture.md``, checked on the code: the core never needs the apps wing, and each
folder imports only the folders below it."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import jointssl_monai

PACKAGE = Path(jointssl_monai.__file__).parent
#: What each part of the core may import from the package (besides itself), as architecture.md draws it.
ALLOWED = {
    "outputs": set(),
    "utils": set(),
    "data": {"outputs", "utils"},
    "networks": {"outputs", "utils"},
    "losses": {"outputs", "utils"},
    "engines": {"outputs", "utils", "networks", "losses", "data"},
    "transfer": {"utils", "networks"},
    "handlers": {"outputs", "utils", "networks", "losses", "data", "engines", "transfer"},
}


REFLECTION = ("getattr", "setattr", "hasattr")


def _core_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="jointssl_monai."):
        if not info.name.startswith("jointssl_monai.apps"):
            names.append(info.name)
    return sorted(names)


class _BlockApps:
    """A meta path finder that refuses ``jointssl_monai.apps``, as if the wing were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "jointssl_monai.apps" or name.startswith("jointssl_monai.apps."):
            raise ModuleNotFoundError(f"blocked for the test: {name}")
        return None


def test_every_core_module_imports_without_the_apps_wing(monkeypatch):
    saved = {k: v for k, v in sys.modules.items() if k.startswith("jointssl_monai")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BlockApps(), *sys.meta_path])
    try:
        modules = _core_modules()
        assert "jointssl_monai.losses.joint" in modules and "jointssl_monai.handlers.deepcluster" in modules
        for name in modules:
            importlib.import_module(name)
        assert not [k for k in sys.modules if k.startswith("jointssl_monai.apps")]
        with pytest.raises(ModuleNotFoundError, match="blocked"):
            importlib.import_module("jointssl_monai.apps.cli")
    finally:
        for name in [k for k in sys.modules if k.startswith("jointssl_monai")]:
            del sys.modules[name]
        sys.modules.update(saved)


def _imported_parts(path: Path) -> set[str]:
    """The top-level parts of ``jointssl_monai`` a source file imports (type-checking imports included)."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("jointssl_monai."):
                parts.add(name.split(".")[1])
    return parts


def test_each_core_folder_imports_only_the_folders_below_it():
    seen = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        part = rel.parts[0].removesuffix(".py")
        if part in ("apps", "__init__"):
            continue
        seen.add(part)
        extra = _imported_parts(path) - ALLOWED[part] - {part}
        assert not extra, f"{rel} imports {sorted(extra)}, which architecture.md puts above {part}"
    assert seen == set(ALLOWED)


def test_handlers_and_engines_reach_the_network_and_loss_through_methods():
    """No attribute names computed at run time (``getattr(network, f"{level}_prototypes")``): the
    dependencies are the interfaces ``JointSSLNet.prototypes(level)``, ``JointSSLLoss.level(level)``,
    ``JointSSLOutput.branch(level)``, which an import shows and a rename breaks loudly."""
    offenders = []
    for folder in ("handlers", "engines"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                reflective = isinstance(node, ast.Call) and getattr(node.func, "id", None) in REFLECTION
                if reflective and len(node.args) > 1 and not isinstance(node.args[1], ast.Constant):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders
