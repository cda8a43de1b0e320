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


def test_der_maps_many_speakers_one_to_one_whatever_their_labels():
    from bench.metrics import der

    reference = [(2.0 * i, 2.0 * i + 2.0, f"S{i}") for i in range(14)]  # a 14-speaker meeting
    relabelled = [(s, e, 100 - i) for i, (s, e, _) in enumerate(reference)]
    assert der(reference, relabelled)["der"] == 0.0
    merged = [(s, e, 0 if i < 2 else 100 - i) for i, (s, e, _) in enumerate(reference)]  # two voices as one
    scores = der(reference, merged)
    assert scores["missed"] == scores["false_alarm"] == 0.0
    assert abs(scores["confusion"] - 1 / 14) < 0.01  # one of the two merged turns is scored wrong


def test_the_speech_set_lists_its_recordings_with_speaker_turns():
    from bench.speech_set import DEFAULT_SET, load_diarized

    if not (DEFAULT_SET / "manifest.tsv").exists():
        import pytest

        pytest.skip("../shared/speech is not beside the repository")
    clips = {c.name: c for c in load_diarized()}
    two = clips["conversational_childes_father_child"]
    assert two.speakers == 2 and len({speaker for _, _, speaker in two.turns()}) == 2
    assert all(s < e for s, e, _ in two.turns())
