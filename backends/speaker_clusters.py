"""Speakers from speaker embeddings: clustering, and labels that stay put while it is redone.

A stream's speakers firm up as evidence accumulates, so the diarizer clusters all of
a stream's window embeddings again as new ones arrive, instead of deciding each
window once against running centroids (where the first seconds of a voice shape
its centroid for good). Agglomerative clustering with average linkage on cosine
distance, cut at a threshold: the number of speakers comes from the data, up to a cap.
A cluster smaller than `min_size` windows is not a speaker: it is a few windows of
overlap, laughter or noise, and its windows go to the nearest real cluster (so the
count does not grow with every odd window of a long meeting).

Each clustering numbers its clusters afresh; `stable_labels` maps them onto the labels
already given out (the one-to-one mapping with the most windows in common), so a
speaker keeps its label from one clustering to the next.
"""
from __future__ import annotations

import numpy as np

# Windows a cluster needs to be a speaker of its own (5 windows at a 0.4-s hop span 3.2 s of speech).
MIN_SIZE = 5


def cluster(embeddings: np.ndarray, threshold: float, min_size: int = MIN_SIZE,
            max_speakers: int = 8, reliable: np.ndarray | None = None) -> np.ndarray:
    """Cluster index (0..k-1) of each L2-normalised embedding, [n]. Only the `reliable` ones (default:
    all) form the clusters and count towards `min_size`; the others go to the nearest real cluster."""
    from scipy.cluster.hierarchy import fcluster, linkage

    n = len(embeddings)
    if reliable is None or reliable.sum() < 2:
        reliable = np.ones(n, bool)
    if n < 2:
        return np.zeros(n, int)
    core = embeddings[reliable]
    tree = linkage(core.astype(np.float64), "average", metric="cosine")
    labels = fcluster(tree, t=threshold, criterion="distance") - 1
    if labels.max() + 1 > max_speakers:
        labels = fcluster(tree, t=max_speakers, criterion="maxclust") - 1
    sizes = np.bincount(labels)
    real = [c for c in range(len(sizes)) if sizes[c] >= min(min_size, len(core))] or [int(np.argmax(sizes))]
    out = _nearest(embeddings, core, labels, real)
    out[reliable] = np.where(np.isin(labels, real), labels, out[reliable])
    return np.unique(out, return_inverse=True)[1]


def _nearest(embeddings: np.ndarray, core: np.ndarray, labels: np.ndarray, clusters) -> np.ndarray:
    """For each embedding, the one of `clusters` (of `core`'s `labels`) whose centroid is nearest."""
    clusters = np.asarray(list(clusters))
    centroids = np.stack([core[labels == c].mean(0) for c in clusters])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return clusters[np.argmax(embeddings @ centroids.T, axis=1)]


def stable_labels(clusters: np.ndarray, given: list[int | None]) -> dict[int, int]:
    """`clusters[i]`: window i's cluster now; `given[i]`: the label window i already has (None if
    it has none yet). Returns cluster → label: the one-to-one mapping that keeps the most given
    labels; a cluster matching none gets the lowest label not given out yet."""
    from scipy.optimize import linear_sum_assignment

    k = int(clusters.max()) + 1 if len(clusters) else 0
    known = [(int(c), g) for c, g in zip(clusters, given) if g is not None]
    mapping: dict[int, int] = {}
    if known:
        votes = np.zeros((k, max(g for _, g in known) + 1), int)
        for c, g in known:
            votes[c, g] += 1
        rows, cols = linear_sum_assignment(votes, maximize=True)
        mapping = {int(r): int(c) for r, c in zip(rows, cols) if votes[r, c] > 0}
    taken = {g for _, g in known} | set(mapping.values())
    fresh = (label for label in range(k + len(taken) + 1) if label not in taken)
    for c in range(k):
        if c not in mapping:
            mapping[c] = next(fresh)
    return mapping
