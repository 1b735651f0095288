"""The human labeler's library half: checks, conversion to pairs, the session file (no Prefect)."""

from __future__ import annotations

import pytest

from components.data.records import Sample
from components.files import read_jsonl
from components.labelers import human

ITEM = human.Item(0, "The film was", ("great fun", "dull", "a mess", "fine"))


@pytest.mark.parametrize("mode, answer, refused", [
    ("ranking", {"annotator": "ann", "ranking": [1, 2, 3, 4]}, None),
    ("ranking", {"annotator": "ann", "ranking": [1, 1, 3, 4]}, "not an order"),
    ("ranking", {"annotator": "ann", "ranking": [1, 2, 3]}, "not an order"),
    ("ranking", {"annotator": " ", "ranking": [1, 2, 3, 4]}, "name is empty"),
    ("ranking", {"annotator": "ann", "unsafe_or_skip": True}, None),
    ("ratings", {"annotator": "ann", "ratings": [5, 1, 2, 3]}, None),
    ("ratings", {"annotator": "ann", "ratings": [5, 1, 2, 6]}, "from 1 to 5"),
    ("pairwise", {"annotator": "ann", "choice": 2}, None),
    ("pairwise", {"annotator": "ann", "choice": 3}, "1 or 2"),
])
def test_check_refuses_invalid_answers_with_the_reason(mode, answer, refused):
    error = human.check(ITEM, mode, answer)
    assert error is None if refused is None else refused in error


def test_a_ranking_gives_all_pairs_best_first():
    pairs = human.to_pairs(ITEM, "ranking", {"annotator": "ann", "ranking": [2, 1, 4, 3]}, "human:s")
    assert len(pairs) == 6  # K(K-1)/2
    order = ["dull", "great fun", "fine", "a mess"]
    assert all(order.index(p.chosen) < order.index(p.rejected) for p in pairs)
    assert {p.annotator for p in pairs} == {"ann"}
    ratings = human.to_pairs(ITEM, "ratings", {"annotator": "ann", "ratings": [5, 1, 1, 3]}, "s")
    assert len(ratings) == 6 and sum(p.tie for p in ratings) == 1
    assert human.to_pairs(ITEM, "ranking", {"annotator": "ann", "unsafe_or_skip": True}, "s") == []


def test_session_asks_again_after_a_refusal_writes_each_answer_and_resumes(tmp_path):
    samples = [Sample(f"prompt {i}", f"answer {i}.{j}", True) for i in range(3) for j in range(4)]
    items = human.items_of(samples, "ranking", 3)
    script = [{"annotator": "ann", "ranking": [9]}, {"annotator": "ann", "ranking": [4, 3, 2, 1]}, None]
    asked = []

    def ask(item, mode, error, timeout_s):
        asked.append((item.index, error))
        return script.pop(0)

    session = human.Session(tmp_path / "s", "ranking", 5)
    stats = session.run(session.items(lambda: items), ask)
    assert [index for index, _ in asked] == [0, 0, 1]  # refused, asked again, then timed out on item 1
    assert asked[1][1] and "not an order" in asked[1][1]
    assert stats["human/answered"] == 1 and stats["human/timed_out"] == 1.0
    assert len(read_jsonl(session.labels_file)) == 1 and len(session.pairs()) == 6

    again = human.Session(tmp_path / "s", "ranking", 5)
    answers = iter([{"annotator": "bo", "ranking": [1, 2, 3, 4]}, {"annotator": "bo", "unsafe_or_skip": True}])
    stats = again.run(again.items(lambda: pytest.fail("items are read back")), lambda *_: next(answers))
    assert [row["item"] for row in again.labels()] == [0, 1, 2]
    assert stats["human/skipped"] == 1 and len(again.pairs()) == 12


def test_a_session_file_is_a_preference_source(tmp_path):
    """The session's pairs.jsonl is what `data.source` (the file labeler) ingests."""
    from components.data.preferences import ingest
    from components.sections import DataConfig

    session = human.Session(tmp_path / "s", "ranking", 5)
    session.run([ITEM], lambda *_: {"annotator": "ann", "ranking": [1, 2, 3, 4]})
    result = ingest(session.pairs_file, tmp_path / "ingested", DataConfig(format="pairs"))
    assert result.ok and len(result.pairs) == 6 and result.report["quarantined_rows"] == 0
