"""A claim of the paper judged on our results: the verdict, the sentence that gives its evidence and the numbers
behind it. Each analysis judges its own claims beside its code (`claims(...)` in analysis/*, experiments.family,
experiments.benchmark); experiments.reproduce puts them in the report and beside the reference's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

# Verdicts of a claim; a target (a number we set out to reach) is met or not met.
CONFIRMED, REFUTED, INCONCLUSIVE = "confirmed", "refuted", "inconclusive"
MET, NOT_MET = "met", "not met"


@dataclass(frozen=True)
class Claim:
    claim: str  # the paper's claim, one sentence
    verdict: str  # CONFIRMED, REFUTED or INCONCLUSIVE; MET or NOT_MET for a target
    evidence: str  # one sentence with the numbers
    numbers: dict[str, float] = field(default_factory=dict)  # the key numbers, by a short readable name
    load: str = ""  # for a verdict on timings: the load they were measured under ('' on a quiet machine)

    def markdown(self) -> str:
        load = f" ({self.load})" if self.load else ""
        return f"Claim: {self.claim} **{self.verdict}**{load}: {self.evidence}"

    @property
    def verdict_and_load(self) -> str:
        """The verdict, marked when its timings were measured under load (a busy machine may move it)."""
        return f"{self.verdict} (under load)" if self.load else self.verdict


def names(items: Iterable[str]) -> str:
    """Names in prose: 'a', 'a and b', 'a, b and c'; 'none' for no name."""
    items = list(items)
    if not items:
        return "none"
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def tally(holds: dict[str, bool]) -> str:
    """For how many of the named models something holds, and which: 'in 1 of 2 models: a (not b)'."""
    yes = [name for name, held in holds.items() if held]
    no = [name for name, held in holds.items() if not held]
    models = f"{len(holds)} model{'' if len(holds) == 1 else 's'}"
    if not yes:
        return f"in none of {models} ({names(no)})"
    return f"in {len(yes)} of {models}: {names(yes)}" + (f" (not {names(no)})" if no else "")
