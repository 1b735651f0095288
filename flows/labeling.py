"""Human labeling in the Prefect UI: the `rlhf-label` flow (deployment rlhf-label/human).

The flow samples K completions per prompt from the chosen policy (`human.policy`), then asks about
one prompt at a time: the run pauses (`pause_flow_run(wait_for_input=...)`) and the UI shows the
prompt, the completions and a form asking for a ranking, 1-5 ratings or a pairwise choice
(`human.mode`), the annotator's name and an unsafe/skip flag. An answer that is not valid is
refused with its reason and the same item is asked again. Every valid answer is written at once
(components/labelers/human.py), so a session run again with the same name continues where it
stopped. At the end the pairs are checked with the GX preference suite and DVC-tracked: use
SESSION/pairs.jsonl as `data.source` (with `data.format=pairs`).

Importing this module also makes the `human` labeler ask in the UI, so online rounds with
`label.labeler=human` pause the pipeline's run on the same form.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_client, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Running
from pydantic import Field

from components.config import PipelineConfig, override, project_config
from components.data import validation
from components.data.records import Sample
from components.files import read_jsonl, write_json
from components.labelers import human
from components.models import lm
from components.pipeline import tracking, versioning
from components.pipeline.stages import path, prompts_of

REPO = Path(__file__).resolve().parents[1]


class Answer(RunInput):
    annotator: str = Field(description="your name")  # required: the form marks it so; a blank one is refused
    unsafe_or_skip: bool = Field(False, description="tick to skip this prompt (unsafe, unreadable, ...): no label is kept")


class RankingAnswer(Answer):
    ranking: list[int] = Field(default_factory=list, description="completion numbers from best to worst, e.g. 2, 1, 4, 3")


class RatingsAnswer(Answer):
    ratings: list[int] = Field(default_factory=list, description="one rating from 1 (bad) to 5 (good) per completion, in order")


class PairwiseAnswer(Answer):
    choice: int = Field(0, description="the better completion: 1 or 2")


FORMS = {"ranking": RankingAnswer, "ratings": RatingsAnswer, "pairwise": PairwiseAnswer}
ASKED = {
    "ranking": "Rank the completions from best to worst.",
    "ratings": "Rate each completion from 1 (bad) to 5 (good).",
    "pairwise": "Which completion is better, 1 or 2?",
}


def question(item: human.Item, mode: str, error: str | None) -> str:
    """The markdown above the form: the prompt, the numbered completions, what to answer."""
    refused = f"**Your last answer was refused: {error}.** Please answer again.\n\n" if error else ""
    shown = "\n\n".join(f"**{n}.** `{text or '(empty)'}`" for n, text in enumerate(item.completions, start=1))
    return f"{refused}### Item {item.index + 1}\n\n**Prompt:** `{item.prompt}`\n\n{shown}\n\n{ASKED[mode]}"


def ask_in_ui(item: human.Item, mode: str, error: str | None, timeout_s: int) -> dict | None:
    """Pause the current flow run on the item's form; the answer, or None after `timeout_s`."""
    if error:
        get_run_logger().warning("item %d: answer refused: %s", item.index + 1, error)
    form = FORMS[mode].with_initial_data(description=question(item, mode, error))
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=2)
    except FlowPauseTimeout:
        _running_again(f"item {item.index + 1} was not answered within {timeout_s} s: the session keeps its labels")
        return None
    return answer.model_dump(include={"annotator", "unsafe_or_skip", "ranking", "ratings", "choice"})


def _running_again(message: str) -> None:
    """Take the current flow run out of its expired pause. The server fails a run whose pause
    timed out (it can no longer be resumed), but a session that times out ends normally with what
    was labelled: so the run is set Running again (forced, past that rule) and goes on."""
    get_run_logger().warning(message)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(runtime.flow_run.id, Running(message=message), force=True)


human.use(ask_in_ui)


def sample_items(cfg, root: str | Path) -> list[human.Item]:
    """A session's items: `collect.k` completions of `human.session_size` training prompts (seeded)
    from the SFT policy, the current RL policy, or the registry's champion (`human.policy`)."""
    if cfg.human.policy == "champion":
        tracking.configure(root, cfg.experiment)
        model, tokenizer = tracking.load_model(f"models:/{cfg.promotion.model_name}@champion")
    else:
        model, tokenizer = lm.load_policy(path(str(root), "sft" if cfg.human.policy == "sft" else "policy"))
    prompts = prompts_of(str(root), "train")
    chosen = random.Random(cfg.seed).sample(prompts, k=min(cfg.human.session_size, len(prompts)))
    rows = lm.sample_many(model, tokenizer, [p for p in chosen for _ in range(cfg.collect.k)], cfg.sampling, cfg.seed)
    return human.items_of([Sample(*row) for row in rows], cfg.human.mode, cfg.human.session_size)



@flow(name="rlhf-label", log_prints=True)
def rlhf_label(
    config: PipelineConfig = project_config(REPO), root: str = ".", session: str = "", overrides: list[str] | None = None
) -> dict:
    """A labeling session under ROOT/human.folder/SESSION (default: the start time): K completions
    of `human.session_size` training prompts, asked one prompt at a time."""
    logger = get_run_logger()
    cfg = override(config, overrides or [])
    name = session or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = Path(root).resolve() / cfg.human.folder / name
    labeling = human.Session(folder, cfg.human.mode, cfg.human.timeout_s)
    items = labeling.items(lambda: sample_items(cfg, root))
    logger.info("session %s: %d items in %s (%s)", name, len(items), folder, cfg.human.mode)
    stats = labeling.run(items)
    rows = read_jsonl(labeling.pairs_file) if labeling.pairs_file.is_file() else []
    summary = f"{stats['human/answered']:.0f} of {len(items)} items answered, {len(rows)} pairs"
    if rows:
        report = validation.validate_preferences(rows, cfg.data.mostly, cfg.data.max_chars, str(labeling.pairs_file),
                                                 folder / "data_docs")
        write_json(folder / "validation.json", report.to_dict())
        summary += f"\n\n```\n{report.summary()}\n```"
        if not report.success:
            raise ValueError(f"session {name}: the pairs fail validation: {report.summary()}")
        versioning.track([labeling.labels_file, labeling.pairs_file])
    create_markdown_artifact(key="labeling-session", markdown=f"## Labeling session {name}\n\n{summary}",
                             description=summary.splitlines()[0])
    return {"session": name, "folder": str(folder), "pairs": str(labeling.pairs_file), **stats}
