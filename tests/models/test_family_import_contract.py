"""The import contract that keeps model families out of generic code is real: lint-imports fails
when a generic module imports a family module.

`make lint` runs the contract on the repository (it passes there); this test plants
`import megadiff.models.llada` in a copy of one generic module and checks that the same
.importlinter refuses it, naming the contract and the import."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTRACT = "generic code reaches model families only through megadiff.models.registry"
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _copy_repo(dst: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("megadiff", "checkpoint_converters", "tests"):
        shutil.copytree(os.path.join(REPO, package), os.path.join(dst, package), ignore=ignore)
    shutil.copy(os.path.join(REPO, ".importlinter"), dst)


def _lint_imports(root: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_contract_is_in_the_repository_config():
    with open(os.path.join(REPO, ".importlinter")) as f:
        assert f"name = {CONTRACT}" in f.read()


@pytest.mark.skipif(not os.path.exists(LINT_IMPORTS), reason="import-linter is not installed in this environment")
@pytest.mark.parametrize(
    ("module", "family"),
    [("training/phases.py", "megadiff.models.llada"), ("checkpoint/format.py", "megadiff.models.lladamoe.config")],
)
def test_a_planted_family_import_in_generic_code_fails_lint_imports(tmp_path, module, family):
    _copy_repo(str(tmp_path))
    with open(tmp_path / "megadiff" / module, "a") as f:
        f.write(f"\nimport {family}  # noqa: E402,F401  (planted by the test)\n")
    result = _lint_imports(str(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    importer = "megadiff." + module[: -len(".py")].replace("/", ".")
    assert f"{CONTRACT} BROKEN" in out, out
    assert f"{importer} -> {family}" in out, out
