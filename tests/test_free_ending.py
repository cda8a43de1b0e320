"""Joining a free decode's ending onto a conditioned last decode (`backends/free_ending.py`)."""
from __future__ import annotations

from backends.asr_types import Word
from backends.free_ending import with_free_ending


def _words(text: str, start: float = 0.0, step: float = 0.3) -> list[Word]:
    return [Word(start + i * step, start + i * step + 0.2, " " + w) for i, w in enumerate(text.split())]


def test_the_words_a_free_decode_hears_after_the_last_one_said_are_kept():
    mine = _words("nice little things to say.", 5.0)
    heard = _words("Yeah. Oh, nice little things to say to me.", 4.0)
    out = with_free_ending("", mine, heard)
    assert [w.text for w in out] == [" nice", " little", " things", " to", " say", " to", " me."]
    assert out[:4] == mine[:4]  # what it said stays, timed as it was
    assert [w.start for w in out] == sorted(w.start for w in out) and out[5].start >= mine[-1].end


def test_a_forced_prefix_is_what_was_said_when_the_decode_added_nothing():
    heard = _words("If you caught it over there to me.")
    out = with_free_ending("If you caught it over there.", [], heard, prefix_end=2.5)
    assert [w.text for w in out] == [" to", " me."] and out[0].start >= 2.5


def test_nothing_is_added_where_the_free_decode_ends_with_it_or_does_not_say_its_last_word():
    mine = _words("the birch canoe slid")
    assert with_free_ending("", mine, _words("the birch canoe slid")) == mine
    assert with_free_ending("", mine, _words("a birch canoe glided on the planks")) == mine
    assert with_free_ending("", [], []) == []
    assert with_free_ending("", mine, []) == mine
