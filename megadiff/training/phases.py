"""The block-size schedule of a run (`diffusion.block_schedule`): which diffusion a step trains.

LLaDA2.0's continued pretraining (report §4) reads an autoregressive model as block diffusion with
block size 1 and then warms the block size up (1 -> 4 -> 32 -> 64 -> 4096, the last being one block
per sequence: full-attention MDLM), stays in MDLM, and decays back to 32. A schedule is that list:

    diffusion.block_schedule: [{steps: 100, block_size: 1}, {steps: 100, block_size: 4},
                               {steps: 800, mode: full}, {steps: 100, block_size: 32}]

Phases run in order; step s (0-based) belongs to the phase whose steps cover it, so a run resumed
at any step continues the phase it was in, at the same place. A `full` phase feeds x_t only (no
x_0 half), so its steps cost about half of a block-diffusion step. Without a schedule a run is one
phase made of diffusion.mode / diffusion.block_size.

The functions here raise ValueError naming the key; the config loader reports it as a config error.
"""

import dataclasses
from dataclasses import dataclass

BLOCK_DIFFUSION, FULL = "block_diffusion", "full"
_KEY = "diffusion.block_schedule"


@dataclass(frozen=True)
class Phase:
    index: int  # 1-based, as logged
    start: int  # first step of the phase (0-based)
    steps: int
    mode: str  # BLOCK_DIFFUSION or FULL
    block_size: int | None  # None in a full phase

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def name(self) -> str:
        """'bd4', 'full': what logs, metrics and megadiff.json call the phase's diffusion."""
        return "full" if self.mode == FULL else f"bd{self.block_size}"

    def record(self) -> dict:
        """The phase as the metrics file and megadiff.json record it."""
        return {"index": self.index, "name": self.name, "start_step": self.start, "end_step": self.end}


def _phase_from(raw, i: int, start: int, seq_len: int) -> Phase:
    where = f"{_KEY}[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is {raw!r}; each phase is {{steps: N, block_size: B}} or {{steps: N, mode: full}}")
    unknown = sorted(set(raw) - {"steps", "block_size", "mode"})
    if unknown:
        raise ValueError(f"{where}: unknown key '{unknown[0]}'; a phase has steps and block_size, or steps and mode")
    steps = raw.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{where}.steps must be an integer >= 1, got {steps!r}")
    mode = raw.get("mode", BLOCK_DIFFUSION)
    if mode not in (BLOCK_DIFFUSION, FULL):
        raise ValueError(f"{where}.mode={mode!r} is not one of {BLOCK_DIFFUSION}, {FULL}")
    block = raw.get("block_size")
    if mode == FULL:
        if block is not None:
            raise ValueError(f"{where}: a full phase has no block_size (one block is the whole sequence); drop it")
        return Phase(i + 1, start, steps, FULL, None)
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"{where}.block_size must be an integer >= 1 (or set mode: full), got {block!r}")
    if seq_len % block:
        divisors = [d for d in range(1, seq_len + 1) if seq_len % d == 0]
        shown = ", ".join(map(str, divisors[:8])) + (", ..." if len(divisors) > 8 else "")
        raise ValueError(
            f"{where}.block_size={block} does not divide data.max_seq_len={seq_len}; every block size of a "
            f"schedule must (choose one of {shown}, or mode: full)"
        )
    return Phase(i + 1, start, steps, BLOCK_DIFFUSION, block)


def schedule_phases(raw: list, seq_len: int, train_steps: int) -> list[Phase]:
    """The phases of `diffusion.block_schedule`, checked: each block size divides the sequence
    length and together they cover train.steps. Raises ValueError naming the key."""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{_KEY} must be a non-empty list of phases, got {raw!r}")
    phases, start = [], 0
    for i, item in enumerate(raw):
        phase = _phase_from(item, i, start, seq_len)
        phases.append(phase)
        start = phase.end
    if start < train_steps:
        raise ValueError(
            f"{_KEY}: the phases cover {start} steps but train.steps={train_steps}; lengthen the phases "
            f"or lower train.steps"
        )
    return phases


def run_phases(cfg) -> list[Phase]:
    """The phases of a run: its schedule, or one phase from diffusion.mode / block_size."""
    d = cfg.diffusion
    if d.block_schedule:
        return schedule_phases(d.block_schedule, cfg.data.max_seq_len, cfg.train.steps)
    block = None if d.mode == FULL else d.block_size
    return [Phase(1, 0, max(cfg.train.steps, 1), d.mode, block)]


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase of 0-based step `step` (the last phase past the schedule's end)."""
    return next((p for p in phases if step < p.end), phases[-1])


def phase_diffusion(diffusion, phase: Phase):
    """The diffusion section with the phase's mode and block size (everything else as configured)."""
    if phase.mode == FULL:
        return dataclasses.replace(diffusion, mode=FULL)
    return dataclasses.replace(diffusion, mode=BLOCK_DIFFUSION, block_size=phase.block_size)


def uses_block_diffusion(cfg) -> bool:
    """Whether any step of the run feeds [x_t ; x_0] (sizes memory, attention and the x_t-only head)."""
    if cfg.diffusion.block_schedule:
        return any(p.mode == BLOCK_DIFFUSION for p in run_phases(cfg))
    return cfg.diffusion.mode == BLOCK_DIFFUSION
