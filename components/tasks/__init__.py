"""Tasks: where prompts, demonstrations and (optionally) a gold scorer come from.

A task's `build(files)` writes three JSONL files the later stages read:

- `files.prompts`: one row per prompt, `{"prompt", "split": "train" | "eval", "reference"?}`; the
  eval prompts are held out from every stage but evaluation;
- `files.demonstrations`: SFT candidates from the train split, `{"prompt", "response", "quality"?}`
  (curation drops those below `sft.min_quality` when a quality is given);
- `files.corpus`: `{"text"}` documents a base model is pretrained on when none is given.

`gold` is the task's oracle `(prompt, response, ended_with_eos) -> float`, used only to evaluate
(and by the simulated annotators); None when the task has none. Registered here:

- `world`: the embedded review world (components/world/), with its gold scorer;
- `dataset`: local files or Hugging Face ids with field mapping, and chat templates
  (components/tasks/dataset.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

GoldScorer = Callable[[str, str, bool], float]


@dataclass(frozen=True)
class TaskFiles:
    prompts: Path
    demonstrations: Path
    corpus: Path


class Task(Protocol):
    gold: GoldScorer | None

    def build(self, files: TaskFiles) -> dict[str, float]: ...


TASKS: dict[str, Callable[[Any], Task]] = {}


def register(name: str, factory: Callable[[Any], Task]) -> None:
    """`factory(cfg)` builds the task from the whole pipeline configuration."""
    if name in TASKS:
        raise ValueError(f"task '{name}' is registered already")
    TASKS[name] = factory


def make(cfg) -> Task:
    return TASKS[cfg.task.name](cfg)


from components.tasks import dataset, world  # noqa: E402  (they import the interface above)

register("world", world.WorldTask)
register("dataset", dataset.DatasetTask)
