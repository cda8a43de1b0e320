"""Attribution rules on hand-made word and speaker timelines."""
from backends.asr_types import Word
from backends.diarization_types import SpeakerTurn
from streamserver.live.attribution import SpeakerAttribution
from streamserver.live.transcript import Transcript


def w(start: float, text: str, dur: float = 0.4) -> Word:
    return Word(start, start + dur, f" {text}")


def attribute(turns, words, covered):
    a = SpeakerAttribution()
    a.add_words(words)
    a.add_turns(turns, covered)
    return a, a.take_ready()


def test_words_go_to_the_speaker_who_overlaps_them_most():
    turns = [SpeakerTurn(0.0, 2.0, 7), SpeakerTurn(1.9, 4.0, 3)]
    _, ready = attribute(turns, [w(0.5, "hi"), w(1.7, "there"), w(2.5, "hello")], covered=4.0)
    # backend labels 7 and 3 become 1 and 2, in order of first appearance
    assert [(x.text.strip(), n) for x, n in ready] == [("hi", 1), ("there", 1), ("hello", 2)]


def test_words_past_the_covered_time_wait_in_the_diarization_buffer():
    a, ready = attribute([SpeakerTurn(0.0, 1.0, 0)], [w(0.2, "one"), w(1.5, "two"), w(2.0, "three")], covered=1.2)
    assert [x.text for x, _ in ready] == [" one"]
    assert a.waiting_text == "two three"
    a.add_turns([SpeakerTurn(1.2, 3.0, 1)], 3.0)
    assert [(x.text, n) for x, n in a.take_ready()] == [(" two", 2), (" three", 2)]
    assert a.waiting_text == ""


def test_a_word_in_no_turn_takes_the_nearest_turn_or_the_previous_speaker():
    a, ready = attribute([SpeakerTurn(0.0, 1.0, 5), SpeakerTurn(3.0, 4.0, 6)],
                         [w(0.2, "a"), w(1.3, "b"), w(2.6, "c")], covered=5.0)
    assert [n for _, n in ready] == [1, 1, 2]
    a.add_words([w(10.0, "far")])
    a.add_turns([], 11.0)
    assert [n for _, n in a.take_ready()] == [2]  # nothing near: the previous speaker


def test_lines_break_where_the_speaker_changes():
    t = Transcript()
    _, ready = attribute([SpeakerTurn(0.0, 1.0, 0), SpeakerTurn(1.0, 2.0, 1), SpeakerTurn(2.0, 3.0, 0)],
                         [w(0.1, "a"), w(0.5, "b"), w(1.2, "c"), w(2.2, "d")], covered=3.0)
    for word, n in ready:
        t.add_words([word], n)
    assert [(ln.speaker, ln.text) for ln in t.lines] == [(1, "a b"), (2, "c"), (1, "d")]
