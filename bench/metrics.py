"""Word error rate and percentiles, for the benchmarks and the end-to-end tests."""
from __future__ import annotations

import re

import numpy as np

_WORD = re.compile(r"[a-z0-9']+")


def normalise(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("-", " "))


def wer(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, on normalised words."""
    ref = normalise(reference)
    return edit_distance(ref, normalise(hypothesis)) / max(len(ref), 1)


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word substitutions + deletions + insertions turning `ref` into `hyp`."""
    return int(_edit_table(ref, hyp)[-1, -1])


def reference_heard(ref: list[str], hyp: list[str]) -> list[bool]:
    """For each reference word, whether a minimum-edit alignment gives it a hypothesis word (a match
    or a substitution) rather than deleting it. Ties prefer the substitution, so a misrecognised
    word ("a liner" for "aligner") counts as heard: only words with nothing said for them are not."""
    d = _edit_table(ref, hyp)
    heard = [False] * len(ref)
    i, j = len(ref), len(hyp)
    while i > 0:
        if j > 0 and d[i, j] == d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            heard[i - 1] = True
            i, j = i - 1, j - 1
        elif d[i, j] == d[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return heard


def _edit_table(ref: list[str], hyp: list[str]) -> np.ndarray:
    """d[i, j]: word edits turning ref[:i] into hyp[:j]."""
    n, m = len(ref), len(hyp)
    d = np.zeros((n + 1, m + 1), dtype=np.int32)
    d[:, 0], d[0, :] = np.arange(n + 1), np.arange(m + 1)
    for i in range(1, n + 1):
        prev, cur, r = d[i - 1].tolist(), d[i].tolist(), ref[i - 1]
        for j in range(1, m + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != hyp[j - 1]))
        d[i] = cur
    return d


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def der(reference: list[tuple[float, float, str]], hypothesis: list[tuple[float, float, int]],
        collar: float = 0.25, step: float = 0.01) -> dict[str, float]:
    """Diarization error rate on a `step` grid, ignoring `collar` seconds around each reference
    boundary, with the best one-to-one mapping of hypothesis speakers to reference speakers.

    Returns der, missed, false_alarm, confusion (each a fraction of scored reference speech) and
    scored (seconds of reference speech scored, speakers counted once each: the weight for pooling).
    """
    from scipy.optimize import linear_sum_assignment

    end = max([e for _, e, _ in reference] + [e for _, e, _ in hypothesis] + [0.0])
    n = int(end / step) + 1
    t = (np.arange(n) + 0.5) * step
    scored = np.ones(n, bool)
    for s, e, _ in reference:
        for b in (s, e):
            scored &= np.abs(t - b) > collar
    ref_names = sorted({r for _, _, r in reference})
    hyp_names = sorted({h for _, _, h in hypothesis})
    ref = np.zeros((len(ref_names), n), bool)
    hyp = np.zeros((max(len(hyp_names), 1), n), bool)
    for s, e, r in reference:
        ref[ref_names.index(r), (t >= s) & (t < e)] = True
    for s, e, h in hypothesis:
        hyp[hyp_names.index(h), (t >= s) & (t < e)] = True
    ref, hyp = ref[:, scored], hyp[:, scored]
    n_ref, n_hyp = ref.sum(0), hyp.sum(0)
    total = n_ref.sum()
    missed = np.maximum(n_ref - n_hyp, 0).sum()
    false_alarm = np.maximum(n_hyp - n_ref, 0).sum()
    overlap = ref.astype(np.int64) @ hyp.T.astype(np.int64)  # [ref speakers, hyp speakers]
    rows, cols = linear_sum_assignment(overlap, maximize=True)  # the best one-to-one mapping
    best_correct = overlap[rows, cols].sum()
    confusion = np.minimum(n_ref, n_hyp).sum() - best_correct
    scored_seconds = total * step
    total = max(total, 1)
    return {"der": (missed + false_alarm + confusion) / total, "missed": missed / total,
            "false_alarm": false_alarm / total, "confusion": confusion / total, "scored": scored_seconds}
