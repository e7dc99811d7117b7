"""megatron-core's fused kernels compile on first call, not when megatron-core is imported."""

import subprocess
import sys

from megadiff.platform.compat import compile_on_first_call


def test_compile_is_deferred_to_the_first_call_and_done_once():
    calls = []

    def fake_compile(fn, **options):
        calls.append(options)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    deferred = compile_on_first_call(fake_compile)
    square = deferred(lambda x: x * x)
    assert calls == []
    assert square(3) == ("compiled", 9) and square(4) == ("compiled", 16)
    assert calls == [{}]

    cube = deferred(mode="max-autotune")(lambda x: x**3)  # the @torch.compile(**options) form
    assert calls == [{}] and cube(2) == ("compiled", 8) and calls == [{}, {"mode": "max-autotune"}]


IMPORT_THEN_FUSE = """
import sys, torch
import megadiff, megadiff.platform
from megadiff.platform.compat import _DeferCompileWhileImporting
assert not any(isinstance(f, _DeferCompileWhileImporting) for f in sys.meta_path), "import megadiff installed the hook"
megadiff.platform.install_import_hook()
import megatron.core.models.gpt
from megatron.core import jit
assert torch.compile.__module__.startswith("torch"), "torch.compile must be restored after the import"
assert "torch._dynamo" not in sys.modules, "megatron-core import compiled something"
from megatron.core.fusions.fused_bias_gelu import bias_gelu
bias, y = torch.randn(8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
x = bias + y
plain = x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))
fused = bias_gelu(bias, y)  # compiled now
assert "torch._dynamo" in sys.modules
print(float((fused - plain).abs().max()))
"""


def test_megatron_core_imports_without_dynamo_and_fused_functions_still_compute():
    out = subprocess.run([sys.executable, "-c", IMPORT_THEN_FUSE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-12
