"""The documentation: `mkdocs build --strict` passes (broken links, missing anchors and pages left out of the nav
fail it), every public module, class, function and method of the package has a docstring, every module is on an
API page, and the README's links resolve."""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kedit_pl"
API_PAGES = ROOT / "docs" / "api"


def module_name(path: Path) -> str:
    """kedit_pl/eval/groups/__init__.py -> kedit_pl.eval.groups."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (read from disk: nothing is imported)."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def api_targets() -> list[str]:
    """The objects the API pages render (`::: kedit_pl.x` lines)."""
    return [m.group(1) for page in sorted(API_PAGES.glob("*.md"))
            for m in re.finditer(r"^::: *([\w.]+)", page.read_text(encoding="utf-8"), re.M)]


def _has_inherited_doc(module: str, cls: str, name: str) -> bool:
    """True if `cls.name` overrides a method that a base class documents (its docstring applies, as for
    `inspect.getdoc`): Lightning hooks, `EditMethod.compute_edit`, `MetricGroup.measure`, ..."""
    obj = getattr(importlib.import_module(module), cls)
    for base in obj.__mro__[1:]:
        attr = base.__dict__.get(name)
        attr = getattr(attr, "fget", attr)
        if getattr(getattr(attr, "__func__", attr), "__doc__", None):
            return True
    return False


def undocumented(path: Path, module: str) -> list[str]:
    """Public objects of one module file without a docstring: the module, its top-level functions and classes,
    and the methods and properties of those classes (a method that overrides a documented one is documented)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    missing = [] if ast.get_docstring(tree) else [module]
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not ast.get_docstring(node):
            missing.append(f"{module}.{node.name}")
        elif isinstance(node, ast.ClassDef):
            if not ast.get_docstring(node):
                missing.append(f"{module}.{node.name}")
            for sub in node.body:
                if (isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_")
                        and not ast.get_docstring(sub) and not _has_inherited_doc(module, node.name, sub.name)):
                    missing.append(f"{module}.{node.name}.{sub.name}")
    return missing


def test_every_public_object_has_a_docstring():
    missing = [m for name, path in package_modules().items() for m in undocumented(path, name)]
    assert not missing, "no docstring (the API pages would show nothing for them):\n  " + "\n  ".join(missing)


def test_docstring_check_catches_a_missing_docstring(tmp_path, monkeypatch):
    (tmp_path / "docs_probe.py").write_text(
        '"""A module."""\n\n\ndef documented():\n    """Yes."""\n\n\ndef bare():\n    pass\n\n\n'
        'class Thing:\n    def method(self):\n        pass\n\n    def __len__(self):\n        return 0\n\n\n'
        'class Sized(list):\n    """A list."""\n\n    def append(self, x):\n        pass\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    # list.append is documented, so Sized.append inherits its docstring; dunders and _private are not public
    assert undocumented(tmp_path / "docs_probe.py", "docs_probe") == [
        "docs_probe.bare", "docs_probe.Thing", "docs_probe.Thing.method"]


def test_every_module_is_on_an_api_page():
    targets = api_targets()
    assert targets, "docs/api/*.md render nothing"
    modules = package_modules()
    unknown = [t for t in targets if t not in modules]
    assert not unknown, f"docs/api pages name modules that do not exist: {unknown}"
    # a package page shows its submodules (mkdocs.yml: show_submodules), so `::: kedit_pl.kv` covers kedit_pl.kv.*
    packages = [t for t in targets if modules[t].name == "__init__.py" and t != "kedit_pl"]
    uncovered = [m for m in modules if m != "kedit_pl" and m not in targets
                 and not any(m.startswith(p + ".") for p in packages)]
    assert not uncovered, ("modules on no API page; add a `::: <module>` line to the fitting docs/api/*.md page "
                           f"(top-level modules: docs/api/runs.md): {uncovered}")


def mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of `config` into `site`."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_mkdocs_build_strict(tmp_path):
    res = mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    api = (tmp_path / "site" / "api" / "methods" / "index.html").read_text(encoding="utf-8")
    assert "kedit_pl.methods.rome.ROME" in api and "compute_edit" in api  # generated from the docstrings
    assert (tmp_path / "site" / "results" / "index.html").is_file()


@pytest.mark.parametrize("page, nav, error", [
    ("See [nothing](missing.md).", "[index.md, other.md]", "missing.md"),
    ("See [the top](#no-such-heading).", "[index.md, other.md]", "no-such-heading"),
    ("Fine.", "[other.md]", "not included in the \"nav\""),
])
def test_mkdocs_strict_settings_fail_on_broken_docs(tmp_path, page, nav, error):
    """The project's validation settings make a broken link, a missing anchor and a page outside the nav fatal."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(f"# Home\n\n{page}\n")
    (docs / "other.md").write_text("# Other\n")
    cfg = tmp_path / "mkdocs.yml"
    cfg.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: docs\nnav: {nav}\nplugins: [search]\n")
    res = mkdocs(cfg, tmp_path / "site")
    assert res.returncode != 0 and error in res.stderr + res.stdout, res.stderr[-3000:]


def slug(heading: str) -> str:
    """The anchor mkdocs gives a heading (Python-Markdown's toc slugify of its text)."""
    from markdown.extensions.toc import slugify

    return slugify(heading.replace("`", ""), "-")


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = ROOT / target
        assert path.exists(), f"README links to {link}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
            assert anchor in {slug(h) for h in headings}, f"README links to {link}: no such heading"
