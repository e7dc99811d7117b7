"""`make setup` installs the pins of its interpreter's stack, and MEGADIFF_SYSTEM_PACKAGES=1 reuses
the interpreter's torch (plus TE / apex) instead of installing one."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_dry_run(tmp_path, **variables):
    args = ["make", "-n", "-B", f"PYTHON={sys.executable}", f"VENV={tmp_path / 'venv'}", "setup"]
    env = dict(os.environ, **variables)
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def pip_installs(lines):
    return [line for line in lines if " -m pip install " in line and "--upgrade pip" not in line]


def test_setup_installs_the_pins_of_the_interpreters_stack(tmp_path):
    lines = make_dry_run(tmp_path, MEGADIFF_SYSTEM_PACKAGES="0")
    assert any(re.search(r"-m venv +\S*venv$", line) for line in lines), lines
    [install] = pip_installs(lines)
    if sys.version_info < (3, 12):
        expected = ["torch==2.13.0", "megatron-core==0.16.1", "transformers>=5,<6"]
    else:
        expected = ["torch==2.11.0", "megatron-core>=0.19,<0.20", "transformers==4.57.6"]
    assert shlex.split(install)[5:-2] == expected, install
    assert install.endswith('-e ".[dev]"')


def test_system_packages_switch_keeps_the_installed_torch(tmp_path):
    lines = make_dry_run(tmp_path, MEGADIFF_SYSTEM_PACKAGES="1")
    assert any("-m venv --system-site-packages" in line for line in lines), lines
    [install] = pip_installs(lines)
    assert "torch==" not in install and "-c " in install, install  # torch: constrained, never pinned
    [constraint_cmd] = [line for line in lines if "torch-constraint.txt" in line and "pip" not in line]

    # Run the recipe's constraint line with this interpreter, as the venv's python would, and
    # check that pip, given megadiff's torch requirement under that constraint, installs nothing.
    constraint = tmp_path / "venv" / "torch-constraint.txt"
    constraint.parent.mkdir()
    python_cmd = constraint_cmd.split(" > ")[0].split(" ", 1)[1]
    subprocess.run(f"{shlex.quote(sys.executable)} {python_cmd} > {constraint}", shell=True, check=True)
    installed = subprocess.run([sys.executable, "-m", "pip", "show", "torch"], capture_output=True, text=True)
    version = re.search(r"^Version: (\S+)", installed.stdout, re.M).group(1)
    assert constraint.read_text().strip() == f"torch=={version}"
    dry = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-c", str(constraint), "torch>=2.11,<2.14"],
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert "Would install" not in dry.stdout, dry.stdout


def test_system_packages_switch_refuses_an_interpreter_without_torch(tmp_path):
    lines = make_dry_run(tmp_path, MEGADIFF_SYSTEM_PACKAGES="1")
    check = next(line for line in lines if "has no torch to reuse" in line)
    assert check.startswith(f"{tmp_path / 'venv'}/bin/python -c 'import torch'"), check


@pytest.mark.parametrize("python", ["python3.99"])
def test_setup_refuses_an_interpreter_that_does_not_run(tmp_path, python):
    out = subprocess.run(
        ["make", "-B", f"PYTHON={python}", f"VENV={tmp_path / 'venv'}", "setup"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and f"PYTHON={python} does not run" in out.stdout + out.stderr
    assert not (tmp_path / "venv").exists()
