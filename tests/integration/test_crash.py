"""Crash consistency, short form of ``python -m tests.campaigns.crash`` (issue 29): one export of
sample:kvm SIGKILLed in every stage in turn (the CLI's process group, or its pid alone), resumed
after each kill; each kill leaves no process, mount or loop device of the run a few seconds
later, and the last resume completes with the reference run's artifact, an audit chain that
verifies and records every killed attempt, and nothing left behind."""

from __future__ import annotations

import random
from pathlib import Path

from tests.campaigns.crash import STAGES, measure, run_case


def test_a_kill_in_every_stage_then_resume(tmp_path: Path) -> None:
    ref = measure(tmp_path, jobs=1, count=1)
    plan = [(stage, 0.5) for stage in STAGES]
    outcome = run_case(0, tmp_path, ref, random.Random(29), kills=len(plan), plan=plan)
    print(
        f"\nuninterrupted {ref.seconds:.1f} s; killed and resumed in {outcome.seconds:.1f} s: {outcome.kills}"
    )
    assert [hit for _, _, hit, _ in outcome.kills] == STAGES, outcome.kills
    assert {how for how, *_ in outcome.kills} == {"group", "pid"}
    assert outcome.problems == []
