"""Labelers: samples in, preference records out, with statistics.

A labeler takes the K answers a policy gave to each prompt (`Sample`s, grouped by prompt) and
returns `(pairs, stats)`: `PreferencePair`s (components/data/records.py) and float statistics for
MLflow. The label stage and the online rounds (components/rl/online.py) both use the configured
one (`label.labeler`). Registered here:

- `simulated`: simulated annotators, Bradley-Terry noise on the task's gold scorer
  (components/labelers/annotators.py);
- `file`: an existing preference set (`data.source`, a file or a Hugging Face id), ingested and
  checked row by row (components/data/preferences.py); it cannot label fresh samples.

A new labeler (humans in the Prefect UI, an LLM judge) is a module with a factory taking a
`LabelingContext`, and one `register` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from components.data.records import PreferencePair, Sample


class LabelingError(ValueError):
    """Labels could not be produced; the message says why and where."""


class Labeler(Protocol):
    needs_samples: bool  # False: the labels come from elsewhere and the collect stage samples nothing

    def label(self, samples: list[Sample], seed: int) -> tuple[list[PreferencePair], dict[str, float]]: ...


@dataclass(frozen=True)
class LabelingContext:
    """What a labeler may need: the configuration, the task's gold scorer (None when the task has
    none), and the folder of the preference set being written (for reports and quarantine)."""

    cfg: Any
    gold: Callable[[str, str, bool], float] | None
    out: Path


LABELERS: dict[str, Callable[[LabelingContext], Labeler]] = {}


def register(name: str, factory: Callable[[LabelingContext], Labeler]) -> None:
    if name in LABELERS:
        raise ValueError(f"labeler '{name}' is registered already")
    LABELERS[name] = factory


def make(name: str, context: LabelingContext) -> Labeler:
    if name not in LABELERS:
        raise LabelingError(f"unknown labeler '{name}': one of {', '.join(LABELERS)}")
    return LABELERS[name](context)


from components.labelers import annotators, file  # noqa: E402  (they import the interface above)

register("simulated", annotators.SimulatedAnnotators.from_context)
register("file", file.FileLabeler.from_context)
