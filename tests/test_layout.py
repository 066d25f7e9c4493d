"""The project's shape: one installed import name, and a core that does not import the command folders."""

from __future__ import annotations

import ast
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMAND_FOLDERS = ("convert", "quantize", "verify")
# The one place that holds the commands (each calls its job), and the package's face (m1.load_pretrained).
CLI = "m1/cli/"
ASSEMBLY = {"m1/__init__.py"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    return next(out.glob("m1-*.whl"))


def test_the_wheel_adds_one_top_level_name_and_every_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"m1", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}"
                                                f".dist-info"}
    packaged = {str(Path(n).parent) for n in names if n.endswith("/__init__.py")}
    on_disk = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "m1").rglob("__init__.py")}
    assert on_disk <= packaged, f"subpackages missing from the wheel: {on_disk - packaged}"
    for folder in COMMAND_FOLDERS:
        assert f"m1/{folder}/__init__.py" in names
        assert not any(n.startswith(f"{folder}/") for n in names)


def test_installed_only_m1_imports(wheel: Path, tmp_path: Path) -> None:
    """In a fresh venv with the wheel installed, `import m1.convert` works and `import convert` fails."""
    import sysconfig

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # torch & co from this venv: a path line in a .pth adds the folder, without running the editable
    # install's own .pth that lives there (so the project folder is not what `import m1` finds)
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = (f"import m1.convert.job, m1.quantize.job, m1.verify.engine\n"
             f"assert m1.convert.job.__file__.startswith({site!r}), m1.convert.job.__file__\n"
             "try:\n    import convert\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('importable')\n")
    result = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_every_cli_module_is_in_m1_cli() -> None:
    """Nothing outside m1/cli/ defines a command: no module imports typer there."""
    modules = [p for folder in ("m1", *COMMAND_FOLDERS) for p in sorted((ROOT / folder).rglob("*.py"))]
    outside = [str(p.relative_to(ROOT)) for p in modules
               if not str(p.relative_to(ROOT)).startswith(CLI) and {"typer", "click"} & _imports(p)]
    assert not outside, outside


def test_the_core_does_not_import_the_command_folders() -> None:
    offenders = []
    for path in sorted((ROOT / "m1").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in ASSEMBLY or rel.startswith(CLI):
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] in COMMAND_FOLDERS or (parts[0] == "m1" and len(parts) > 1 and parts[1] in COMMAND_FOLDERS):
                offenders.append(f"{rel} imports {name}")
    assert not offenders, offenders


def _module_files() -> dict[str, Path]:
    """Installed module name -> source file, for m1 and the command folders (installed as m1.convert, ...)."""
    out = {}
    for folder in ("m1", *COMMAND_FOLDERS):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts if parts[0] == "m1" else ["m1", *parts])] = path
    return out


def _imported_modules(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in it (in functions too): `from a import b` counts a.b when
    that is a module, else a; relative imports resolved against the module `name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle between the project's modules, counting the imports made inside functions: registries
    load their built-in modules by name (importlib), so a module that registers can import its registry."""
    modules = _module_files()
    graph = {name: _imported_modules(path, name, modules) for name, path in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, [" -> ".join(c) for c in cycles[:5]]
