"""components/progress.py: a bar's counts reach the installed listener, terminal or not."""

from __future__ import annotations

from components import progress


def test_a_listener_hears_each_bar_start_and_finish_even_when_the_bar_is_not_shown(monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    heard = []

    def listener(description, total):
        heard.append(("start", description, total))
        return lambda done: heard.append(("done", description, done))

    with progress.reporting(listener):
        assert list(progress.Bar(range(3), desc="ppo", disable=True)) == [0, 1, 2]
        manual = progress.Bar(total=4, initial=2, desc="sft", disable=True)
        manual.update(2)
        manual.close()
    assert heard[:5] == [("start", "ppo", 3), ("done", "ppo", 0), ("done", "ppo", 1), ("done", "ppo", 2), ("done", "ppo", 3)]
    assert heard[-3:] == [("start", "sft", 4), ("done", "sft", 2), ("done", "sft", 4)]
    list(progress.Bar(range(2), disable=True))  # outside `reporting`: nobody listens
    assert len(heard) == 8


def test_a_failing_listener_never_stops_the_loop():
    def broken(description, total):
        raise ConnectionError("the UI's server is away")

    with progress.reporting(broken):
        assert sum(progress.Bar(range(4), disable=True)) == 6
