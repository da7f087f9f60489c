"""The paper's critic/generator update schedule (paper 4.1) as a pure function of two counters.

Pure Python (no torch): the whole schedule state is ``(critic_steps, generator_steps)``,
the number of critic and generator updates done so far. :func:`next_update` says which
network the next update trains. Because nothing else is remembered, a run resumed from a
checkpoint that stored the two counters continues the schedule exactly.

The schedule, with the paper's numbers (every one a config value)::

    1. warm-up     the critic alone for the first ``critic_warmup_steps`` (10,000) updates;
    2. normal      then cycles of ``critic_per_generator`` (5) critic updates followed by
                   one generator update (the critic goes first in every cycle, as in
                   WGAN-GP's training loop, so the first generator update comes after
                   warm-up + 5 critic updates);
    3. bursts      right after every ``burst_every``-th (500th) generator update, i.e. after
                   generator update 500, 1000, 1500, ..., the next ``burst_steps`` (200)
                   updates are extra critic updates; then the normal cycle resumes with
                   its own ``critic_per_generator`` critic updates before the next
                   generator update. A burst is on top of the normal 5, so between
                   generator updates 500 and 501 there are 200 + 5 = 205 critic updates.

Equivalently: the (g+1)-th generator update happens once the critic has done

    critic_warmup_steps + critic_per_generator * (g + 1) + burst_steps * floor(g / burst_every)

updates; until then every update is a critic update. ``burst_every = 0`` or
``burst_steps = 0`` disables bursts; ``critic_per_generator = 0`` alternates nothing (after
warm-up only bursts are critic updates).

Example (warm-up 4, ratio 5, burst 3 after every 2nd generator update; C critic, G
generator)::

    CCCC | CCCCC G | CCCCC G | CCC CCCCC G | CCCCC G | CCC CCCCC G ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["GanSchedule", "Update", "critic_steps_before_generator_step", "next_update"]

Update = Literal["critic", "generator"]


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class GanSchedule:
    """Numbers of the critic/generator schedule (defaults: the paper's).

    Attributes:
        critic_warmup_steps: critic-only updates at the start.
        critic_per_generator: critic updates before each generator update after warm-up.
        burst_every: a burst follows every ``burst_every``-th generator update (0: never).
        burst_steps: extra critic updates in one burst (0: no bursts).
    """

    critic_warmup_steps: int = 10_000
    critic_per_generator: int = 5
    burst_every: int = 500
    burst_steps: int = 200

    def __post_init__(self) -> None:
        for name in ("critic_warmup_steps", "critic_per_generator", "burst_every", "burst_steps"):
            _check_count(name, getattr(self, name))


def critic_steps_before_generator_step(generator_steps: int, schedule: GanSchedule) -> int:
    """Critic updates that must be done before generator update number ``generator_steps + 1``."""
    _check_count("generator_steps", generator_steps)
    bursts = generator_steps // schedule.burst_every if schedule.burst_every > 0 else 0
    return (
        schedule.critic_warmup_steps
        + schedule.critic_per_generator * (generator_steps + 1)
        + schedule.burst_steps * bursts
    )


def next_update(critic_steps: int, generator_steps: int, schedule: GanSchedule) -> Update:
    """Which network the next update trains, given the updates done so far."""
    _check_count("critic_steps", critic_steps)
    if critic_steps < critic_steps_before_generator_step(generator_steps, schedule):
        return "critic"
    return "generator"
