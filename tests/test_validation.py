"""The preference validation runs a real Great Expectations suite; these tests check its report."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from components.data.validation import (
    CONTRADICTIONS,
    DUPLICATES,
    PREFERENCE_COLUMNS,
    ValidationReport,
    build_data_docs,
    validate_labels,
    validate_preferences,
)


def pair(i: int, **changes) -> dict:
    row = {
        "pair_id": f"p{i}",
        "prompt": f"The film number {i} was",
        "chosen": f"a warm and funny story, number {i}.",
        "rejected": f"bad bad bad {i}",
        "annotator": "a1",
        "source": "sim",
    }
    return {**row, **changes}


def failures_by_key(report: ValidationReport) -> dict[tuple[str, str | None], list[int]]:
    return {(f.expectation, f.column): f.rows for f in report.failures}


def test_clean_set_passes():
    report = validate_preferences([pair(i) for i in range(5)], source="clean.jsonl")
    assert report.success is True
    assert report.failures == []
    assert report.n_rows == 5
    assert report.summary() == "clean.jsonl: 5 rows, 0 expectations failed"


def test_clean_dataframe_with_extra_column_and_odd_index_passes():
    frame = pd.DataFrame([pair(i) for i in range(5)], index=[10, 3, 7, 7, 1]).assign(extra=1)
    report = validate_preferences(frame)
    assert report.success is True
    assert report.n_rows == 5
    assert list(frame.columns) == [*PREFERENCE_COLUMNS, "extra"]  # the caller's frame is untouched


def bad_rows() -> list[dict]:
    return [
        pair(0),
        pair(1, chosen=""),
        pair(2, rejected="same text", chosen="same text"),
        pair(3, pair_id="p0"),
        pair(4, prompt=None),
        pair(5),
    ]


def test_bad_set_names_each_column_and_row():
    report = validate_preferences(bad_rows(), source="bad.jsonl")
    assert report.success is False
    assert failures_by_key(report) == {
        ("expect_column_value_lengths_to_be_between", "chosen"): [1],
        ("expect_column_values_to_be_in_set", "chosen_differs_from_rejected"): [2],
        ("expect_column_values_to_be_unique", "pair_id"): [0, 3],
        ("expect_column_values_to_not_be_null", "prompt"): [4],
    }
    messages = {f.column: f.message for f in report.failures}
    assert messages["chosen"] == "column 'chosen' is empty or longer than 4000 characters in row 1."
    assert messages["chosen_differs_from_rejected"] == "columns 'chosen' and 'rejected' are identical in row 2."
    assert messages["pair_id"] == "column 'pair_id' has duplicate values in rows 0, 3."
    assert messages["prompt"] == "column 'prompt' is null in row 4."
    assert report.summary().splitlines()[0] == "bad.jsonl: 6 rows, 4 expectations failed"
    assert json.loads(json.dumps(report.to_dict()))["failures"][0]["rows"] == report.failures[0].rows


def test_too_long_text_fails_with_max_chars():
    rows = [pair(0), pair(1, rejected="x" * 51), pair(2)]
    report = validate_preferences(rows, max_chars=50)
    assert failures_by_key(report) == {("expect_column_value_lengths_to_be_between", "rejected"): [1]}


def test_missing_column_is_named_and_other_columns_still_checked():
    rows = [{k: v for k, v in pair(i).items() if k != "rejected"} for i in range(3)]
    rows[1]["prompt"] = None
    report = validate_preferences(rows, source="no_rejected.jsonl")
    assert report.success is False
    assert failures_by_key(report) == {
        ("expect_column_to_exist", "rejected"): [],
        ("expect_column_values_to_not_be_null", "prompt"): [1],
    }
    assert "column 'rejected' is missing." in report.summary()


def test_empty_input_fails_clearly():
    report = validate_preferences([], source="empty.jsonl")
    assert report.success is False
    assert report.n_rows == 0
    keys = failures_by_key(report)
    assert ("expect_table_row_count_to_be_between", None) in keys
    assert {column for _, column in keys} == {None, *PREFERENCE_COLUMNS}
    assert "empty.jsonl: the set has no rows." in report.summary()

    frame = pd.DataFrame(columns=list(PREFERENCE_COLUMNS))
    assert [f.message for f in validate_preferences(frame).failures] == ["the set has no rows."]


def test_summary_names_source_and_rows():
    report = validate_preferences(bad_rows(), source="bad.jsonl")
    text = report.summary()
    assert text.startswith(f"bad.jsonl: {report.n_rows} rows, {len(report.failures)} expectations failed")
    assert "bad.jsonl: column 'prompt' is null in row 4." in text
    assert "bad.jsonl: column 'pair_id' has duplicate values in rows 0, 3." in text


def test_message_shows_first_twenty_rows_and_keeps_all():
    rows = [pair(i, chosen="") for i in range(25)]
    failure = validate_preferences(rows).failures[0]
    assert failure.rows == list(range(25))
    shown = ", ".join(str(row) for row in range(20))
    assert failure.message == f"column 'chosen' is empty or longer than 4000 characters in rows {shown} and 5 more."


def test_mostly_tolerates_a_minority_of_bad_rows():
    rows = [pair(0), pair(1, chosen=""), pair(2), pair(3)]
    assert failures_by_key(validate_preferences(rows)) == {
        ("expect_column_value_lengths_to_be_between", "chosen"): [1]
    }
    report = validate_preferences(rows, mostly=0.5)
    assert report.success is True
    assert report.failures == []


def labels() -> list[dict]:
    return [
        {"item": "x/a1", "label": "A"},
        {"item": "x/a2", "label": "B"},  # another annotator disagreeing: not a contradiction
        {"item": "x/a1", "label": "A"},  # the same label again
        {"item": "y/a1", "label": "C"},
        {"item": "y/a1", "label": "D"},  # the same annotator both ways
        {"item": "y/a1", "label": "C"},
    ]


def test_labels_suite_flags_later_duplicates_and_every_contradicting_row():
    report = validate_labels(labels(), source="votes.jsonl")
    assert report.success is False
    assert failures_by_key(report) == {
        ("expect_column_values_to_be_in_set", DUPLICATES): [2, 5],
        ("expect_column_values_to_be_in_set", CONTRADICTIONS): [3, 4, 5],
    }
    assert report.flagged == {DUPLICATES: [2, 5], CONTRADICTIONS: [3, 4, 5]}
    assert "votes.jsonl: a label repeats an earlier identical label of the same item in rows 2, 5." in report.summary()
    assert "votes.jsonl: labels of the same item contradict each other in rows 3, 4, 5." in report.summary()


def test_labels_suite_mostly_passes_but_still_flags_the_rows():
    report = validate_labels(labels(), mostly=0.4)
    assert report.success is True and report.failures == []
    assert report.flagged == {DUPLICATES: [2, 5], CONTRADICTIONS: [3, 4, 5]}
    assert validate_labels([{"item": i, "label": "A"} for i in "abc"]).flagged == {}


def test_labels_suite_needs_its_columns():
    with pytest.raises(ValueError, match="validate_labels needs column 'label'"):
        validate_labels([{"item": "x"}])


def test_data_docs_are_written_for_both_suites(tmp_path):
    docs = tmp_path / "data_docs"
    validate_labels(labels(), docs_dir=docs)
    validate_preferences(bad_rows(), docs_dir=docs)
    assert not (docs / "index.html").exists()
    assert build_data_docs(docs) == (docs / "index.html").resolve()
    index = (docs / "index.html").read_text()
    assert "labels" in index and "preferences" in index
    assert len(list((docs / "validations").rglob("*.html"))) == 2
    assert (docs / "gx" / "great_expectations.yml").is_file()
