"""What a running run is doing, in words, with its rows done and the time left: the phases besides the
training steps (workers/engine/phases.py: loading, the teacher-output cache fill, seq_kd's generation, the
student's and then the teacher's evaluation, saving), as the worker reports them on the run record.

Pure: no ORM. The time left of a phase with rows is its elapsed time × rows left / rows done (none before the
first rows are done); loading and saving report no rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

TRAINING = ""  # the steps: the run's step / total_steps and throughput say the rest
LABELS = {
    "loading": "Loading the data and models",
    "teacher_cache": "Filling the teacher-output cache",
    "seq_kd": "Generating the teacher's continuations",
    "evaluation": "Evaluating the student",
    "teacher_evaluation": "Evaluating the teacher",
    "saving": "Saving",
}


@dataclass(frozen=True)
class PhaseStatus:
    label: str
    done: int
    total: int
    eta_seconds: float | None

    @property
    def percent(self) -> int:
        return int(100 * min(self.done, self.total) / self.total) if self.total else 0

    @property
    def has_rows(self) -> bool:
        """Rows done / total mean something (a phase of one part, loading or saving, reports 0/1 and 1/1)."""
        return self.total > 1


def phase_status(
    phase: str, done: int, total: int, started_at: datetime | None, now: datetime
) -> PhaseStatus | None:
    """The phase a run reports, in words, or None while it trains its steps (or reports nothing)."""
    if not phase or phase == TRAINING:
        return None
    label = LABELS.get(phase, phase.replace("_", " ").capitalize())
    eta = None
    if started_at is not None and total > 1 and 0 < done < total:
        elapsed = max((now - started_at).total_seconds(), 0.0)
        eta = elapsed * (total - done) / done
    return PhaseStatus(label, done, total, eta)
