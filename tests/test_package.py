"""The package as a whole: no import cycle among its modules, every import at the top of its
module, and the yaml folders shipped inside an installed copy."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import recbole_popprior

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "recbole_popprior"


def _modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``(imported package module, line, at module top level)`` for every import in ``path``.

    ``from pkg.mod import x`` counts as importing ``pkg.mod.x`` when that is a module. Importing
    a module also runs its parent packages' ``__init__``, so those are edges too, except the
    packages that contain the importer (Python is already initialising them).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            if not target.startswith(PACKAGE):
                continue
            parts = target.split(".")
            for k in range(2, len(parts) + 1):
                parent = ".".join(parts[:k])
                # a package that contains the importer is already being initialised: no edge
                if parent in modules and parent != name and not name.startswith(parent + "."):
                    found.append((parent, node.lineno, id(node) in top_level))
    return found


def test_no_import_cycle_among_the_package_modules():
    modules = _modules()
    graph = {name: sorted({target for target, _, _ in _imports(name, path, modules)}) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_import_is_at_the_top_of_its_module():
    """Package modules and third-party ones alike; a really optional dependency may be imported
    late on a line marked ``# optional dependency``."""
    late = []
    for path in _modules().values():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top \
                    and "# optional dependency" not in lines[node.lineno - 1]:
                late.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not late, "imports inside functions: " + "; ".join(late)


def test_no_module_over_500_lines_without_a_reason_at_its_top():
    """STYLE: a module over about 500 lines says why on its first line (``# Over 500 lines: ...``)."""
    paths = [*_modules().values(), *sorted((ROOT / "tests").glob("*.py"))]
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in paths
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500
            and not p.read_text(encoding="utf-8").startswith("# Over 500 lines: ")]
    assert not long, "modules over 500 lines without a reason on their first line: " + "; ".join(long)


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """The checker itself can fail: a two-module circle written to a scratch package is found."""
    fake = tmp_path / PACKAGE
    (fake / "sub").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "sub" / "__init__.py").write_text("")
    (fake / "a.py").write_text("from recbole_popprior.sub import b\n")
    (fake / "sub" / "b.py").write_text("def f():\n    from recbole_popprior import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="recbole_popprior.a -> recbole_popprior.sub.b -> recbole_popprior.a"):
        test_no_import_cycle_among_the_package_modules()
    with pytest.raises(AssertionError, match="sub/b.py:2"):
        test_every_import_is_at_the_top_of_its_module()


def test_ray_and_recbole_quick_start_are_never_imported():
    code = ("import sys, recbole_popprior, recbole_popprior.cli, recbole_popprior.tuning; "
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'recbole.quick_start'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_an_installed_copy_carries_its_yaml_and_runs_from_anywhere(tmp_path):
    """``pip install .`` (not editable) puts properties/ and dataset_configs/ inside the package;
    from another directory, that copy builds a Config from its own yaml files."""
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                            "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PIP_NO_INDEX": "1"})
    assert build.returncode == 0, build.stderr[-2000:]
    installed = target / PACKAGE
    assert (installed / "properties" / "overall.yaml").is_file()
    assert (installed / "properties" / "model" / "KSR.yaml").is_file()
    assert (installed / "dataset_configs" / "tianchi.yaml").is_file()
    assert (installed / "properties" / "fast.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = textwrap.dedent(f"""
        import recbole_popprior
        from recbole_popprior.config import Config, properties_file
        assert recbole_popprior.__file__.startswith({str(target)!r}), recbole_popprior.__file__
        assert str(properties_file("overall.yaml")).startswith({str(target)!r})
        config = Config("SASRec", "synthetic", config_dict={{"data_path": "data"}})
        fast = Config("SASRec", "synthetic", config_file_list=["properties/fast.yaml"], config_dict={{"data_path": "data"}})
        print(config["prior_tau"], config["synthetic_items"], config["tune_max_failures"], fast["fast_gelu"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-4:] == ["1.0", "50", "3", "True"]  # the preset, by its README path, from elsewhere


def test_the_wheel_lists_the_console_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        text = archive.read(entry_points).decode()
    assert "recbole-popprior = recbole_popprior.cli:main" in text


def test_the_package_init_is_the_only_lazy_import_point():
    """``importlib.import_module`` (or ``__import__``) of a package module happens in
    ``recbole_popprior/__init__.py`` only: that is what keeps the command lines light, and a
    second such point would hide imports from the cycle check above."""
    late = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called not in ("import_module", "__import__"):
                continue
            target = node.args[0] if node.args else None
            literal = isinstance(target, ast.Constant) and isinstance(target.value, str)
            if (not literal or target.value.startswith(PACKAGE)) and name != PACKAGE:
                late.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not late, "lazy imports of package modules outside recbole_popprior/__init__.py: " + "; ".join(late)


def test_every_module_that_imports_recbole_applies_the_compat_shims():
    """The package itself no longer imports RecBole, so each module that does must reach
    ``recbole_popprior.compat`` (which applies the shims when imported) through its imports or
    those of its parent packages (Python runs ``data/__init__.py`` before ``data/sequences.py``)."""
    modules = _modules()
    graph = {name: {target for target, _, _ in _imports(name, path, modules)} for name, path in modules.items()}

    def reaches(start: str) -> set[str]:
        parts = start.split(".")
        parents = {".".join(parts[:k]) for k in range(2, len(parts)) if ".".join(parts[:k]) in modules}
        seen, todo = set(parents), [start, *parents]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    missing = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imports_recbole = any(
            (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "recbole" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "recbole") for n in tree.body)
        if imports_recbole and name != f"{PACKAGE}.compat" and f"{PACKAGE}.compat" not in reaches(name):
            missing.append(name)
    assert not missing, "import RecBole without reaching recbole_popprior.compat: " + ", ".join(missing)


def test_every_lazy_name_of_the_package_is_what_it_names():
    """A public function is that function of its module; a lazy module (the command lines' heavy
    halves, such as the converter's pipeline) is that module itself."""
    for name, module in recbole_popprior._LAZY.items():
        assert getattr(recbole_popprior, name) is getattr(importlib.import_module(module), name), name
    for name, module in recbole_popprior._LAZY_MODULES.items():
        assert getattr(recbole_popprior, name) is importlib.import_module(module), name
    assert set(recbole_popprior._LAZY) | set(recbole_popprior._LAZY_MODULES) <= set(dir(recbole_popprior))
    with pytest.raises(AttributeError, match="no attribute 'pipeline'"):
        recbole_popprior.pipeline  # noqa: B018
