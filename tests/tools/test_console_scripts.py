"""Every user-facing tool is also a console script (setup.py CONSOLE_SCRIPTS -> MODULE:main, MODULE
being megadiff.cli.NAME that tools/NAME.py imports its main() from, or tools.NAME itself), and the
scripts work from a plain, non-editable install, away from the checkout."""

import ast
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOT_INSTALLED = {"gpu_check"}  # runs the checkout's tests/gpu


def console_scripts() -> dict[str, str]:
    """setup.py's CONSOLE_SCRIPTS, read without running setup()."""
    with open(os.path.join(REPO, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CONSOLE_SCRIPTS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no CONSOLE_SCRIPTS")


def main_module(tool: str) -> str:
    """The module whose main() tools/TOOL.py runs: the one it imports main from (a thin wrapper), else itself."""
    with open(os.path.join(REPO, "tools", tool + ".py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and "main" in [a.name for a in node.names]:
            return node.module
    return "tools." + tool


def test_every_tool_script_has_a_console_script_calling_its_main():
    scripts = console_scripts()
    tools = {f[:-3] for f in os.listdir(os.path.join(REPO, "tools")) if f.endswith(".py") and f != "__init__.py"}
    assert sorted(scripts.values()) == sorted(main_module(tool) for tool in tools - NOT_INSTALLED)
    assert all(name == "megadiff-" + name.removeprefix("megadiff-") for name in scripts)
    for module in scripts.values():
        with open(os.path.join(REPO, *module.split(".")) + ".py") as f:
            assert "\ndef main(argv=None)" in f.read(), module


@pytest.mark.slow
def test_console_scripts_resolve_and_run_from_a_non_editable_install(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for part in ("megadiff", "checkpoint_converters", "tools"):
        shutil.copytree(os.path.join(REPO, part), src / part, ignore=ignore)
    shutil.copy(os.path.join(REPO, "setup.py"), src / "setup.py")
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target, src]
    proc = subprocess.run([str(c) for c in pip], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    check = (
        "import importlib.metadata as m, sys\n"
        "eps = [e for e in m.entry_points(group='console_scripts') if e.name.startswith('megadiff-')]\n"
        "for e in sorted(eps, key=lambda e: e.name):\n"
        "    main = e.load()\n"
        "    assert callable(main) and sys.modules[main.__module__].__file__.startswith(sys.argv[1]), e\n"
        "    print(e.name, e.value)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", check, str(target)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(proc.stdout.split()[::2]) == sorted(console_scripts())
    proc = subprocess.run(
        [str(target / "bin" / "megadiff-convert-hf-to-mcore"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--hf-dir" in proc.stdout and "usage: megadiff-convert-hf-to-mcore" in proc.stdout
