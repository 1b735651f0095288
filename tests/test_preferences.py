"""The preference data layer: real HH-RLHF transcripts, a corpus of malformed inputs, the
conversions (rankings, ratings, several annotators) and `rlhf data`, with the real GX suites."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.sections import DataConfig
from components.files import read_jsonl
from components.data.records import PreferencePair
from components.data.preferences import REJECTED, DataError, aggregate, ingest, validate_output
from components.data.rows import ASSISTANT, detect_format, parse_row
from components.data.sources import read_rows
from flows.cli import main

HH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
needs_hh = pytest.mark.skipif(not HH.is_file(), reason=f"real data set not present at {HH}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n" for row in rows))
    return path


# ------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def hh_ingest(tmp_path_factory):
    if not HH.is_file():
        pytest.skip(f"real data set not present at {HH}")
    out = tmp_path_factory.mktemp("hh")
    return ingest(HH, out, DataConfig(format="hh")), out


@needs_hh
def test_hh_harmless_base_splits_every_transcript_at_its_final_assistant_turn(hh_ingest):
    result, out = hh_ingest
    assert result.report["pairs"] == 2312 and len(result.pairs) == 2312
    assert result.quarantine == [] and (out / "quarantine.jsonl").read_text() == ""
    assert result.ok and result.report["validation"]["pairs"]["success"] is True
    with gzip.open(HH, "rt", encoding="utf-8") as handle:
        originals = {(row["chosen"], row["rejected"]) for row in map(json.loads, handle)}
    written = read_jsonl(out / "pairs.jsonl")
    assert len(written) == 2312
    assert all(row["prompt"].endswith(ASSISTANT) for row in written)
    assert {(row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]) for row in written} == originals
    assert (out / "data_docs" / "index.html").is_file()


@needs_hh
def test_ingesting_hh_twice_gives_identical_bytes(hh_ingest, tmp_path):
    _, out = hh_ingest
    ingest(HH, tmp_path, DataConfig(format="auto"))
    assert (tmp_path / "pairs.jsonl").read_bytes() == (out / "pairs.jsonl").read_bytes()


def test_ingesting_the_same_source_twice_gives_identical_bytes(tmp_path):
    rows = [rated(f"prompt {i % 3}", f"reply {i}", 1 + i % 4, annotator=f"a{i % 2}") for i in range(30)]
    source = write_jsonl(tmp_path / "ratings.jsonl", rows)
    first, second = (ingest(source, tmp_path / name, DataConfig(ties="keep")) for name in ("one", "two"))
    assert first.pairs and first.report["agreement"]["ties_kept"] > 0
    assert (tmp_path / "one" / "pairs.jsonl").read_bytes() == (tmp_path / "two" / "pairs.jsonl").read_bytes()


# ------------------------------------------------------------------------ malformed inputs


def pair(i: int, **changes) -> dict:
    return {"prompt": f"Review film {i}:", "chosen": f" a warm story {i}.", "rejected": f" bad {i}", **changes}


def rated(prompt: str, response: str, rating, annotator: str = "a1") -> dict:
    return {"prompt": prompt, "response": response, "rating": rating, "annotator": annotator}


TEN_MB = 10_000_000


def malformed_cases(tmp: Path) -> list[tuple[Path, str, dict, int]]:
    """(file, format, {row: (field, words of the reason)}, pairs expected from its good rows)."""
    pairs = write_jsonl(tmp / "pairs.jsonl", [
        pair(1),
        b'{"prompt": "Review film 2:", "chosen": " cut off\n',
        {k: v for k, v in pair(3).items() if k != "rejected"},
        pair(4, chosen=5),
        pair(5, prompt=""),
        pair(6, rejected=" a warm story 6."),
        b'{"prompt": "Review film 7:", "chosen": " caf\xc3\xa9 \xff", "rejected": " bad 7"}\n',
        pair(8, chosen="x" * TEN_MB),
        b"\n",
        pair(10),
    ])
    ranked = write_jsonl(tmp / "ranked.jsonl", [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
        {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]},
        {"prompt": "r", "responses": ["a", "b", "c"], "ranking": [0, 1]},
    ])
    ratings = tmp / "ratings.csv"
    with open(ratings, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "response", "rating", "annotator"])
        writer.writerows([["p", "good", "5", "a1"], ["p", "poor", "2", "a1"], ["p", "odd", "6", "a1"],
                          ["p", "multi\nline", "four", "a1"]])
    header = tmp / "wrong_header.csv"
    header.write_text("question,good,bad\nq1,yes,no\nq2,fine,awful\n")
    empty = tmp / "empty.jsonl"
    empty.write_bytes(b"")
    return [
        (pairs, "pairs", {
            2: (None, "not valid JSON"),
            3: ("rejected", "missing field"),
            4: ("chosen", "wrong type: expected a string, got a number"),
            5: ("prompt", "empty string"),
            6: ("rejected", "identical to chosen"),
            7: ("chosen", "invalid UTF-8: byte 0xff at character 6"),
            8: ("chosen", "text of 10,000,000 characters is longer than max_chars=20,000"),
        }, 2),
        (ranked, "ranked", {
            2: ("ranking", "[0, 0, 2] is not a permutation of range(3)"),
            3: ("ranking", "[0, 1] is not a permutation of range(3)"),
        }, 3),
        (ratings, "ratings", {
            4: ("rating", "6 is outside 1-5"),
            5: ("rating", "wrong type: expected a number, got a string"),
        }, 1),
        (header, "pairs", {
            2: ("prompt", "missing field (fields present: 'question', 'good', 'bad')"),
            3: ("prompt", "missing field (fields present: 'question', 'good', 'bad')"),
        }, 0),
        (empty, "auto", {None: (None, "the file is empty: no rows")}, 0),
    ]


def test_malformed_rows_are_quarantined_once_each_and_good_rows_kept(tmp_path):
    for source, fmt, expected, n_pairs in malformed_cases(tmp_path):
        out = tmp_path / f"out-{source.stem}"
        result = ingest(source, out, DataConfig(format=fmt))
        assert [entry.row for entry in result.quarantine] == list(expected), source.name
        for entry in result.quarantine:
            field, reason = expected[entry.row]
            assert (entry.field, entry.file) == (field, str(source)) and reason in entry.reason, entry.message()
            message = entry.message()
            assert str(source) in message and reason in message
            assert entry.row is None or f"row {entry.row}" in message
            assert field is None or f"field '{field}'" in message
        folder = out if result.ok else out / REJECTED  # a failed ingest files its outputs apart
        written = read_jsonl(folder / "quarantine.jsonl")
        assert [(row["row"], row["field"]) for row in written] == [(row, f) for row, (f, _) in expected.items()]
        assert len(read_jsonl(folder / "pairs.jsonl")) == len(result.pairs) == n_pairs, source.name
        assert result.report["quarantined_rows"] == len(expected)
        assert result.report["valid_rows"] + len(expected) == result.report["rows"]


def test_quarantine_keeps_the_raw_row_and_the_text_of_unparseable_lines(tmp_path):
    source, fmt, _, _ = malformed_cases(tmp_path)[0]
    result = ingest(source, tmp_path / "out", DataConfig(format=fmt, max_invalid_fraction=1.0))
    text = (tmp_path / "out" / "quarantine.jsonl").read_bytes().decode("utf-8")  # strict: still valid UTF-8
    assert '"chosen": " caf\u00e9 \\udcff"' in text  # the invalid byte 0xff as a JSON escape
    raw = {row["row"]: row["raw"] for row in read_jsonl(tmp_path / "out" / "quarantine.jsonl")}
    assert raw[2] == '{"prompt": "Review film 2:", "chosen": " cut off'
    assert raw[4] == pair(4, chosen=5)
    assert raw[7]["chosen"] == " caf\u00e9 \udcff"  # reads back as the string the row held
    assert len(raw[8]["chosen"]) == TEN_MB
    assert [p.prompt for p in result.pairs] == ["Review film 1:", "Review film 10:"]


def test_unknown_source_and_offline_hub_id_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="no-such-file.jsonl: no such file"):
        ingest(tmp_path / "no-such-file.jsonl", tmp_path / "out")
    datasets = pytest.importorskip("datasets")
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("HF_DATASETS_OFFLINE is off here: the hub would be contacted")
    with pytest.raises(DataError, match=r"'someone/some-preference-set'.*offline"):
        ingest("someone/some-preference-set", tmp_path / "out")


# --------------------------------------------------------------------------- file formats


def test_every_file_format_with_field_mapping_gives_the_same_pairs(tmp_path):
    rows = [{"question": f"Q{i}?", "good": f"yes {i}", "bad": f"no {i}", "annotator": "a1"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({key: [row[key] for row in rows] for key in rows[0]}))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with gzip.open(tmp_path / "e.csv.gz", "wt", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cfg = DataConfig(fields={"question": "prompt", "good": "chosen", "bad": "rejected"})
    expected = [(f"Q{i}?", f"yes {i}", f"no {i}", "a1") for i in range(3)]
    for name in ("a.json", "b.json", "c.jsonl.gz", "d.parquet", "e.csv.gz"):
        read = read_rows(tmp_path / name, cfg)
        assert [row.row for row in read] == ([2, 3, 4] if name.endswith(".csv.gz") else [1, 2, 3])  # CSV: line numbers
        assert [row.raw for row in read] == rows and detect_format(read[0].data) == "pairs"
        pairs = [parse_row("pairs", row.data, cfg.max_chars) for row in read]
        assert [(p.prompt, p.chosen, p.rejected, p.annotator) for p in pairs] == expected, name
    result = ingest(tmp_path / "e.csv.gz", tmp_path / "out", cfg)
    assert result.report["format"] == "pairs" and result.quarantine == []
    assert [(p.prompt, p.chosen, p.rejected, p.source) for p in result.pairs] == [
        (*e[:3], "e.csv.gz") for e in expected
    ]


def test_auto_detects_the_record_type_from_the_fields():
    hh_text = "\n\nHuman: hi\n\nAssistant: hello"
    assert detect_format({"chosen": hh_text, "rejected": hh_text + "!"}) == "hh"
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == "pairs"
    assert detect_format({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}) == "ranked"
    assert detect_format({"prompt": "p", "response": "a", "rating": 3}) == "ratings"
    assert detect_format({"messages": [], "chosen": [], "rejected": []}) == "hh"
    assert detect_format({"chosen": "a", "rejected": "b"}) is None


def test_chat_message_lists_become_hh_prompts(tmp_path):
    user = {"role": "user", "content": "Name a colour."}
    source = write_jsonl(tmp_path / "chat.jsonl", [
        {"chosen": [user, {"role": "assistant", "content": "Blue."}],
         "rejected": [user, {"role": "assistant", "content": "No."}]},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Red."}],
         "rejected": [{"role": "assistant", "content": "Dunno."}]},
        {"chosen": [user, {"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "user", "content": "Other."}, {"role": "assistant", "content": "No."}]},
    ])
    result = ingest(source, tmp_path / "out")
    assert result.report["format"] == "hh"
    assert [(p.prompt, p.chosen, p.rejected) for p in result.pairs] == [
        ("\n\nHuman: Name a colour.\n\nAssistant:", " Blue.", " No."),
        ("\n\nHuman: Name a colour.\n\nAssistant:", " Red.", " Dunno."),
    ]
    [entry] = result.quarantine
    assert (entry.row, entry.field) == (3, "rejected") and "before the final assistant message" in entry.reason


def test_hh_transcripts_that_differ_before_the_final_turn_are_quarantined(tmp_path):
    source = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
         "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: X\n\nAssistant: d"},
        {"chosen": "\n\nHuman: a\n\nAssistant: yes", "rejected": "\n\nHuman: z\n\nAssistant: no"},
        {"chosen": "\n\nHuman: a\n\nAssistant: yes", "rejected": "\n\nHuman: a\n\nAssistant: no"},
    ])
    result = ingest(source, tmp_path / "out", DataConfig(format="hh"))
    assert [(q.row, q.field) for q in result.quarantine] == [(1, "chosen"), (2, "rejected")]
    assert "before the final assistant turn" in result.quarantine[0].reason
    assert [(p.prompt, p.chosen, p.rejected) for p in result.pairs] == [("\n\nHuman: a\n\nAssistant:", " yes", " no")]


# ---------------------------------------------------------------------------- conversions


def test_ranking_of_four_gives_six_correctly_oriented_pairs_per_prompt(tmp_path):
    responses = ["r0", "r1", "r2", "r3"]
    ranking = [2, 0, 3, 1]  # rank of each response: r1 > r3 > r0 > r2
    source = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "first", "responses": responses, "ranking": ranking},
        {"prompt": "second", "responses": responses[::-1], "ranking": ranking},
    ])
    result = ingest(source, tmp_path / "out", DataConfig(format="auto"))
    assert result.report["format"] == "ranked"
    assert [p.prompt for p in result.pairs] == ["first"] * 6 + ["second"] * 6
    first = {(p.chosen, p.rejected) for p in result.pairs[:6]}
    order = ["r1", "r3", "r0", "r2"]
    assert first == {(order[i], order[j]) for i in range(4) for j in range(i + 1, 4)}
    second = {(p.chosen, p.rejected) for p in result.pairs[6:]}  # responses reversed: r2 > r0 > r3 > r1
    order = ["r2", "r0", "r3", "r1"]
    assert second == {(order[i], order[j]) for i in range(4) for j in range(i + 1, 4)}
    assert len({p.group for p in result.pairs[:6]}) == 1 and result.pairs[0].group != result.pairs[6].group


def test_rating_ties_are_dropped_or_kept_as_configured(tmp_path):
    source = write_jsonl(tmp_path / "ratings.jsonl", [
        rated("p", "A", 5), rated("p", "B", 3), rated("p", "C", 3), rated("q", "D", 4),
    ])
    dropped = ingest(source, tmp_path / "drop", DataConfig(format="ratings", ties="drop"))
    assert [(p.chosen, p.rejected, p.margin, p.tie) for p in dropped.pairs] == [
        ("A", "B", 2, False), ("A", "C", 2, False)
    ]
    assert dropped.report["agreement"]["ties_dropped"] == 1
    kept = ingest(source, tmp_path / "keep", DataConfig(format="ratings", ties="keep"))
    assert [(p.chosen, p.rejected, p.margin, p.tie) for p in kept.pairs] == [
        ("A", "B", 2, False), ("A", "C", 2, False), ("B", "C", 0, True)
    ]
    assert read_jsonl(tmp_path / "keep" / "pairs.jsonl")[2]["tie"] is True


def test_several_annotators_are_aggregated_with_agreement_statistics(tmp_path):
    def label(prompt: str, chosen: str, rejected: str, annotator: str) -> dict:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "annotator": annotator}

    source = write_jsonl(tmp_path / "votes.jsonl", [
        label("x", "A", "B", "a1"), label("x", "A", "B", "a2"), label("x", "B", "A", "a3"),  # 2:1 for A
        label("y", "C", "D", "a1"), label("y", "C", "D", "a2"),  # unanimous
        label("z", "E", "F", "a1"), label("z", "F", "E", "a2"),  # exact split
        label("w", "G", "H", "a1"),  # one annotator
        label("w", "G", "H", "a1"),  # row 9: the same label again
        label("v", "I", "J", "a4"), label("v", "J", "I", "a4"),  # rows 10, 11: a4 contradicts itself
    ])
    result = ingest(source, tmp_path / "out", DataConfig(ties="keep", max_invalid_fraction=0.5))
    assert [(q.row, q.field, q.reason) for q in result.quarantine] == [
        (9, "chosen", "duplicate of row 8"),
        (10, "chosen", "contradicts row(s) 11: same item, same annotator, other label"),
        (11, "chosen", "contradicts row(s) 10: same item, same annotator, other label"),
    ]
    assert [(p.prompt, p.chosen, p.tie, p.annotator) for p in result.pairs] == [
        ("x", "A", False, "a1,a2,a3"), ("y", "C", False, "a1,a2"), ("z", "E", True, "a1,a2"), ("w", "G", False, "a1"),
    ]
    assert result.report["agreement"] == {
        "items": 4.0,
        "multi_annotator_items": 3.0,
        "mean_pairwise_agreement": pytest.approx((1 / 3 + 1 + 0) / 3),
        "unanimous_share": pytest.approx(1 / 3),
        "ties_kept": 1.0,
        "ties_dropped": 0.0,
    }
    labels_check = result.report["validation"]["labels"]
    assert labels_check["success"] is False and {f["column"] for f in labels_check["failures"]} == {
        "first_copy_of_its_label", "agrees_with_its_item"
    }
    assert result.report["validation"]["pairs"]["success"] is True


def test_aggregate_mean_margin_of_the_winning_votes():
    votes = [PreferencePair("p", "a", "b", 2.0, annotator="u"), PreferencePair("p", "a", "b", 1.0, annotator="v"),
             PreferencePair("p", "b", "a", 3.0, annotator="w")]
    [winner], stats = aggregate(votes)
    assert (winner.chosen, winner.margin, winner.annotator) == ("a", 1.5, "u,v,w")
    assert stats["mean_pairwise_agreement"] == pytest.approx(1 / 3) and stats["unanimous_share"] == 0


# ------------------------------------------------------------------------------------ CLI


def test_cli_exit_code_follows_the_invalid_share(tmp_path, capsys):
    source = write_jsonl(tmp_path / "ten.jsonl", [pair(i) for i in range(9)] + [pair(9, chosen="")])
    out = tmp_path / "out"
    root = ["--root", str(tmp_path)]  # MLflow runs of the ingest go to tmp_path/mlflow
    assert main(["data", "ingest", str(source), "--out", str(out), "--format", "pairs", *root,
                 "--set", "data.max_invalid_fraction=0.2"]) == 0
    captured = capsys.readouterr()
    assert f"quarantined: {source}, row 10, field 'chosen': empty string" in captured.out and not captured.err
    assert "10 rows, 9 valid, 1 quarantined (10.0%); 9 pairs" in captured.out
    assert main(["data", "ingest", str(source), "--out", str(out), *root, "--set", "data.max_invalid_fraction=0.05"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("data error:") and "more than data.max_invalid_fraction=0.05" in err and len(err.splitlines()) == 1
    report = json.loads((out / REJECTED / "report.json").read_text())
    assert report["ok"] is False and report["invalid_fraction"] == 0.1
    assert json.loads((out / "report.json").read_text())["ok"] is True  # the previous ingest's outputs stay
    assert main(["data", "validate", str(out), *root]) == 0
    assert main(["data", "validate", str(out), *root, "--set", "data.max_chars=10"]) == 2
    captured = capsys.readouterr()
    assert "longer than 10 characters" in captured.out
    assert captured.err.startswith("data error:") and "expectations failed" in captured.err and len(captured.err.splitlines()) == 1
    assert main(["data", "ingest", str(source), "--out", str(out), *root, "--set", "data.tiez=keep"]) == 2
    assert "data.tiez: unknown key" in capsys.readouterr().err


def test_validate_output_needs_an_ingested_folder(tmp_path):
    with pytest.raises(DataError, match="pairs.jsonl: not found"):
        validate_output(tmp_path)
