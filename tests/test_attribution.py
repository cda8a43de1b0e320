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
    assert [(x.text.strip(), n) for x, n, _ in ready] == [("hi", 1), ("there", 1), ("hello", 2)]


def test_words_past_the_covered_time_wait_in_the_diarization_buffer():
    a, ready = attribute([SpeakerTurn(0.0, 1.0, 0)], [w(0.2, "one"), w(1.5, "two"), w(2.0, "three")], covered=1.2)
    assert [x.text for x, _, _ in ready] == [" one"]
    assert a.waiting_text == "two three"
    a.add_turns([SpeakerTurn(1.2, 3.0, 1)], 3.0)
    assert [(x.text, n) for x, n, _ in a.take_ready()] == [(" two", 2), (" three", 2)]
    assert a.waiting_text == ""


def test_a_word_in_no_turn_takes_the_nearest_turn_or_the_previous_speaker():
    a, ready = attribute([SpeakerTurn(0.0, 1.0, 5), SpeakerTurn(3.0, 4.0, 6)],
                         [w(0.2, "a"), w(1.3, "b"), w(2.6, "c")], covered=5.0)
    assert [n for _, n, _ in ready] == [1, 1, 2]
    a.add_words([w(10.0, "far")])
    a.add_turns([], 11.0)
    assert [n for _, n, _ in a.take_ready()] == [2]  # nothing near: the previous speaker


def test_lines_break_where_the_speaker_changes():
    t = Transcript()
    _, ready = attribute([SpeakerTurn(0.0, 1.0, 0), SpeakerTurn(1.0, 2.0, 1), SpeakerTurn(2.0, 3.0, 0)],
                         [w(0.1, "a"), w(0.5, "b"), w(1.2, "c"), w(2.2, "d")], covered=3.0)
    for word, n, _ in ready:
        t.add_words([word], n)
    assert [(ln.speaker, ln.text) for ln in t.lines] == [(1, "a b"), (2, "c"), (1, "d")]


def test_with_speakers_a_line_spans_its_speakers_turn_not_only_its_words():
    """The diarizer hears speech Whisper wrote no word for: the line covers the speaker's turn around
    its words (within half a second of them), and reaches the turn's end once the diarizer has heard it."""
    a = SpeakerAttribution()
    t = Transcript(turn_gap=2.0)
    a.add_words([w(1.0, "hello"), w(1.5, "there")])
    a.add_turns([SpeakerTurn(0.6, 2.0, 0), SpeakerTurn(5.0, 6.0, 0)], 2.0)
    for item, n, span in a.take_ready():
        t.add_words([item], n, span)
    assert (t.lines[0].start, t.lines[0].end) == (0.6, 2.0)
    assert (t.words[0].start, t.words[-1].end) == (1.0, 1.9)  # the words keep their own times
    a.add_turns([SpeakerTurn(2.0, 3.2, 0)], 3.2)
    t.reach(a.reach_of_last())
    assert t.lines[0].end == 3.2  # the turn went on past the last word
    assert t.lines[0].end < 5.0  # a turn of the same speaker seconds away is not this line's


def test_with_speakers_a_gap_of_turn_gap_seconds_starts_a_new_line_for_the_same_speaker():
    t = Transcript(turn_gap=2.0)
    t.add_words([w(0.0, "one"), w(0.5, "two")], 1, (0.0, 0.9))
    t.add_words([w(2.0, "three")], 1, (2.0, 2.4))  # 1.1 s after "two": the same line
    t.add_words([w(5.0, "four")], 1, (5.0, 5.4))  # 2.6 s after "three": a new turn
    assert [(ln.speaker, ln.text) for ln in t.lines] == [(1, "one two three"), (1, "four")]
    plain = Transcript()  # without speakers, lines break at silence lines only
    plain.add_words([w(0.0, "one"), w(5.0, "four")])
    assert [ln.text for ln in plain.lines] == ["one four"]


def test_a_line_spans_the_whole_turn_the_diarizer_gave_out_in_pieces():
    """A streaming diarizer gives a turn out half a second at a time: a word at the turn's end takes
    its line back to where the speaker began (the pieces touch), not only to the pieces next to it;
    a piece of the same speaker after a real pause is another turn."""
    a = SpeakerAttribution()
    t = Transcript(turn_gap=2.0)
    pieces = [SpeakerTurn(0.5 * i, 0.5 * i + 0.5, 0) for i in range(8)]  # 0.0 .. 4.0
    a.add_turns(pieces + [SpeakerTurn(6.0, 6.5, 0)], 6.5)
    a.add_words([w(3.5, "late")])
    for item, n, span in a.take_ready():
        t.add_words([item], n, span)
    assert (t.lines[0].start, t.lines[0].end) == (0.0, 4.0)


def test_another_speakers_line_may_begin_before_the_line_before_it_ends():
    """People talk over each other: the second speaker's line starts where the diarizer heard them
    start, inside the first speaker's line, but never before that line begins; a speaker's own new
    line, a silence line, and captions without speakers never overlap."""
    t = Transcript(turn_gap=2.0)
    t.add_words([w(0.0, "so"), w(0.5, "then")], 1, (0.0, 3.0))
    t.add_words([w(2.6, "yes")], 2, (2.2, 3.0))
    assert [(ln.speaker, ln.start, ln.end) for ln in t.lines] == [(1, 0.0, 3.0), (2, 2.2, 3.0)]
    t.add_words([w(3.5, "but")], 1, (2.9, 4.0))  # back to the first speaker, overlapping the second's line
    t.add_words([w(6.5, "and")], 1, (3.0, 7.0))  # 2.6 s later: the first speaker's new line after their own
    assert [(ln.speaker, ln.start) for ln in t.lines][2:] == [(1, 2.9), (1, 4.0)]
    t.add_silence(7.0, 10.0)
    t.add_words([w(10.2, "ok")], 2, (9.0, 10.6))
    assert (t.lines[-1].speaker, t.lines[-1].start) == (2, 10.0)
    plain = Transcript()
    plain.add_words([w(0.0, "so")], 1, (0.0, 3.0))
    plain.add_words([w(2.6, "yes")], 2, (2.2, 3.0))
    assert [ln.start for ln in plain.lines] == [0.0, 3.0]
    assert all(a.start <= b.start for a, b in zip(t.lines, t.lines[1:]))
