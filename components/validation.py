"""Validation of a pairwise preference set with a Great Expectations suite.

The reward model learns only from these pairs, so a broken pair silently teaches it the wrong
thing. Before a set is used we check, with a real GX 1.x suite on an in-memory context:

- the table has rows and every column of PREFERENCE_COLUMNS (extra columns are allowed);
- prompt, chosen and rejected are never null, and each is 1 to `max_chars` characters long:
  an empty text or a runaway generation is not a preference;
- chosen differs from rejected: an identical pair carries no signal and a Bradley-Terry loss on
  it only pushes the reward model towards noise;
- pair_id is unique, so a pair is never counted twice and labels can be joined back to it.

Column checks accept `mostly` (the share of rows that must pass), for sets where a few bad rows
are tolerable. Every failure names its column and the 0-based input rows that broke it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

PREFERENCE_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "annotator", "source")
TEXT_COLUMNS = ("prompt", "chosen", "rejected")
ROWS_IN_MESSAGE = 20

# GX reports failing rows by the values of an index column; the input's own index may be
# anything, so we add the plain row number.
_ROW = "_row"
# GX has no "two columns differ" expectation and UnexpectedRowsExpectation needs SQL, so the
# comparison becomes a boolean column expected to be True (see shared/STACK_NOTES.md).
_DIFFERS = "chosen_differs_from_rejected"


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

    def summary(self) -> str:
        lines = [f"{self.source}: {self.n_rows} rows, {len(self.failures)} expectations failed"]
        lines += [f"  {self.source}: {failure.message}" for failure in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PreferenceValidationError(ValueError):
    """A preference set that failed validation; `.report` says where."""

    def __init__(self, report: ValidationReport):
        super().__init__(report.summary())
        self.report = report


def _expectations(columns: set[str], mostly: float, max_chars: int) -> list[gxe.Expectation]:
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
    return suite


def _rows_text(rows: list[int]) -> str:
    shown = ", ".join(str(row) for row in rows[:ROWS_IN_MESSAGE])
    more = f" and {len(rows) - ROWS_IN_MESSAGE} more" if len(rows) > ROWS_IN_MESSAGE else ""
    return f"{'row' if len(rows) == 1 else 'rows'} {shown}{more}"


def _message(expectation: str, column: str | None, rows: list[int], max_chars: int, error: str | None) -> str:
    if error:
        return f"{expectation} on column '{column}' could not run: {error}."
    where = _rows_text(rows)
    return {
        "expect_table_row_count_to_be_between": "the set has no rows.",
        "expect_column_to_exist": f"column '{column}' is missing.",
        "expect_column_values_to_not_be_null": f"column '{column}' is null in {where}.",
        "expect_column_value_lengths_to_be_between": (
            f"column '{column}' is empty or longer than {max_chars} characters in {where}."
        ),
        "expect_column_values_to_be_in_set": f"columns 'chosen' and 'rejected' are identical in {where}.",
        "expect_column_values_to_be_unique": f"column '{column}' has duplicate values in {where}.",
    }.get(expectation, f"{expectation} failed on column '{column}' in {where}.")


def _failure(result: Any, max_chars: int) -> Failure:
    expectation = result.expectation_config.type
    column = result.expectation_config.kwargs.get("column")
    rows = sorted(int(index[_ROW]) for index in result.result.get("unexpected_index_list") or [])
    info = result.exception_info or {}
    error = info.get("exception_message") if info.get("raised_exception") else None
    return Failure(expectation, column, rows, _message(expectation, column, rows, max_chars, error))


def validate_preferences(
    rows: Iterable[dict[str, Any]] | pd.DataFrame,
    mostly: float = 1.0,
    max_chars: int = 4000,
    source: str = "preferences",
) -> ValidationReport:
    """Validate preference pairs (a list of dicts or a DataFrame) and report every failure.

    Never raises on bad data: the caller decides, e.g. `raise PreferenceValidationError(report)`.
    """
    frame = rows.reset_index(drop=True) if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    frame[_ROW] = range(len(frame))
    if {"chosen", "rejected"} <= set(frame.columns):
        frame[_DIFFERS] = frame["chosen"] != frame["rejected"]

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (
        context.data_sources.add_pandas("preferences")
        .add_dataframe_asset("pairs")
        .add_batch_definition_whole_dataframe("all_rows")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = gx.ExpectationSuite(name="preferences", expectations=_expectations(set(frame.columns), mostly, max_chars))
    result = batch.validate(
        suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [_ROW]}
    )
    failures = [_failure(r, max_chars) for r in result.results if not r.success]
    return ValidationReport(source=source, n_rows=len(frame), success=not failures, failures=failures)
