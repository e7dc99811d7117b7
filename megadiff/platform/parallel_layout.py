"""How a model is split over ranks (TP / EP / ETP / PP / VPP sizes) and how the sequence is split
(CP), checked when it is made.

The process groups (megadiff.platform.distributed) and the model builder both read it, so it sits
below both.
"""

import math
from dataclasses import dataclass

from megadiff.errors import ConfigError


def sequence_multiple(cp: int, tp: int = 1) -> int:
    """What a row's length S must be a multiple of at context parallel size `cp`: the model's
    sequence (S, or 2S for block diffusion) is cut into 2*cp zig-zag chunks
    (megadiff.models.common.context_parallel), and each rank's tokens split again over tp by
    sequence parallelism: lcm(2*cp, cp*tp). 1 without CP (sequence parallelism pads)."""
    return 1 if cp == 1 else math.lcm(2 * cp, cp * tp)


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor / expert / expert-tensor / pipeline / virtual-pipeline / context-parallel sizes.

    `cp` splits every sequence (activations, not weights) over cp ranks: megatron-core's context
    parallel groups; the model's weights are the same at every cp (megadiff.models.common.context_parallel).
    `etp` defaults to `tp` without expert parallelism and to 1 with it. megatron-core treats
    experts as dense parameters when ep == 1, so their gradients are only reduced correctly
    when they are split like the dense layers (etp == tp); other combinations are refused."""

    tp: int = 1
    ep: int = 1
    etp: int | None = None
    pp: int = 1
    vpp: int | None = None  # virtual pipeline chunks per PP rank; None = no interleaving
    cp: int = 1  # context parallel: ranks one sequence is split over

    def __post_init__(self):
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp if self.ep == 1 else 1)
        for name in ("tp", "ep", "etp", "pp", "cp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.ep == 1 and self.etp != self.tp:
            raise ConfigError(
                f"--etp {self.etp} with --ep 1 and --tp {self.tp}: without expert parallelism "
                f"megatron-core reduces expert gradients like dense ones, so --etp must equal --tp"
            )
        if self.vpp is not None and self.vpp < 2:
            raise ConfigError(f"--vpp must be >= 2 (chunks per pipeline rank) or unset, got {self.vpp}")

    def __str__(self):
        vpp = f",vpp={self.vpp}" if self.vpp else ""
        cp = f",cp={self.cp}" if self.cp > 1 else ""
        return f"tp={self.tp},ep={self.ep},etp={self.etp},pp={self.pp}{vpp}{cp}"
