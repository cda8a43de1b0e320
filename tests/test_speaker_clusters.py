"""Clustering a stream's speaker embeddings, and labels that survive re-clustering."""
from __future__ import annotations

import numpy as np

from backends.speaker_clusters import cluster, stable_labels


def voices(rng, centres: list[np.ndarray], counts: list[int], spread: float = 0.15) -> np.ndarray:
    rows = [c + spread * rng.standard_normal((n, len(c))) for c, n in zip(centres, counts)]
    x = np.concatenate(rows)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_two_voices_are_two_clusters_and_a_few_odd_windows_are_not_a_third():
    rng = np.random.default_rng(0)
    a, b, odd = (rng.standard_normal(64) for _ in range(3))
    x = voices(rng, [a, b, odd], [20, 15, 2])  # two odd windows: laughter, overlap, a door
    labels = cluster(x, threshold=0.4, min_size=5)
    assert len(set(labels[:20])) == 1 and len(set(labels[20:35])) == 1 and labels[0] != labels[20]
    assert set(labels[35:]) <= {labels[0], labels[20]}  # absorbed, not a speaker of their own


def test_windows_of_mostly_pause_join_a_speaker_but_never_make_one():
    """Eight windows that are mostly room noise (a pause inside a turn) sit close together: counted
    among the clusters they are a third speaker; marked unreliable, they join the nearer voice."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(64), rng.standard_normal(64)
    room = 0.6 * a + 0.8 * rng.standard_normal(64)
    x = voices(rng, [a, b, room], [20, 15, 8], spread=0.1)
    assert len(set(cluster(x, threshold=0.4, min_size=5))) == 3
    reliable = np.arange(len(x)) < 35
    labels = cluster(x, threshold=0.4, min_size=5, reliable=reliable)
    assert len(set(labels)) == 2 and labels[0] != labels[20]
    assert set(labels[35:]) == {labels[0]}  # nearer to voice a


def test_the_speaker_count_stays_under_the_cap():
    rng = np.random.default_rng(1)
    x = voices(rng, [rng.standard_normal(64) for _ in range(6)], [8] * 6)
    assert len(set(cluster(x, threshold=0.4, min_size=5, max_speakers=4))) == 4


def test_labels_given_out_stay_with_their_speaker_when_clusters_are_renumbered():
    clusters = np.array([1, 1, 0, 0, 2])  # this clustering calls A "1" and B "0"; a new voice "2"
    given = [0, 0, 1, None, None]  # A was given 0, B 1
    mapping = stable_labels(clusters, given)
    assert mapping[1] == 0 and mapping[0] == 1
    assert mapping[2] == 2  # the lowest label not given out


def test_a_label_never_moves_to_a_second_cluster():
    clusters = np.array([0, 0, 1, 1])  # a voice given label 0 was split in two by more evidence
    mapping = stable_labels(clusters, [0, 0, 0, None])
    assert sorted(mapping.values()) == [0, 1]
