"""LocalAgreement-2 with hand-made hypotheses: what gets committed, when, and what the buffer keeps."""
from __future__ import annotations

import numpy as np

from backends.asr_types import Segment, Word
from streamserver.live.policy import MAX_PENDING_SECONDS, HypothesisBuffer, LocalAgreementPolicy
from streamserver.live.transcript import Transcript


def words(*spec: tuple[float, str]) -> list[Word]:
    return [Word(t, t + 0.4, f" {w}") for t, w in spec]


def test_commits_only_the_prefix_two_hypotheses_agree_on():
    buf = HypothesisBuffer()
    assert buf.insert(words((0.0, "hello"), (0.5, "word"))) == []
    committed = buf.insert(words((0.0, "Hello,"), (0.5, "world"), (1.0, "how")))
    assert [w.text for w in committed] == [" Hello,"]  # case and punctuation don't block agreement
    assert [w.text for w in buf.pending] == [" world", " how"]
    assert [w.text for w in buf.insert(words((0.5, "world"), (1.0, "how"), (1.5, "are")))] == [" world", " how"]
    assert [w.text for w in buf.flush()] == [" are"]
    assert buf.pending == []


def test_a_word_two_hypotheses_keep_disagreeing_on_does_not_hold_the_words_after_it_for_long():
    """The head word flips between two readings at every decode ("nice" / "I"): under the strict prefix
    rule nothing after it is ever agreed. A word that ended `MAX_PENDING_SECONDS` before the end of what
    the decode heard is committed as the newest decode says it; no word is lost or said twice."""
    heads = ["nice", "I"]

    def hypothesis(i: int) -> list[Word]:
        return words((0.0, heads[i % 2]), (0.5, "thing"), (1.0, "yeah"), (1.5, "that's"), (2.0, "the"), (2.5, "one"))

    strict = HypothesisBuffer()
    assert all(strict.insert(hypothesis(i)) == [] for i in range(6))

    buf = HypothesisBuffer()
    committed = []
    for i, heard in enumerate([1.5, 2.5, 3.5, 4.5, 5.5]):
        for w in buf.insert([w for w in hypothesis(i) if w.end <= heard], heard_until=heard):
            committed.append((heard, w))
    assert [w.text.strip() for _, w in committed] == ["I", "thing", "yeah", "that's", "the", "one"]
    assert all(heard - w.end <= MAX_PENDING_SECONDS + 1.0 for heard, w in committed)  # 2 s and one decode


def test_words_repeated_from_the_committed_tail_are_not_committed_twice():
    buf = HypothesisBuffer()
    buf.insert(words((0.0, "one"), (0.5, "two")))
    buf.insert(words((0.0, "one"), (0.5, "two"), (1.0, "three")))
    # Whisper restarts its hypothesis with the already committed "two" (times slightly off).
    h = words((0.95, "two"), (1.0, "three"), (1.5, "four"))
    assert buf.insert(h) == [h[1]]


class ScriptedASR:
    """Returns, for each call, words for the audio it was given: one word per 0.5 s."""

    def __init__(self, vocabulary: list[str]) -> None:
        self.vocabulary = vocabulary
        self.calls: list[tuple[float, str]] = []

    def __call__(self, audio: np.ndarray, prompt: str) -> list[Segment]:
        seconds = min(len(audio) / 16000, 30.0)  # the engine hears one 30-s window
        self.calls.append((len(audio) / 16000, prompt))
        # words are laid out on absolute time; the policy passes buffer-relative audio, so we
        # need the policy's offset: the test sets it through `offset_of` below.
        start = self.offset_of()
        ws = []
        t = 0.0
        while t + 0.5 <= seconds + 1e-9:
            idx = int(round((start + t) / 0.5))
            ws.append(Word(t, t + 0.45, f" {self.vocabulary[idx % len(self.vocabulary)]}"))
            t += 0.5
        # a segment every 2 words
        return [Segment(ws[i].start, ws[min(i + 1, len(ws) - 1)].end, tuple(ws[i:i + 2])) for i in range(0, len(ws), 2)]


def run_policy(seconds: float, chunk: float = 1.0, trim: float = 15.0, max_buffer: float = 25.0):
    vocab = [f"w{i}" for i in range(1000)]
    asr = ScriptedASR(vocab)
    policy = LocalAgreementPolicy(asr, trim_seconds=trim, max_buffer_seconds=max_buffer)
    asr.offset_of = lambda: policy.offset
    transcript = Transcript()
    longest_buffer = 0.0
    for _ in range(int(seconds / chunk)):
        policy.insert_audio(np.zeros(int(chunk * 16000), dtype=np.float32))
        out = policy.process()
        transcript.add_words(out.committed)
        longest_buffer = max(longest_buffer, policy.buffer_seconds)
    transcript.add_words(policy.finish())
    return transcript, asr, longest_buffer, vocab


def test_a_long_stream_commits_every_word_once_in_order_and_the_buffer_stays_bounded():
    transcript, asr, longest, vocab = run_policy(60.0)
    text = transcript.lines[0].text.split()
    assert text == vocab[:120]
    assert longest <= 15.0 + 1.0 + 1e-6
    # the prompt carries committed text that has left the buffer
    assert any("w1" in prompt for _, prompt in asr.calls[-5:])


def test_a_stream_that_fell_behind_loses_no_words_past_whisper_s_30_second_window():
    """40 s arrive before the policy gets to decode (a loaded server): no decode is given more than
    one window, and every word is committed once, in order, whether the stream goes on or ends."""
    for decode_first in (True, False):
        vocab = [f"w{i}" for i in range(1000)]
        asr = ScriptedASR(vocab)
        policy = LocalAgreementPolicy(asr, trim_seconds=15.0, max_buffer_seconds=25.0)
        asr.offset_of = lambda: policy.offset
        transcript = Transcript()
        policy.insert_audio(np.zeros(40 * 16000, dtype=np.float32))
        if decode_first:
            transcript.add_words(policy.process().committed)
        transcript.add_words(policy.finish())
        assert transcript.lines[0].text.split() == vocab[:80]
        assert max(seconds for seconds, _ in asr.calls) <= 29.0


def test_a_repeat_dropped_from_the_captions_is_not_in_the_next_prompt():
    """A decode that loops ("w1 w2 w3 w1 w2 w3") commits the run once, and what prompts the next decode
    is what was committed: a prompt holding the loop makes Whisper continue it."""
    calls = []

    def transcribe(audio, prompt):
        calls.append(prompt)
        if len(calls) == 1:
            ws = [Word(0.5 * i, 0.5 * i + 0.4, f" w{1 + i % 3}") for i in range(6)]
            return [Segment(0.0, 3.0, tuple(ws))]
        return [Segment(0.0, 0.4, (Word(0.0, 0.4, " next"),))]

    policy = LocalAgreementPolicy(transcribe)
    policy.insert_audio(np.zeros(3 * 16000, dtype=np.float32))
    assert [w.text.strip() for w in policy.finish()] == ["w1", "w2", "w3"]
    policy.insert_audio(np.zeros(16000, dtype=np.float32))
    policy.process()
    assert calls[-1] == "w1 w2 w3"


def test_the_buffer_is_cut_even_without_agreed_segment_ends():
    transcript, _, longest, vocab = run_policy(40.0, trim=100.0, max_buffer=8.0)
    assert longest <= 9.0 + 1e-6
    assert transcript.lines[0].text.split() == vocab[:80]


def test_transcript_lines_grow_at_the_end_only():
    t = Transcript()
    t.add_silence(0.0, 2.5)
    t.add_words(words((2.6, "hello"), (3.1, "there")))
    t.add_silence(3.5, 6.0)
    t.add_silence(3.5, 7.0)  # the same silence, longer
    t.add_words(words((7.2, "again")))
    assert [(l.speaker, l.text) for l in t.lines] == [(-2, ""), (1, "hello there"), (-2, ""), (1, "again")]
    assert t.lines[2].end == 7.0 and t.lines[1].start == 2.6


def test_the_same_word_seconds_apart_is_not_agreement():
    """A decode that skipped part of a long buffer says "the room" 6 s later than the one before:
    committing it would also put the committed time past the skipped words."""
    buf = HypothesisBuffer()
    buf.insert(words((9.7, "of"), (10.1, "the"), (10.2, "room"), (12.1, "reinforce")))
    committed = buf.insert(words((9.7, "of"), (16.4, "the"), (18.5, "room")))
    assert [w.text.strip() for w in committed] == ["of"]


class OneSegmentASR:
    """Times every word of a 0.5-s grid as one segment (as Whisper often does for a long buffer),
    with a full stop after every sixth word."""

    def __call__(self, audio: np.ndarray, prompt: str) -> list[Segment]:
        n = int(len(audio) / 16000 / 0.5)
        out = tuple(Word(i * 0.5, i * 0.5 + 0.4, f" w{i}" + ("." if i % 6 == 5 else "")) for i in range(n))
        return [Segment(0.0, n * 0.5, out)] if out else []


def test_a_long_buffer_timed_as_one_segment_is_cut_at_a_committed_sentence_end():
    policy = LocalAgreementPolicy(OneSegmentASR(), trim_seconds=5.0, max_buffer_seconds=25.0)
    longest = 0.0
    for _ in range(20):
        policy.insert_audio(np.zeros(16000, np.float32))
        policy.process()
        longest = max(longest, policy.buffer_seconds)
    assert longest < 10.0  # cut at sentence ends, never left to grow to 25 s



def _three_decodes_then_the_end(searched_finals: bool):
    """An utterance with words still pending at its end: (the jobs the policy asked for, what it committed)."""
    from backends.asr_types import drive

    vocab = [f"w{i}" for i in range(100)]
    asr = ScriptedASR(vocab)
    policy = LocalAgreementPolicy(trim_seconds=15.0, searched_finals=searched_finals)
    asr.offset_of = lambda: policy.offset
    jobs = []

    def answer(job):
        jobs.append(job)
        return asr(job.audio, job.prompt)

    committed = []
    for _ in range(3):
        policy.insert_audio(np.zeros(16000, dtype=np.float32))
        committed += drive(policy.process_steps(), answer).committed
    assert policy.hypothesis.pending  # the newest words wait for a second hypothesis
    committed += drive(policy.finish_all_steps(), answer)
    return jobs, [w.text.strip() for w in committed]


def test_only_the_last_decode_of_an_utterance_is_marked_final_and_it_decodes_what_is_pending():
    """With the engine searching last decodes harder, the end of an utterance decodes again even when no
    audio arrived since the last decode: its words were never checked by a second hypothesis."""
    jobs, committed = _three_decodes_then_the_end(searched_finals=True)
    assert [job.final for job in jobs] == [False, False, False, True]
    assert committed == [f"w{i}" for i in range(6)]


def test_without_a_harder_search_the_end_of_an_utterance_does_not_redecode_the_same_audio():
    jobs, committed = _three_decodes_then_the_end(searched_finals=False)
    assert len(jobs) == 3  # the pending words are committed as the last decode said them
    assert committed == [f"w{i}" for i in range(6)]


def test_speech_a_decode_skips_after_a_sentence_it_already_said_is_heard_from_a_cut_buffer():
    """Whisper decoding a buffer that opens with a sentence it already said often stops there and
    skips the speech after it. Once a decode has said nothing new 1.5 s past that committed sentence
    end, the buffer is cut there, and the next words are heard and committed before the utterance ends."""
    sentence = [Word(0.2, 0.6, " Painful"), Word(0.6, 0.9, " to"), Word(0.9, 1.4, " myself.")]
    after = [Word(3.0, 3.3, " He"), Word(3.3, 3.8, " began"), Word(3.8, 4.2, " a"), Word(4.2, 4.6, " complaint")]
    policy = LocalAgreementPolicy(trim_seconds=15.0)

    def transcribe(audio: np.ndarray, prompt: str) -> list[Segment]:
        start, end = policy.offset, policy.offset + len(audio) / 16000
        heard = [w for w in (after if start > 1.0 else sentence) if w.end <= end]  # skips `after`
        return [Segment(w.start - start, w.end - start, (w.shifted(-start),)) for w in heard]

    policy.transcribe = transcribe
    committed = []
    for _ in range(7):
        policy.insert_audio(np.zeros(16000, np.float32))
        committed += policy.process().committed
    assert policy.offset >= 1.4  # cut after "myself."
    assert [w.text.strip() for w in committed][:5] == ["Painful", "to", "myself.", "He", "began"]


def test_a_pause_inside_an_utterance_is_decoded_only_while_a_shown_word_waits_for_confirmation():
    """A 4-s pause inside an utterance (the VAD ends utterances after 5 s here): one decode over it
    confirms the words still pending, and none after that, since more silence could change nothing
    the client sees; the words are the same as with a decode every second."""
    from backends.asr_types import TranscribeJob, drive
    from gpu_manager import Device
    from streamserver.live.session import AudioInbox, Session, SessionOptions, answer_directly
    from tests.fakes import fake_loader

    models = fake_loader(Device(0, "cpu", 0, "cpu"))
    direct = answer_directly(models)
    t = np.arange(3 * 16000) / 16000
    speech = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    pause = np.full(4 * 16000, 0.002, np.float32)  # faint: no speech to the VAD, no word to the ASR
    audio = np.concatenate([speech, pause, speech])
    decodes_at: list[float] = []

    def answer(job):
        if isinstance(job, TranscribeJob):
            decodes_at.append(session.inbox.received_seconds)
        return direct(job)

    session = Session(AudioInbox(), models, SessionOptions(utterance_pause_seconds=5.0))
    for at in range(0, len(audio), 1600):
        session.inbox.put(audio[at:at + 1600])
        drive(session.step(), answer)
    state = drive(session.finish(), answer)
    in_pause = [t for t in decodes_at if 3.5 < t <= 7.0]
    assert len(in_pause) == 1, decodes_at
    assert [w.text.strip() for w in state.words] == ["w0", "w1", "w2", "w7", "w8", "w9"]  # one buffer
