"""How the accuracy benchmark and the real-speech tests judge a transcript: a lost ending is words
with nothing said for them, not words said wrong; a loop is a run said twice; committed text a
client saw must never change."""
from __future__ import annotations

from bench.speech_set import LinesCheck, lost_ending, new_repeats

REFERENCE = "if the reader will excuse me i will say nothing of my antecedents nor of the circumstances"


def test_a_transcript_that_stops_early_has_lost_its_ending():
    assert lost_ending(REFERENCE, "If the reader will excuse me, I will say nothing of my anteced")


def test_a_complete_transcript_with_a_misheard_last_word_has_not():
    assert not lost_ending(REFERENCE, "If the reader will excuse me, I will say nothing of my antecedents nor of the circus stances")
    assert not lost_ending("montreal forced aligner", "Montreal first, a liner.")


def test_words_invented_after_the_end_are_not_a_lost_ending_but_count_as_errors():
    assert not lost_ending("but what are you gonna do", "But what are you going to do? So let's check this out.")


def test_a_phrase_committed_twice_is_a_repeat_unless_the_reference_says_it_twice():
    assert new_repeats("and so my fellow americans", "and so my fellow and so my fellow americans") == 1
    assert new_repeats("words words words", "words words words") == 0


def test_committed_lines_that_change_or_go_back_in_time_are_counted():
    check = LinesCheck()
    check.update([{"speaker": 1, "text": "Hello there", "start_s": 0.0, "end_s": 1.0}])
    check.update([{"speaker": 1, "text": "Hello there, friend", "start_s": 0.0, "end_s": 1.5}])
    assert (check.changed, check.backwards) == (0, 0)
    check.update([{"speaker": 1, "text": "Yellow there, friend", "start_s": 0.0, "end_s": 0.5}])
    assert (check.changed, check.backwards) == (1, 1)
