"""Wire format details clients depend on."""
from streamserver.protocols import asr_wire as protocol
from streamserver.live.captions import CaptionState, Line


def test_times_are_whisperlivekit_strings_and_seconds():
    assert protocol.format_time(0.32) == "0:00:00.32"
    assert protocol.format_time(3.1) == "0:00:03.10"
    assert protocol.format_time(3723.456) == "1:02:03.46"
    msg = protocol.update_message(CaptionState(lines=(Line(1, "hi", 0.32, 3.1),), speech_detected=True))
    assert msg["lines"] == [{"speaker": 1, "text": "hi", "start": "0:00:00.32", "end": "0:00:03.10",
                             "start_s": 0.32, "end_s": 3.1}]
    assert msg["status"] == "active_transcription" and msg["buffer_translation"] == ""
    assert set(msg) == {"status", "lines", "buffer_transcription", "buffer_diarization", "buffer_translation",
                        "remaining_time_transcription", "remaining_time_diarization"}


def test_silence_only_is_no_audio_detected():
    assert protocol.update_message(CaptionState())["status"] == "no_audio_detected"


def test_error_and_config_shapes():
    assert protocol.error_message("Audio decode error: x", 1007) == {
        "type": "error", "status": "error", "error": "Audio decode error: x", "code": 1007}
    cfg = protocol.config_message(protocol.ConfigInfo(0, "id", "cpu", "tiny.en", False, "webm"))
    assert cfg["useAudioWorklet"] is False and cfg["sample_rate"] == 16000 and cfg["gpu_id"] == 0
