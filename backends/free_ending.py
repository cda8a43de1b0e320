"""What a free decode hears after a conditioned decode's last word.

A streaming policy conditions its decodes on text it already committed: LocalAgreement prompts
with it, AlignAtt forces it as a prefix and decodes without timestamp tokens. Conditioned that way,
Whisper sometimes ends its text before the audio ends (a wrong prompt, or a prefix it believes
finished the sentence), and on an utterance's last decode nothing comes after to catch it. A free
decode of the same audio (no prompt, no prefix, timestamps: openai-whisper's `transcribe`) is the
check: where it says the conditioned decode's last word and then goes on, the words after it were
heard and are kept. Only the ending is taken from it; what the conditioned decode said stays, and
where the two do not both say its last word, nothing is added (there is no place to join them).
"""
from __future__ import annotations

from difflib import SequenceMatcher

from .asr_types import Word


def text_keys(text: str) -> list[str]:
    """The comparison keys (case and punctuation removed) of a text's words."""
    return [k for k in (Word(0.0, 0.0, " " + w).key for w in text.split()) if k]


def with_free_ending(prefix: str, words: list[Word], heard: list[Word], prefix_end: float = 0.0) -> list[Word]:
    """`words` (a conditioned decode's new words after its forced `prefix`, which the speaker's words
    before `prefix_end` are) and then the words of `heard` (a free decode of the same audio) after the
    one that is the last said. That last word takes the free decode's spelling when it is one of
    `words`: its punctuation ended a sentence the speaker went on with."""
    said = text_keys(prefix) + [w.key for w in words]
    keyed = [(k, i) for i, k in enumerate(said) if k]  # (key, index in `said`) of the words with one
    spoken = [i for i, w in enumerate(heard) if w.key]
    if not keyed or not spoken:
        return words
    matcher = SequenceMatcher(None, [k for k, _ in keyed], [heard[i].key for i in spoken], autojunk=False)
    last = len(keyed) - 1
    for a, b, size in matcher.get_matching_blocks():
        if a <= last < a + size:
            at = spoken[b + last - a]
            rest = [w for w in heard[at + 1:] if w.text.strip()]
            if not rest:
                return words
            after = words[-1].end if words else prefix_end
            out = list(words)
            mine = keyed[last][1] - (len(said) - len(words))  # the last said word's index in `words`
            if mine >= 0:
                out[mine] = Word(out[mine].start, out[mine].end, heard[at].text)
            return out + [Word(max(w.start, after), max(w.end, after), w.text) for w in rest]
    return words
