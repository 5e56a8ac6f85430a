"""The bad-input corpus as a whole: every command has cases, at least 150 in all; the count is printed.

The cases live beside each area's tests (`bad_inputs.AREAS`); tests/bad_inputs.py is their runner.
"""

from __future__ import annotations

from bad_inputs import AREAS, COMMANDS, area_cases


def test_corpus_size(capsys):
    cases = area_cases()
    counts = {command: len(found) for command, found in cases.items()}
    assert set(AREAS) == set(COMMANDS) and all(counts.values()) and sum(counts.values()) >= 150, counts
    assert all(case.command == command for command, found in cases.items() for case in found)
    every = [case for found in cases.values() for case in found]
    assert len({case.id for case in every}) == len(every)
    skips = sum(c.expect == "skip" for c in every)
    xfails = sum(c.xfail is not None for c in every)
    line = ", ".join(f"{command} {counts[command]}" for command in COMMANDS)
    with capsys.disabled():
        print(
            f"\nbad-input corpus: {len(every)} cases ({line}); {skips} counted skips, {xfails} known defects"
        )
