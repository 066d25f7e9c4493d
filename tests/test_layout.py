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
