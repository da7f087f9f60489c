"""The critic/generator schedule as a pure function of the two step counters."""

from __future__ import annotations

import pytest

from mdcsrn_lightning.training.gan_schedule import (
    GanSchedule,
    critic_steps_before_generator_step,
    next_update,
)


def run(schedule: GanSchedule, updates: int, critic: int = 0, generator: int = 0) -> str:
    """Simulate the module: one update per step, the counters being the only state."""
    out = []
    for _ in range(updates):
        kind = next_update(critic, generator, schedule)
        out.append("C" if kind == "critic" else "G")
        if kind == "critic":
            critic += 1
        else:
            generator += 1
    return "".join(out)


SHORT = GanSchedule(critic_warmup_steps=4, critic_per_generator=5, burst_every=2, burst_steps=3)


def test_short_schedule_step_by_step() -> None:
    expected = (
        "CCCC"  # warm-up: critic alone for 4 updates
        "CCCCC" "G"  # G1
        "CCCCC" "G"  # G2 -> burst follows
        "CCC" "CCCCC" "G"  # burst of 3, then the normal 5, then G3
        "CCCCC" "G"  # G4 -> burst follows
        "CCC" "CCCCC" "G"  # G5
        "CCCCC" "G"  # G6 -> burst follows
        "CCC"
    )
    assert len(expected) == 49
    assert run(SHORT, len(expected)) == expected


def test_short_schedule_first_updates_literal() -> None:
    # the same, as the list of the first 30 decisions with their counters
    expected = [
        (0, 0, "critic"), (1, 0, "critic"), (2, 0, "critic"), (3, 0, "critic"),
        (4, 0, "critic"), (5, 0, "critic"), (6, 0, "critic"), (7, 0, "critic"), (8, 0, "critic"),
        (9, 0, "generator"),
        (9, 1, "critic"), (10, 1, "critic"), (11, 1, "critic"), (12, 1, "critic"), (13, 1, "critic"),
        (14, 1, "generator"),
        (14, 2, "critic"), (15, 2, "critic"), (16, 2, "critic"),  # burst
        (17, 2, "critic"), (18, 2, "critic"), (19, 2, "critic"), (20, 2, "critic"), (21, 2, "critic"),
        (22, 2, "generator"),
        (22, 3, "critic"), (23, 3, "critic"), (24, 3, "critic"), (25, 3, "critic"), (26, 3, "critic"),
    ]
    critic = generator = 0
    for c, g, kind in expected:
        assert (critic, generator) == (c, g)
        assert next_update(critic, generator, SHORT) == kind
        critic, generator = (critic + 1, generator) if kind == "critic" else (critic, generator + 1)


def test_resuming_from_any_counters_continues_the_same_sequence() -> None:
    full = run(SHORT, 60)
    for cut in range(60):
        c, g = full[:cut].count("C"), full[:cut].count("G")
        assert run(SHORT, 60 - cut, critic=c, generator=g) == full[cut:]


def test_paper_numbers() -> None:
    paper = GanSchedule()
    assert (paper.critic_warmup_steps, paper.critic_per_generator, paper.burst_every, paper.burst_steps) == (
        10_000, 5, 500, 200,
    )
    seq = run(paper, 10_000 + 6 * 500 + 205 + 1 + 6)
    assert seq[:10_005] == "C" * 10_005 and seq[10_005] == "G"  # first G after warm-up + 5
    after_warmup = seq[10_000:]
    gs = [i for i, s in enumerate(after_warmup) if s == "G"]
    assert len(gs) == 502
    assert gs[499] == 6 * 500 - 1  # G500: 500 regular cycles of CCCCCG
    assert gs[500] - gs[499] - 1 == 205  # burst of 200 + the regular 5
    assert gs[501] - gs[500] - 1 == 5
    assert critic_steps_before_generator_step(500, paper) == 10_000 + 5 * 501 + 200
    assert critic_steps_before_generator_step(999, paper) == 10_000 + 5 * 1000 + 200
    assert critic_steps_before_generator_step(1000, paper) == 10_000 + 5 * 1001 + 400


def test_no_bursts_and_no_warmup() -> None:
    assert run(GanSchedule(0, 2, 0, 7), 9) == "CCGCCGCCG"
    assert run(GanSchedule(0, 2, 3, 0), 9) == "CCGCCGCCG"
    assert run(GanSchedule(1, 0, 2, 1), 7) == "CGGCGGC"


@pytest.mark.parametrize("bad", [{"critic_warmup_steps": -1}, {"burst_every": 1.5}, {"burst_steps": True}])
def test_rejects_bad_numbers(bad) -> None:
    with pytest.raises(ValueError):
        GanSchedule(**bad)


def test_rejects_negative_counters() -> None:
    with pytest.raises(ValueError):
        next_update(-1, 0, SHORT)
    with pytest.raises(ValueError):
        next_update(0, -1, SHORT)
