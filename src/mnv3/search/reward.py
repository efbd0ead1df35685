"""MnasNet's platform-aware objective: ACC(m) x (LAT(m) / T)^w, with w = alpha when LAT <= T and
w = beta otherwise (Tan et al., 2019, eq. 2), or accuracy and latency as two objectives."""

from __future__ import annotations

import math
from dataclasses import dataclass

REWARDS = ("soft", "hard", "pareto")
SOFT_W = -0.07          # MnasNet: alpha = beta = -0.07 (a 2x slower model must be ~5% more accurate)
SMALL_W = -0.15         # MobileNetV3-Small: "w = -0.15" to favour accuracy gains on small models


class RewardError(ValueError):
    """An objective that cannot be used (unknown mode, non-positive target)."""


@dataclass(frozen=True)
class Reward:
    mode: str = "soft"
    target_ms: float = 1.0
    alpha: float = SOFT_W
    beta: float = SOFT_W

    def __post_init__(self) -> None:
        if self.mode not in REWARDS:
            raise RewardError(f"--reward: expected one of {', '.join(REWARDS)}, got {self.mode!r}")
        if not (math.isfinite(self.target_ms) and self.target_ms > 0):
            raise RewardError(f"the latency target must be a positive number of ms, got {self.target_ms}")

    @classmethod
    def make(cls, mode: str, target_ms: float, w: float | None = None) -> Reward:
        """`soft`: alpha = beta = w (default -0.07); `hard`: alpha = 0, beta = -1 (a constraint);
        `pareto`: accuracy and latency separately (the scalar is the soft reward, for reports)."""
        if mode == "hard":
            if w is not None:
                raise RewardError("--w sets the soft reward's exponent; the hard reward uses alpha = 0, beta = -1")
            return cls(mode, target_ms, 0.0, -1.0)
        w = SOFT_W if w is None else w
        if not math.isfinite(w) or w > 0:
            raise RewardError(f"--w: expected a negative exponent such as -0.07 or -0.15, got {w}")
        return cls(mode, target_ms, w, w)

    def __call__(self, accuracy: float, latency_ms: float) -> float:
        if latency_ms <= 0 or not math.isfinite(latency_ms):
            raise RewardError(f"latency must be a positive number of ms, got {latency_ms}")
        w = self.alpha if latency_ms <= self.target_ms else self.beta
        return accuracy * (latency_ms / self.target_ms) ** w

    @property
    def directions(self) -> list[str]:
        """Optuna study directions: one maximised reward, or (accuracy up, latency down)."""
        return ["maximize", "minimize"] if self.mode == "pareto" else ["maximize"]

    def describe(self) -> str:
        if self.mode == "hard":
            return f"hard: ACC x (LAT/{self.target_ms:.3g} ms)^-1 above the target, ACC below it"
        if self.mode == "pareto":
            return f"pareto: accuracy and latency (reported reward: soft, w = {self.alpha}, T = {self.target_ms:.3g} ms)"
        return f"soft: ACC x (LAT/{self.target_ms:.3g} ms)^{self.alpha}"
