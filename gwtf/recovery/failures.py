"""The failure model shared by the convergence and throughput benchmarks: per-stage hourly failure rates, turned
into per-iteration probabilities (design section 7), and a seeded schedule of which stages are lost when."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gwtf.data import hash_seed
from gwtf.errors import UserError


def iteration_failure_probability(rate_per_hour: float, iter_time_s: float) -> float:
    """p_iter = 1 - (1 - h) ** (t_iter / 3600): a stage's chance to fail within one iteration."""
    return 1.0 - (1.0 - rate_per_hour) ** (iter_time_s / 3600.0)


@dataclass
class FailureSchedule:
    """Which relay stages lose every replica at which iteration; seeded, the same for every strategy.

    `rate_per_hour` is h as a fraction (0.10 = 10 %/h) per stage per modelled hour; each stage fails
    independently at each iteration with p_iter. `explicit` adds failures at chosen iterations
    ({iteration: [stages]}) on top, to make short runs informative. Stage 0 lives on every data node: never lost.
    """

    n_stages: int
    rate_per_hour: float = 0.0
    iter_time_s: float = 60.0
    seed: int = 0
    explicit: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate_per_hour < 1.0:
            raise UserError(f"failure rate must be in [0, 1) per hour (0.10 = 10 %/h), got {self.rate_per_hour}")
        if self.iter_time_s <= 0 or self.n_stages < 1:
            raise UserError("iteration time must be positive and there must be at least one relay stage")
        bad = [k for ks in self.explicit.values() for k in ks if not 1 <= k <= self.n_stages]
        if bad:
            raise UserError(f"failure stages {bad} outside the relay stages 1..{self.n_stages}")

    @property
    def p_iter(self) -> float:
        return iteration_failure_probability(self.rate_per_hour, self.iter_time_s)

    def lost_at(self, iteration: int) -> list[int]:
        """Relay stages that lose every replica during `iteration` (sorted; independent of query order)."""
        lost = set(self.explicit.get(iteration, []))
        if self.p_iter > 0:
            gen = torch.Generator().manual_seed(hash_seed(self.seed, iteration))
            draws = torch.rand(self.n_stages, generator=gen, dtype=torch.float64)
            lost.update(k + 1 for k in range(self.n_stages) if float(draws[k]) < self.p_iter)
        return sorted(lost)

    def events(self, n_iterations: int) -> list[tuple[int, list[int]]]:
        return [(i, lost) for i in range(n_iterations) if (lost := self.lost_at(i))]

    @staticmethod
    def parse_explicit(spec: str, n_stages: int, seed: int = 0) -> dict[int, list[int]]:
        """ "100,200:3,250:1+6" -> {100: [seeded stage], 200: [3], 250: [1, 6]}; a bare iteration loses one
        middle stage drawn with the seed (middle: the case every strategy can handle; name edges explicitly)."""
        out: dict[int, list[int]] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            it_text, _, stage_text = item.partition(":")
            try:
                iteration = int(it_text)
                stages = [int(s) for s in stage_text.split("+")] if stage_text else []
            except ValueError as exc:
                raise UserError(f"bad failure {item!r}; use ITER or ITER:STAGE or ITER:STAGE+STAGE") from exc
            if not stages:
                middle = list(range(2, n_stages)) or list(range(1, n_stages + 1))
                gen = torch.Generator().manual_seed(hash_seed(seed, iteration, 7))
                stages = [middle[int(torch.randint(len(middle), (1,), generator=gen))]]
            out.setdefault(iteration, []).extend(stages)
        return out
