"""Validation of preference data with Great Expectations suites.

The reward model learns only from these pairs, so a broken pair silently teaches it the wrong
thing. Before a set is used we check, with a real GX 1.x suite (`validate_preferences`):

- the table has rows and every column of PREFERENCE_COLUMNS (extra columns are allowed);
- prompt, chosen and rejected are never null, and each is 1 to `max_chars` characters long:
  an empty text or a runaway generation is not a preference;
- chosen differs from rejected: an identical pair carries no signal and a Bradley-Terry loss on
  it only pushes the reward model towards noise;
- pair_id is unique, so a pair is never counted twice and labels can be joined back to it.

Before labels become pairs, `validate_labels` checks the judgements themselves, one row per
label with an `item` (what was judged, by whom) and its `label` (the judgement):

- no label repeats an earlier identical label of the same item (a duplicated row would count
  twice in a majority vote);
- no item carries contradictory labels: the same annotator (or an unknown one) giving both
  orientations of a pair cannot both be right. Different annotators disagreeing is not a
  contradiction: their items differ, and `components.preferences` aggregates their votes.

Column checks accept `mostly` (the share of rows that must pass), for sets where a few bad rows
are tolerable. Every failure names its column and the 0-based input rows that broke it; the
report also lists every row an expectation found bad when `mostly` let it pass (`flagged`).

Without `docs_dir` the suites run on an in-memory context. With it, the results are kept in a
file-backed context in `docs_dir/gx/`, and `build_data_docs(docs_dir)` renders all of them as the
Data Docs HTML site in `docs_dir/` (`index.html`, once for several suites: rendering is most of
the cost); the pages load their CSS from CDNs, so offline they render unstyled. They name failing
rows by number and show none of their values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

# Great Expectations is imported where a suite is built or run, not here: its import takes seconds
# that every command importing the labelers (an up-to-date `rlhf run` among them) would pay.

PREFERENCE_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "annotator", "source")
TEXT_COLUMNS = ("prompt", "chosen", "rejected")
LABEL_COLUMNS = ("item", "label")
ROWS_IN_MESSAGE = 20

# GX reports failing rows by the values of an index column; the input's own index may be
# anything, so we add the plain row number.
_ROW = "_row"
# GX has no "two columns differ" expectation and UnexpectedRowsExpectation needs SQL, so the
# comparison becomes a boolean column expected to be True (see shared/STACK_NOTES.md).
_DIFFERS = "chosen_differs_from_rejected"
# Likewise for labels: pandas marks each row, GX checks the marks and names the rows. Both names
# are keys of ValidationReport.flagged, from which callers quarantine rows.
DUPLICATES = "first_copy_of_its_label"
CONTRADICTIONS = "agrees_with_its_item"
# Token counts come from the caller's tokenizer: the longer of prompt + chosen and prompt + rejected.
TOKENS = "n_tokens"
_DERIVED_MESSAGES = {
    _DIFFERS: "columns 'chosen' and 'rejected' are identical in {where}.",
    TOKENS: "prompt + response has more tokens than the model's context in {where}.",
    DUPLICATES: "a label repeats an earlier identical label of the same item in {where}.",
    CONTRADICTIONS: "labels of the same item contradict each other in {where}.",
}


@dataclass(frozen=True)
class Failure:
    expectation: str
    column: str | None
    rows: list[int]
    message: str


@dataclass(frozen=True)
class ValidationReport:
    source: str
    n_rows: int
    success: bool
    failures: list[Failure]
    # column -> rows an expectation found bad, including those `mostly` tolerated
    flagged: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{self.source}: {self.n_rows} rows, {len(self.failures)} expectations failed"]
        lines += [f"  {self.source}: {failure.message}" for failure in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _preference_expectations(
    columns: set[str], mostly: float, max_chars: int, max_tokens: int | None
) -> list[gxe.Expectation]:
    import great_expectations.expectations as gxe

    suite: list[gxe.Expectation] = [gxe.ExpectTableRowCountToBeBetween(min_value=1)]
    suite += [gxe.ExpectColumnToExist(column=column) for column in PREFERENCE_COLUMNS]
    # A check on a missing column would only repeat the missing-column failure, so it is skipped
    # and the other columns are still validated.
    for column in TEXT_COLUMNS:
        if column in columns:
            suite.append(gxe.ExpectColumnValuesToNotBeNull(column=column, mostly=mostly))
            suite.append(
                gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1, max_value=max_chars, mostly=mostly)
            )
    if _DIFFERS in columns:
        suite.append(gxe.ExpectColumnValuesToBeInSet(column=_DIFFERS, value_set=[True], mostly=mostly))
    if "pair_id" in columns:
        suite.append(gxe.ExpectColumnValuesToBeUnique(column="pair_id", mostly=mostly))
    if TOKENS in columns:
        suite.append(gxe.ExpectColumnValuesToBeBetween(column=TOKENS, max_value=max_tokens, mostly=mostly))
    return suite


def _rows_text(rows: list[int]) -> str:
    shown = ", ".join(str(row) for row in rows[:ROWS_IN_MESSAGE])
    more = f" and {len(rows) - ROWS_IN_MESSAGE} more" if len(rows) > ROWS_IN_MESSAGE else ""
    return f"{'row' if len(rows) == 1 else 'rows'} {shown}{more}"


def _message(expectation: str, column: str | None, rows: list[int], max_chars: int, error: str | None) -> str:
    if error:
        return f"{expectation} on column '{column}' could not run: {error}."
    where = _rows_text(rows)
    if column in _DERIVED_MESSAGES:
        return _DERIVED_MESSAGES[column].format(where=where)
    return {
        "expect_table_row_count_to_be_between": "the set has no rows.",
        "expect_column_to_exist": f"column '{column}' is missing.",
        "expect_column_values_to_not_be_null": f"column '{column}' is null in {where}.",
        "expect_column_value_lengths_to_be_between": (
            f"column '{column}' is empty or longer than {max_chars} characters in {where}."
        ),
        "expect_column_values_to_be_unique": f"column '{column}' has duplicate values in {where}.",
    }.get(expectation, f"{expectation} failed on column '{column}' in {where}.")


def _rows(result: Any) -> list[int]:
    return sorted(int(index[_ROW]) for index in result.result.get("unexpected_index_list") or [])


def _failure(result: Any, max_chars: int) -> Failure:
    expectation = result.expectation_config.type
    column = result.expectation_config.kwargs.get("column")
    rows = _rows(result)
    info = result.exception_info or {}
    error = info.get("exception_message") if info.get("raised_exception") else None
    return Failure(expectation, column, rows, _message(expectation, column, rows, max_chars, error))


def _context(docs_dir: Path | None) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if docs_dir is None:
        context = gx.get_context(mode="ephemeral")
    else:
        context = gx.get_context(mode="file", project_root_dir=docs_dir)
        # The site goes to the top of docs_dir rather than deep inside GX's own folder; the path is
        # relative to docs_dir/gx so the folder can be moved.
        context.variables.data_docs_sites = {
            "local_site": {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": ".."},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        }
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _frame(rows: Iterable[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    frame = rows.reset_index(drop=True) if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    frame[_ROW] = range(len(frame))
    return frame


def _validate(
    frame: pd.DataFrame,
    name: str,
    expectations: list[gxe.Expectation],
    max_chars: int,
    source: str,
    docs_dir: str | Path | None,
) -> ValidationReport:
    import great_expectations as gx

    context = _context(None if docs_dir is None else Path(docs_dir).resolve())
    batch_definition = (
        context.data_sources.add_or_update_pandas(name)
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=name, data=batch_definition, suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": frame},
        # Rows are named by number; no sample of the values is kept, so the Data Docs HTML never
        # carries text from the data (GX renders sample values unescaped: a <script> would run).
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [_ROW], "partial_unexpected_count": 0},
    )
    failures = [_failure(r, max_chars) for r in result.results if not r.success]
    flagged = {r.expectation_config.kwargs.get("column"): _rows(r) for r in result.results if _rows(r)}
    return ValidationReport(source=source, n_rows=len(frame), success=not failures, failures=failures, flagged=flagged)


def validate_preferences(
    rows: Iterable[dict[str, Any]] | pd.DataFrame,
    mostly: float = 1.0,
    max_chars: int = 4000,
    source: str = "preferences",
    docs_dir: str | Path | None = None,
    token_counts: list[int] | None = None,
    max_tokens: int | None = None,
) -> ValidationReport:
    """Validate preference pairs (a list of dicts or a DataFrame) and report every failure.

    With `token_counts` (one per row, from the model's tokenizer) rows longer than `max_tokens`
    fail too. Never raises on bad data: the caller decides what a failed report means.
    """
    frame = _frame(rows)
    if {"chosen", "rejected"} <= set(frame.columns):
        frame[_DIFFERS] = frame["chosen"] != frame["rejected"]
    if token_counts is not None:
        frame[TOKENS] = token_counts
    expectations = _preference_expectations(set(frame.columns), mostly, max_chars, max_tokens)
    return _validate(frame, "preferences", expectations, max_chars, source, docs_dir)


def validate_labels(
    rows: Iterable[dict[str, Any]] | pd.DataFrame,
    mostly: float = 1.0,
    source: str = "labels",
    docs_dir: str | Path | None = None,
) -> ValidationReport:
    """Check a table of labels (columns LABEL_COLUMNS: one row per judgement, any hashable values)
    for duplicates and contradictions. Rows are numbered from 0 in input order."""
    frame = _frame(rows)
    for column in LABEL_COLUMNS:
        if column not in frame.columns:
            raise ValueError(f"validate_labels needs column '{column}'")
    frame[DUPLICATES] = ~frame.duplicated(list(LABEL_COLUMNS))
    frame[CONTRADICTIONS] = frame.groupby("item")["label"].transform("nunique") <= 1
    import great_expectations.expectations as gxe

    expectations: list[gxe.Expectation] = [gxe.ExpectTableRowCountToBeBetween(min_value=1)]
    expectations += [
        gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True], mostly=mostly)
        for column in (DUPLICATES, CONTRADICTIONS)
    ]
    return _validate(frame, "labels", expectations, 0, source, docs_dir)


def build_data_docs(docs_dir: str | Path) -> Path:
    """Render every result kept under `docs_dir` as HTML; returns the site's index.html."""
    docs_dir = Path(docs_dir).resolve()
    _context(docs_dir).build_data_docs()
    return docs_dir / "index.html"
