"""A corpus of bad input, across formats and commands: each kind ends in a clear error (naming the
file, the row and the field where there is one) or a quarantined row, and every good row is kept.

Row-level kinds share one source file per record type (good rows between the bad ones), ingested
once; file-level kinds, trainer inputs, settings, `--out` folders and command lines are checked one
by one. Every error a command reports is one line on stderr with exit code 2.

With RLHF_CORPUS_REPORT=FILE the tests write there each kind they checked with what happened (the
quarantine reason or the error message observed), one line per kind.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.config import ConfigError, load_config
from components.data.preferences import REJECTED, DataError, ingest
from components.data.rows import read_training_file
from components.sections import DataConfig
from flows.cli import main
from tests.conftest import REPO


OBSERVED: dict[str, dict[str, str]] = {}  # section -> kind -> what happened, for RLHF_CORPUS_REPORT


def observed(section: str, kind: str, what: str) -> None:
    OBSERVED.setdefault(section, {})[kind] = " ".join(str(what).split())


@pytest.fixture(scope="module", autouse=True)
def corpus_report():
    """After the module: with RLHF_CORPUS_REPORT set, each kind checked and what happened."""
    yield
    report = os.environ.get("RLHF_CORPUS_REPORT")
    if not report:
        return
    kinds = sum(len(section) for section in OBSERVED.values())
    lines = [f"# Bad-input corpus (tests/test_bad_inputs.py): {kinds} kinds, as observed by the test run", ""]
    for section, found in OBSERVED.items():
        lines += [f"## {section} ({len(found)})", ""]
        lines += [f"- {kind} — {what}" for kind, what in found.items()]
        lines.append("")
    Path(report).write_text("\n".join(lines), encoding="utf-8")


def line(value) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


class RowCase(NamedTuple):
    kind: str
    fmt: str
    row: bytes | dict  # the bad row, as bytes when it is not JSON
    field: str | None
    reason: str


HH_PROMPT = "\n\nHuman: Which film?\n\nAssistant:"
MSG = [{"role": "user", "content": "Which film?"}]
ROW_CASES = [
    RowCase("not JSON", "pairs", b'{"prompt": "p", "chosen": ', None, "not valid JSON"),
    RowCase("a JSON array, not an object", "pairs", ["p", "a", "b"], None, "not a JSON object but an array"),
    RowCase("missing field", "pairs", {"prompt": "p", "rejected": "b"}, "chosen", "missing field"),
    RowCase("number for a text", "pairs", {"prompt": "p", "chosen": 5, "rejected": "b"}, "chosen",
            "expected a string, got a number"),
    RowCase("empty text", "pairs", {"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "empty string"),
    RowCase("chosen identical to rejected", "pairs", {"prompt": "p", "chosen": "x", "rejected": "x"}, "rejected",
            "identical to chosen"),
    RowCase("text over max_chars", "pairs", {"prompt": "p", "chosen": "x" * 300, "rejected": "b"}, "chosen",
            "longer than max_chars=200"),
    RowCase("invalid UTF-8 byte", "pairs", b'{"prompt": "p", "chosen": "caf\xff", "rejected": "b"}', "chosen",
            "invalid UTF-8: byte 0xff"),
    RowCase("lone surrogate", "pairs", b'{"prompt": "p", "chosen": "\\ud800", "rejected": "b"}', "chosen",
            "lone surrogate U+D800"),
    RowCase("key repeated in one object", "pairs", b'{"prompt": "p", "chosen": "a", "chosen": "b", "rejected": "c"}',
            None, "the key 'chosen' appears 2 times"),
    RowCase("negative margin", "pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1}, "margin",
            "is negative"),
    RowCase("NaN margin", "pairs", b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "margin",
            "not a finite number"),
    RowCase("margin as text", "pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "1"}, "margin",
            "expected a number, got a string"),
    RowCase("annotator not text", "pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "annotator": 7},
            "annotator", "expected a string"),
    RowCase("duplicate label", "pairs", {"prompt": "good 0", "chosen": "good 0 a", "rejected": "good 0 b"}, "chosen",
            "duplicate of row 1"),
    RowCase("ranking not a permutation", "ranked", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]},
            "ranking", "is not a permutation"),
    RowCase("identical responses", "ranked", {"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]}, "responses",
            "two responses are identical"),
    RowCase("boolean rank", "ranked", {"prompt": "p", "responses": ["a", "b"], "ranking": [True, 0]}, "ranking",
            "expected an array of integers"),
    RowCase("responses not an array", "ranked", {"prompt": "p", "responses": "a", "ranking": [0]}, "responses",
            "expected an array"),
    RowCase("rating outside 1-5", "ratings", {"prompt": "p", "response": "a", "rating": 6}, "rating", "outside 1-5"),
    RowCase("boolean rating", "ratings", {"prompt": "p", "response": "a", "rating": True}, "rating",
            "expected a number, got a boolean"),
    RowCase("infinite rating", "ratings", b'{"prompt": "p", "response": "a", "rating": Infinity}', "rating",
            "not a finite number"),
    RowCase("transcripts differ early", "hh", {"chosen": "\n\nHuman: A\n\nAssistant: x",
                                              "rejected": "\n\nHuman: B\n\nAssistant: y"}, "rejected",
            "shares no conversation"),
    RowCase("empty final turn", "hh", {"chosen": HH_PROMPT, "rejected": HH_PROMPT + " y"}, "chosen",
            "empty final assistant turn"),
    RowCase("text mixed with messages", "hh", {"chosen": HH_PROMPT + " x", "rejected": MSG}, "rejected",
            "must both be HH text or both message lists"),
    RowCase("unknown role", "hh", {"chosen": MSG + [{"role": "bot", "content": "x"}],
                                   "rejected": MSG + [{"role": "assistant", "content": "y"}]}, "chosen[1].role",
            "expected one of system, user, assistant"),
    RowCase("no Assistant turn at all", "hh", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi there"}, "rejected",
            "shares no conversation"),
    RowCase("last message not the assistant's", "hh", {"chosen": MSG + [{"role": "user", "content": "x"}],
                                                       "rejected": MSG + [{"role": "user", "content": "y"}]},
            "chosen[1].role", "the final message is not the assistant's"),
]
GOOD = {
    "pairs": lambda i: {"prompt": f"good {i}", "chosen": f"good {i} a", "rejected": f"good {i} b"},
    "ranked": lambda i: {"prompt": f"good {i}", "responses": [f"good {i} a", f"good {i} b"], "ranking": [1, 0]},
    "ratings": lambda i: {"prompt": "good", "response": f"good {i} a", "rating": 1 + i % 5},  # pairs of one prompt
    "hh": lambda i: {"chosen": f"\n\nHuman: good {i}\n\nAssistant: a", "rejected": f"\n\nHuman: good {i}\n\nAssistant: b"},
}


@pytest.fixture(scope="module")
def row_ingests(tmp_path_factory) -> dict[str, tuple]:
    """fmt -> (ingest result, {kind: line number}, good prompts): good rows on odd lines."""
    folder = tmp_path_factory.mktemp("rows")
    outcomes = {}
    for fmt, good in GOOD.items():
        cases = [case for case in ROW_CASES if case.fmt == fmt]
        lines, numbers = [], {}
        for i, case in enumerate(cases):
            lines.append(line(good(i)))
            lines.append(line(case.row))
            numbers[case.kind] = len(lines)
        source = folder / f"{fmt}.jsonl"
        source.write_bytes(b"\n".join(lines) + b"\n")
        result = ingest(source, folder / f"out-{fmt}", DataConfig(format=fmt, max_chars=200, max_invalid_fraction=1.0))
        outcomes[fmt] = result, numbers, {good(i).get("prompt", f"good {i}") for i in range(len(cases))}
    return outcomes


@pytest.mark.parametrize("case", ROW_CASES, ids=[case.kind for case in ROW_CASES])
def test_each_bad_row_is_quarantined_with_its_row_and_field_and_good_rows_kept(row_ingests, case):
    result, numbers, good_prompts = row_ingests[case.fmt]
    (entry,) = [entry for entry in result.quarantine if entry.row == numbers[case.kind]]
    assert (entry.field, case.reason in entry.reason) == (case.field, True), entry.message()
    assert entry.message().startswith(f"{entry.file}, row {entry.row}")
    kept = {pair.prompt.removeprefix("\n\nHuman: ").removesuffix("\n\nAssistant:") for pair in result.pairs}
    assert good_prompts <= kept
    observed(f"Rows of a JSONL file ({case.fmt} records): quarantined, good rows kept", case.kind,
             f"quarantined: row {entry.row}, field {entry.field!r}: {entry.reason}")


# ------------------------------------------------------------------------------- file level

GOOD_ROWS = [GOOD["pairs"](i) for i in range(3)]


def jsonl(rows) -> bytes:
    return b"".join(line(row) + b"\n" for row in rows)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


CSV_GOOD = "prompt,chosen,rejected\r\n" + "".join(f"good {i},good {i} a,good {i} b\r\n" for i in range(3))
FILE_CASES = {
    # name: (file name, bytes, settings, expected): pairs kept (no quarantine) | the error | (row, reason, pairs kept)
    "UTF-8 BOM, JSONL": ("bom.jsonl", codecs.BOM_UTF8 + jsonl(GOOD_ROWS), {}, 3),
    "UTF-8 BOM, JSON": ("bom.json", codecs.BOM_UTF8 + json.dumps(GOOD_ROWS).encode(), {}, 3),
    "UTF-8 BOM, CSV": ("bom.csv", codecs.BOM_UTF8 + CSV_GOOD.encode(), {}, 3),
    "UTF-8 BOM in a Parquet column name": (
        "bom.parquet", parquet_bytes(pa.table({"\ufeffprompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "w"]})),
        {}, 2),
    "UTF-16 text": ("utf16.jsonl", jsonl(GOOD_ROWS).decode().encode("utf-16"), {}, "UTF-16 or UTF-32"),
    "CSV row with an empty cell": ("empty.csv", (CSV_GOOD + "p,,b\r\n").encode(), {}, (5, "empty string", 3)),
    "CSV row with too few cells": ("few.csv", (CSV_GOOD + "p,a\r\n").encode(), {}, (5, "2 cells for the 3 columns", 3)),
    "CSV quote never closed": ("quote.csv", (CSV_GOOD + 'p,"a,b\r\n').encode(), {}, (5, "2 cells for the 3 columns", 3)),
    "JSON array holding a number": ("number.json", json.dumps([*GOOD_ROWS, 5]).encode(), {},
                                    (4, "not a JSON object but a number", 3)),
    "JSON document cut off": ("cut.json", json.dumps(GOOD_ROWS).encode()[:-20], {}, (None, "not valid JSON", 0)),
    "Parquet null text": (
        "null.parquet", parquet_bytes(pa.table({"prompt": [r["prompt"] for r in GOOD_ROWS] + ["p"],
                                                "chosen": [r["chosen"] for r in GOOD_ROWS] + [None],
                                                "rejected": [r["rejected"] for r in GOOD_ROWS] + ["b"]})),
        {}, (4, "expected a string, got null", 3)),
    "Parquet numbers in a text column": (
        "numbers.parquet", parquet_bytes(pa.table({"prompt": ["p"], "chosen": [1], "rejected": ["b"]})), {},
        (1, "expected a string, got a number", 0)),
    "not a Parquet file": ("fake.parquet", b"PAR1 not parquet", {}, (None, "Parquet magic bytes not found", 0)),
    "repeated CSV column": ("dup.csv", b"prompt,chosen,rejected,chosen\np,a,b,c\n", {}, "'chosen' appear more than once"),
    "two CSV columns mapped to one field": (
        "map.csv", b"prompt,good,chosen,rejected\np,a,b,c\n", {"fields": {"good": "chosen"}}, "ambiguous columns"),
    "repeated Parquet column": (
        "dup.parquet", parquet_bytes(pa.Table.from_arrays([pa.array(["p"]), pa.array(["a"]), pa.array(["b"]),
                                                          pa.array(["c"])], names=["prompt", "chosen", "rejected", "chosen"])),
        {}, "'chosen' appear more than once"),
    "CSV row with too many cells": ("cells.csv", (CSV_GOOD + "p,a,b,extra\r\n").encode(), {},
                                    (5, "4 cells for the 3 columns", 3)),
    "JSON row renamed onto a field it has": (
        "renamed.jsonl", jsonl([*GOOD_ROWS, {"prompt": "p", "good": "a", "chosen": "b", "rejected": "c"}]),
        {"fields": {"good": "chosen"}}, (4, "ambiguous", 3)),
    "gzip cut off midway": ("cut.jsonl.gz", gzip.compress(jsonl(GOOD["pairs"](i) for i in range(2000)))[:-300], {},
                            (None, "reading stopped after", None)),
    "empty file": ("empty.jsonl", b"", {}, (None, "the file is empty", 0)),
    "unknown file type": ("pairs.txt", jsonl(GOOD_ROWS), {}, "unknown file type"),
    "JSON columns of different lengths": ("cols.json", json.dumps({"prompt": ["a", "b"], "chosen": ["x"]}).encode(), {},
                                          (None, "arrays differ in length", 0)),
    "JSON scalar document": ("scalar.json", b"42", {}, (None, "expected an array of objects", 0)),
    "auto: a row that fits no format": (
        "mixed.jsonl", jsonl([*GOOD_ROWS, {"prompt": "q", "response": "r", "rating": 4},
                              {"prompt": "q", "response": "s", "rating": 2}, {"question": "?"}]),
        {"format": "auto"}, (6, "fit no record type", 4)),
    "auto: no row fits any format": ("none.jsonl", jsonl([{"a": 1}, {"b": 2}]), {"format": "auto"}, "cannot detect"),
}


@pytest.mark.parametrize("name", FILE_CASES)
def test_each_bad_file_is_a_clear_error_or_keeps_its_good_rows(tmp_path, name):
    file_name, content, settings, expected = FILE_CASES[name]
    source = tmp_path / file_name
    source.write_bytes(content)
    cfg = DataConfig(**{"max_invalid_fraction": 1.0, **settings})
    section = "Files (JSONL, JSON, CSV, Parquet, gzip): a clear error, or quarantine with good rows kept"
    if isinstance(expected, str):
        with pytest.raises(DataError, match=expected) as error:
            ingest(source, tmp_path / "out", cfg)
        assert str(source) in str(error.value)
        assert not (tmp_path / "out" / "pairs.jsonl").exists()
        observed(section, name, f"error: {str(error.value).replace(str(tmp_path) + '/', '')}")
        return
    result = ingest(source, tmp_path / "out", cfg)
    if isinstance(expected, int):
        assert (len(result.pairs), result.quarantine) == (expected, [])
        observed(section, name, f"read correctly: all {expected} rows kept, none quarantined")
        return
    row, reason, n_pairs = expected
    assert (row, True) in [(entry.row, reason in entry.reason) for entry in result.quarantine]
    entry = next(entry for entry in result.quarantine if entry.row == row and reason in entry.reason)
    observed(section, name, f"quarantined: row {entry.row}, field {entry.field!r}: {entry.reason}; "
                            f"{len(result.pairs)} good pairs kept")
    if n_pairs is None:  # a cut-off file: the rows before the cut, and one entry for the rest (its last line too)
        assert len(result.pairs) > 100 and len(result.quarantine) <= 2
        return
    assert len(result.quarantine) == 1 and len(result.pairs) == n_pairs
    if n_pairs:
        assert {f"good {i}" for i in range(3)} <= {pair.prompt for pair in result.pairs}  # every good row kept


def test_auto_format_keeps_the_good_rows_of_every_record_type(tmp_path):
    _, content, settings, _ = FILE_CASES["auto: a row that fits no format"]
    (tmp_path / "mixed.jsonl").write_bytes(content)
    result = ingest(tmp_path / "mixed.jsonl", tmp_path / "out", DataConfig(max_invalid_fraction=0.5))
    assert result.report["format"] == "pairs,ratings"
    assert sorted(p.prompt for p in result.pairs) == ["good 0", "good 1", "good 2", "q"]


# ----------------------------------------------------------------------- trainer inputs

TRAIN_CASES = {
    # name: (kind, row, field, reason)
    "tie as text": ("pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "tie": "false"}, "tie",
                    "expected true or false, got a string 'false'"),
    "NaN margin": ("pairs", b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "margin",
                   "not a finite number"),
    "chosen identical to rejected": ("pairs", {"prompt": "p", "chosen": "a", "rejected": "a"}, "rejected", "identical"),
    "empty rejected": ("pairs", {"prompt": "p", "chosen": "a", "rejected": ""}, "rejected", "empty string"),
    "empty response": ("demonstrations", {"prompt": "p", "response": ""}, "response", "empty string"),
    "prompt not text": ("demonstrations", {"prompt": ["p"], "response": "r"}, "prompt", "expected a string"),
}


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_trainers_refuse_rows_they_cannot_learn_from_naming_file_row_and_field(tmp_path, name):
    kind, row, field, reason = TRAIN_CASES[name]
    good = {"prompt": "q", "response": "r"} if kind == "demonstrations" else GOOD_ROWS[0]
    source = tmp_path / "rows.jsonl"
    source.write_bytes(jsonl([good, row]))
    with pytest.raises(ValueError) as error:
        read_training_file(str(source), kind, 1000)
    assert str(error.value).startswith(f"{source}, row 2, field '{field}': ") and reason in str(error.value)
    observed("Rows a trainer refuses (rlhf train, before the model loads)", f"{name} ({kind})",
             f"error: {str(error.value).replace(str(tmp_path) + '/', '')}")


def test_a_tie_written_as_true_is_kept_as_a_tie(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_bytes(jsonl([{**GOOD_ROWS[0], "tie": True}, GOOD_ROWS[1]]))
    assert [pair.tie for pair in read_training_file(str(source), "pairs", 1000)] == [True, False]


# --------------------------------------------------------------------------- settings

SETTING_CASES = {
    "infinite learning rate": ("base.lr=.inf", "base.lr: Input should be a finite number"),
    "NaN KL coefficient": ("ppo.kl_coef=.nan", "ppo.kl_coef: Input should be a finite number"),
    "infinite clip range": ("ppo.cliprange=1e400", "ppo.cliprange: Input should be a finite number"),
    "boolean step count": ("ppo.steps=true", "ppo.steps: expected a number, got the boolean True"),
    "seed past any integer bound": ("seed=1.0e+38", "seed: 1e+38 is beyond the largest accepted integer"),
    "huge world": ("world.n_reviews=100000000", "world.n_reviews: Input should be less than or equal to 1000000"),
    "model name MLflow refuses": ("promotion.model_name=a/b", "promotion.model_name: String should match pattern"),
    "value that is not YAML": ("data.fields={a: [b", "the value is not valid YAML"),
}


@pytest.mark.parametrize("name", SETTING_CASES)
def test_bad_settings_stop_with_one_message_and_exit_2(capsys, name):
    override, message = SETTING_CASES[name]
    with pytest.raises(ConfigError, match=re.escape(message.split(": ", 1)[-1])):
        load_config(REPO / "params.yaml", [override])
    assert main(["stage", "task", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error:") and message in err and len(err.splitlines()) == 1
    observed("Settings (--set): exit 2, one line", f"{name} (--set {override})", err.strip())


# --------------------------------------------------------------------------- --out folders


@pytest.fixture
def train_args(tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_bytes(jsonl([{"prompt": "q", "response": "r"}]))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    return lambda out: ["train", "sft", "--model", "no-model", "--data", str(data), "--out", str(tmp_path / out),
                        "--root", str(tmp_path)]


@pytest.mark.parametrize("out, reason", [
    (".", "is the project root"),
    ("data/preferences", "the pipeline's own folder data/preferences"),
    ("models", "the pipeline's own folder models/"),
    ("checkpoints/sft", "the pipeline's own folder checkpoints"),
    ("notes", "an existing folder that `rlhf train` did not write"),
    ("demos.jsonl/model", "Not a directory"),
])
def test_train_refuses_an_out_folder_it_must_not_write(train_args, capsys, tmp_path, out, reason):
    assert main(train_args(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"output error: --out {tmp_path / out}") and reason in err and len(err.splitlines()) == 1
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    observed("Output folders (rlhf train --out): exit 2, one line, nothing written", f"--out {out}",
             err.strip().replace(str(tmp_path) + "/", "").replace(str(tmp_path), "ROOT"))


def test_ingest_into_an_unwritable_place_is_one_line_with_exit_2(tmp_path, capsys):
    source = tmp_path / "pairs.jsonl"
    source.write_bytes(jsonl(GOOD_ROWS))
    assert main(["data", "ingest", str(source), "--out", str(source / "out"), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("output error:") and "Not a directory" in err and len(err.splitlines()) == 1
    observed("Output folders (rlhf train --out): exit 2, one line, nothing written", "rlhf data ingest --out under a file",
             err.strip().replace(str(tmp_path) + "/", ""))


def test_a_failed_ingest_leaves_the_previous_outputs_and_files_its_own_in_rejected(tmp_path):
    source, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    source.write_bytes(jsonl(GOOD_ROWS))
    assert ingest(source, out).ok
    before = {name: (out / name).read_bytes() for name in ("pairs.jsonl", "quarantine.jsonl", "report.json")}
    source.write_bytes(jsonl([GOOD_ROWS[0], {"prompt": "p", "chosen": ""}]))
    failed = ingest(source, out)
    assert not failed.ok
    assert {name: (out / name).read_bytes() for name in before} == before
    assert json.loads((out / REJECTED / "report.json").read_text())["quarantined_rows"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["data_docs", "pairs.jsonl", "quarantine.jsonl", REJECTED, "report.json"]


def test_a_full_disk_mid_ingest_leaves_the_previous_outputs_intact(tmp_path, monkeypatch):
    import errno

    from components.data import preferences

    source, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    source.write_bytes(jsonl(GOOD_ROWS))
    ingest(source, out)
    before = (out / "pairs.jsonl").read_bytes()
    source.write_bytes(jsonl(GOOD_ROWS[:1]))

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(preferences, "write_json", full)
    with pytest.raises(OSError, match="No space left"):
        ingest(source, out)
    assert (out / "pairs.jsonl").read_bytes() == before
    assert not list(Path(out).glob("*.tmp-*"))


def test_data_docs_carry_no_markup_from_the_data(tmp_path):
    from components.data.preferences import validate_output

    script = "<script>alert(1)</script>"
    rows = [*GOOD_ROWS, {"prompt": script, "chosen": f"{script} a", "rejected": "<img src=x onerror=alert(2)>"}]
    (tmp_path / "pairs.jsonl").write_bytes(jsonl(rows))
    assert ingest(tmp_path / "pairs.jsonl", tmp_path / "out").ok  # markup is text: a valid row
    report = validate_output(tmp_path / "out", DataConfig(max_chars=12))  # its texts now fail, rows named
    assert not report.success and any(3 in failure.rows for failure in report.failures)
    pages = list((tmp_path / "out" / "data_docs").rglob("*.html"))
    assert pages and not [page for page in pages if "alert(" in page.read_text()]


# ------------------------------------------------------------------------ command lines


@pytest.fixture
def cli(tmp_path):
    """Files the command-line cases refer to, under tmp_path."""
    (tmp_path / "pairs.jsonl").write_bytes(jsonl(GOOD_ROWS))
    (tmp_path / "mostly-bad.jsonl").write_bytes(jsonl([GOOD_ROWS[0], {"prompt": "p"}, {"prompt": "q", "chosen": ""}]))
    (tmp_path / "tie.jsonl").write_bytes(jsonl([GOOD_ROWS[0], {**GOOD_ROWS[1], "tie": "no"}]))
    (tmp_path / "list.yaml").write_text("- seed: 1\n")
    (tmp_path / "broken.yaml").write_text("seed: [1\n")
    (tmp_path / "several.yaml").write_text("seed: x\nppo:\n  stepz: 3\nbase:\n  lr: .inf\n")
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "pairs.jsonl").write_bytes(jsonl([{**GOOD_ROWS[0], "chosen": "x" * 50}]))
    return tmp_path


CLI_CASES = {
    # name: (arguments, with {tmp} for the fixture's folder; the error line's start; a part of it)
    "ingest: no such source file": (["data", "ingest", "{tmp}/nothing.jsonl", "--out", "{tmp}/out"], "data error:",
                                    "nothing.jsonl"),
    "ingest: too many bad rows": (["data", "ingest", "{tmp}/mostly-bad.jsonl", "--out", "{tmp}/out"], "data error:",
                                  "66.7% of the rows of"),
    "ingest: an unknown --format": (["data", "ingest", "{tmp}/pairs.jsonl", "--out", "{tmp}/out", "--format", "xml"],
                                    "usage error: rlhf data ingest:", "invalid choice: 'xml'"),
    "validate: a folder without pairs.jsonl": (["data", "validate", "{tmp}/empty-dir"], "data error:", "pairs.jsonl"),
    "validate: pairs that fail the suite": (["data", "validate", "{tmp}/long", "--set", "data.max_chars=10"],
                                            "data error:", "expectations failed"),
    "train: no such --data file": (["train", "sft", "--model", "m", "--data", "{tmp}/none.jsonl", "--out", "{tmp}/o"],
                                   "data error:", "none.jsonl: no such file"),
    "train: a row the trainer refuses": (["train", "reward", "--model", "m", "--data", "{tmp}/tie.jsonl", "--out", "{tmp}/o"],
                                         "data error:", "row 2, field 'tie'"),
    "train: a --set for another section's key": (["train", "dpo", "--model", "m", "--data", "{tmp}/pairs.jsonl", "--out",
                                                  "{tmp}/o", "--set", "dpo.nope=1"], "configuration error:", "dpo.nope: unknown key"),
    "stage: an unknown stage": (["stage", "nope"], "usage error: rlhf stage:", "invalid choice: 'nope'"),
    "stage: its inputs missing": (["stage", "reward"], "stage failed:", "needs data/task/prompts.jsonl"),
    "config: a file that is not YAML": (["config", "--config", "{tmp}/broken.yaml"], "configuration error:", "not valid YAML"),
    "config: a YAML list, not a mapping": (["config", "--config", "{tmp}/list.yaml"], "configuration error:",
                                           "expected a mapping at the top level"),
    "config: several problems in one file": (["config", "--config", "{tmp}/several.yaml"], "configuration error:",
                                             "seed: Input should be a valid integer"),
    "config: no such file": (["config", "--config", "{tmp}/missing.yaml"], "configuration error:",
                             "configuration file not found"),
    "--set without a value": (["config", "--set", "seed"], "configuration error:", "--set expects KEY=VALUE, got 'seed'"),
    "--set a key below a plain value": (["config", "--set", "seed.x=1"], "configuration error:",
                                        "seed: Input should be a valid integer"),
    "compare: an unknown RL method": (["compare", "--methods", "ppo,magic"], "configuration error:", "unknown magic"),
    "promote: no version given": (["promote"], "promotion error:", "give a VERSION"),
    "an unknown command": (["launch"], "usage error: rlhf:", "invalid choice: 'launch'"),
}


@pytest.mark.parametrize("name", CLI_CASES)
def test_each_bad_command_line_is_one_line_on_stderr_with_exit_2(cli, capsys, name):
    arguments, start, part = CLI_CASES[name]
    argv = [argument.replace("{tmp}", str(cli)) for argument in arguments] + ["--root", str(cli)]
    try:
        code = main(argv)
    except SystemExit as stopped:  # argparse
        code = stopped.code
    captured = capsys.readouterr()
    assert code == 2 and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith(start) and part in captured.err, captured.err
    if name == "config: several problems in one file":
        assert captured.err.count("; ") == 2 and "ppo.stepz: unknown key" in captured.err and "base.lr" in captured.err
    if name == "ingest: too many bad rows":
        assert not (cli / "out" / "pairs.jsonl").exists()  # nothing replaced
    observed("Command lines: exit 2, exactly one line on stderr", name,
             f"`rlhf {' '.join(arguments)}` -> {captured.err.strip().replace(str(cli) + '/', '').replace(str(cli), '{tmp}')}")
