"""How a model is split over ranks (TP / EP / ETP / PP / VPP sizes), checked when it is made.

The process groups (megadiff.platform.distributed) and the model builder both read it, so it sits
below both.
"""

from dataclasses import dataclass

from megadiff.errors import ConfigError


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor / expert / expert-tensor / pipeline / virtual-pipeline sizes.

    `etp` defaults to `tp` without expert parallelism and to 1 with it. megatron-core treats
    experts as dense parameters when ep == 1, so their gradients are only reduced correctly
    when they are split like the dense layers (etp == tp); other combinations are refused."""

    tp: int = 1
    ep: int = 1
    etp: int | None = None
    pp: int = 1
    vpp: int | None = None  # virtual pipeline chunks per PP rank; None = no interleaving

    def __post_init__(self):
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp if self.ep == 1 else 1)
        for name in ("tp", "ep", "etp", "pp"):
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
        return f"tp={self.tp},ep={self.ep},etp={self.etp},pp={self.pp}{vpp}"
