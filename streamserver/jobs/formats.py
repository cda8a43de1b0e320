"""A file's words → the response formats of OpenAI's transcription API: json, text, srt, vtt, verbose_json;
and a diarized job's speaker turns as RTTM.

Words are plain dicts `{"word": " Hello", "start": 0.0, "end": 0.4}` (as stored per
chunk; with `"speaker"` when the job was diarized). Segments are sentences: a
segment ends after . ? or !, before a pause of a second or more, where the
speaker changes, or at 40 words.
"""
from __future__ import annotations

import json

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain",
         "srt": "application/x-subrip", "vtt": "text/vtt", "rttm": "text/plain"}


def segments(words: list[dict]) -> list[dict]:
    out: list[dict] = []
    current: list[dict] = []
    for i, w in enumerate(words):
        current.append(w)
        nxt = words[i + 1] if i + 1 < len(words) else None
        if (nxt is None or w["word"].rstrip().endswith((".", "?", "!")) or nxt["start"] - w["end"] >= 1.0
                or len(current) >= 40 or nxt.get("speaker") != w.get("speaker")):
            seg = {"id": len(out), "start": round(current[0]["start"], 2), "end": round(current[-1]["end"], 2),
                   "text": "".join(x["word"] for x in current).strip()}
            if "speaker" in current[0]:
                seg["speaker"] = current[0]["speaker"]
            out.append(seg)
            current = []
    return out


def render(words: list[dict], fmt: str, duration: float | None = None, language: str | None = None,
           with_words: bool = True, speakers: list[dict] | None = None, name: str = "audio") -> tuple[str, str]:
    """(body, media type) of the transcript in `fmt`. `speakers`: a diarized job's speaker turns
    (`{start, end, speaker}`), in verbose_json as `speakers` and alone as `rttm`."""
    if fmt == "rttm":
        return rttm(speakers or [], name), MEDIA[fmt]
    text = "".join(w["word"] for w in words).strip()
    if fmt == "text":
        return text + "\n", MEDIA[fmt]
    if fmt == "json":
        return json.dumps({"text": text}), MEDIA[fmt]
    segs = segments(words)
    if fmt == "srt":
        blocks = [f"{i + 1}\n{_stamp(s['start'], ',')} --> {_stamp(s['end'], ',')}\n{s['text']}\n" for i, s in enumerate(segs)]
        return "\n".join(blocks), MEDIA[fmt]
    if fmt == "vtt":
        blocks = [f"{_stamp(s['start'], '.')} --> {_stamp(s['end'], '.')}\n{s['text']}\n" for s in segs]
        return "WEBVTT\n\n" + "\n".join(blocks), MEDIA[fmt]
    if fmt == "verbose_json":
        body = {"task": "transcribe", "language": language or "en", "duration": duration, "text": text,
                "segments": segs}
        if speakers is not None:
            body["speakers"] = speakers
        if with_words:
            body["words"] = [{"word": w["word"].strip(), "start": round(w["start"], 2), "end": round(w["end"], 2)}
                             for w in words]
        return json.dumps(body), MEDIA[fmt]
    raise ValueError(f"response_format must be one of {', '.join(FORMATS)}")


def rttm(speakers: list[dict], name: str) -> str:
    """Speaker turns in NIST's RTTM, the format diarization scorers (md-eval, pyannote.metrics) read."""
    return "".join(f"SPEAKER {name} 1 {t['start']:.2f} {t['end'] - t['start']:.2f} <NA> <NA> speaker{t['speaker']} <NA> <NA>\n"
                   for t in speakers if t["end"] > t["start"])


def _stamp(seconds: float, mark: str) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{mark}{ms:03d}"
