"""A client's cut (Deepgram's `Finalize`, OpenAI's `input_audio_buffer.commit`) ends the utterance where the
audio the client had sent ends, however late the device gets to it.

Pipecat's services and LiveKit's OpenAI plugin cut at each end of speech their own VAD hears; on a busy
device the step that answers runs seconds later, when the next sentence's audio is already in the inbox.
That audio belongs to the next turn: taken in with the cut, it was told in the closing turn, which then
ended on a word cut in half, and the next turn began mid-sentence.
"""
from __future__ import annotations

import numpy as np

from backends.asr_types import drive
from gpu_manager import Device
from streamserver.live.session import AudioInbox, Session, SessionOptions, answer_directly
from tests.fakes import fake_loader


def _speech(seconds: float, amplitude: float) -> np.ndarray:
    """Loud (0.3): `EchoASR` says w0, w1, ...; quiet (0.1): q0, q1, ..."""
    t = np.arange(int(seconds * 16000)) / 16000
    return (amplitude * np.sin(2 * np.pi * 300 * t)).astype(np.float32)


def test_the_inbox_gives_only_what_arrived_before_a_position_and_keeps_the_rest_in_order():
    inbox = AudioInbox()
    for k in range(3):
        inbox.put(np.full(320, k, np.float32))
    first = inbox.take(until=500)
    assert first.size == 500 and inbox.taken_samples == 500 and first[-1] == 1
    inbox.put(np.full(320, 3, np.float32))
    rest = inbox.take()
    assert rest.size == 4 * 320 - 500 and list(np.unique(rest)) == [1, 2, 3] and inbox.taken_samples == 1280
    assert inbox.take(until=100).size == 0  # already past it


def test_a_cut_the_device_answers_late_ends_the_utterance_where_the_client_cut():
    models = fake_loader(Device(0, "cpu", 0, "cpu"))
    answer = answer_directly(models)
    session = Session(AudioInbox(), models, SessionOptions(utterance_pause_seconds=1.0))
    session.inbox.put(_speech(3.2, 0.3))  # 100 VAD windows
    cut_at = session.inbox.received_samples  # the client cuts here...
    session.inbox.put(_speech(3.0, 0.1))  # ...and speaks on before the device's next step
    state = drive(session.cut(cut_at), answer)
    said = [w.text.strip() for w in state.words]
    assert said == ["w0", "w1", "w2"], said
    assert state.cuts == 1 and len(state.speech_ends) == 1 and state.speech_ends[0] <= cut_at / 16000
    assert session.inbox.taken_samples <= cut_at  # what came after the cut waits for the next step
    state = drive(session.finish(), answer)
    assert [w.text.strip() for w in state.words] == ["w0", "w1", "w2", "q0", "q1", "q2"]
    assert len(state.speech_starts) == 2 and state.speech_starts[1] >= state.speech_ends[0]
