"""One job queue shared by several servers, on PostgreSQL (a real server the tests start) and on SQLite:
chunks go out by leases, a dead server's chunks are taken over once its lease runs out, a late write
is refused, a job is finished once. The same tests run on both stores."""
from __future__ import annotations

import os
import signal
import threading
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from streamserver.jobs.store import Chunk, JobStore, open_store
from tests.live import start_server_process
from tests.postgres import postgres_bin, postgres_server

STORES = ["sqlite", "postgresql"]


@pytest.fixture(scope="module")
def postgres():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (the test command's apt-get installs it)")
    with postgres_server() as url:
        yield url


@pytest.fixture(params=STORES)
def queue_url(request, tmp_path) -> str:
    """A fresh, empty queue: a SQLite file, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite")
    import psycopg

    base = request.getfixturevalue("postgres")
    name = "q" + os.urandom(6).hex()
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + "/" + name


def _store(url: str, tmp_path: Path, lease: float = 30.0) -> JobStore:
    return open_store(url, tmp_path / "files", lease)


def _cut_job(store: JobStore, tmp_path: Path, chunks: int) -> str:
    upload = tmp_path / f"up{time.monotonic_ns()}.wav"
    upload.write_bytes(b"RIFF")
    job = store.create(upload)
    assert store.claim_step("cutter:1:a").id == job.id
    assert store.set_chunks(job.id, "cutter:1:a", 10.0 * chunks, [(10.0 * i, 10.0 * i + 10) for i in range(chunks)])
    return job.id


def test_servers_claiming_at_the_same_moment_never_get_the_same_chunk(queue_url, tmp_path):
    setup = _store(queue_url, tmp_path)
    job_id = _cut_job(setup, tmp_path, 40)
    taken: list[tuple[str, int]] = []
    lock = threading.Lock()

    def server(n: int) -> None:
        store = _store(queue_url, tmp_path)  # its own connection, as another server would have
        while chunks := store.claim_chunks(f"host:{n}:x", 2):
            with lock:
                taken.extend((c.job_id, c.idx) for c in chunks)
        store.close()

    threads = [threading.Thread(target=server, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == [(job_id, i) for i in range(40)]  # every chunk once, none twice
    setup.close()


def test_a_chunk_whose_server_died_is_taken_over_and_the_late_write_is_refused(queue_url, tmp_path):
    store = _store(queue_url, tmp_path, lease=0.5)
    job_id = _cut_job(store, tmp_path, 2)
    [first] = store.claim_chunks("a:1:x", 1)
    [second] = store.claim_chunks("b:2:y", 5)
    assert second == Chunk(job_id, 1, 10.0, 20.0)  # a holds chunk 0
    time.sleep(0.8)  # a stops renewing (it died): its lease runs out; b, alive, renews its own
    assert store.renew("b:2:y") == 1
    [again] = store.claim_chunks("b:2:y", 5)
    assert (again.idx, again.taken_over) == (0, True)
    assert not store.chunk_done(first, "a:1:x", [{"word": "late", "start": 0, "end": 1}])  # a lost it
    assert store.chunk_done(again, "b:2:y", [{"word": "zero", "start": 0, "end": 1}])
    assert store.chunk_done(second, "b:2:y", [{"word": "one", "start": 10, "end": 11}])
    assert [w["word"] for w in store.words(job_id)] == ["zero", "one"]
    assert store.chunk_owners(job_id) == [(0, "b:2:y", 2), (1, "b:2:y", 1)]
    store.close()


def test_a_live_server_keeps_its_chunks_by_renewing_its_leases(queue_url, tmp_path):
    store = _store(queue_url, tmp_path, lease=0.6)
    job_id = _cut_job(store, tmp_path, 1)
    [chunk] = store.claim_chunks("a:1:x", 1)
    for _ in range(4):  # 1.2 s in all, twice the lease, renewed every 0.3 s
        time.sleep(0.3)
        assert store.renew("a:1:x") == 1
    assert store.claim_chunks("b:2:y", 1) == []
    assert store.chunk_done(chunk, "a:1:x", [])
    assert store.get(job_id).chunks_done == 1
    store.close()


def test_a_job_is_finished_once_by_the_server_that_holds_its_last_step(queue_url, tmp_path):
    store = _store(queue_url, tmp_path)
    job_id = _cut_job(store, tmp_path, 1)
    assert store.claim_step("a:1:x") is None  # not finished before its chunks are in
    [chunk] = store.claim_chunks("a:1:x", 1)
    assert store.chunk_done(chunk, "a:1:x", [{"word": "w", "start": 0, "end": 1}])
    assert store.claim_step("a:1:x").id == job_id
    assert store.claim_step("b:2:y") is None  # a holds the finish
    assert not store.finish(job_id, "b:2:y")
    assert store.finish(job_id, "a:1:x") and not store.finish(job_id, "a:1:x")
    assert store.get(job_id).status == "done"
    store.close()


def test_a_restarted_server_takes_back_the_leases_of_its_killed_self_at_once(queue_url, tmp_path):
    store = _store(queue_url, tmp_path)
    _cut_job(store, tmp_path, 3)
    store.claim_chunks("here:999999999:old", 2)  # a server on this host whose pid is gone
    store.claim_chunks("elsewhere:1:x", 1)  # another host's: only its lease can tell
    assert store.release_dead("here:42:new", lambda owner: not owner.startswith("here:")) == ["here:999999999:old"]
    assert [c.idx for c in store.claim_chunks("here:42:new", 5)] == [0, 1]
    store.close()


# -- two real servers on one queue ------------------------------------------------
def _tone_wav(path: Path, seconds: float) -> None:
    t = np.arange(int(seconds * 16000)) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def _servers(queue_url: str, tmp_path: Path, n: int, seconds_per_chunk: float, lease: float = 30.0):
    argv = ["-m", "tests.fake_server", "--simulate-gpus", "1x16", "--jobs-db", queue_url,
            "--job-lease-seconds", str(lease)]
    env = dict(os.environ, FAKE_ASR_SECONDS=str(seconds_per_chunk))
    out = []
    for i in range(n):
        log = open(tmp_path / f"server{i}.log", "w")
        out.append((*start_server_process(argv, env=env, stdout=log), log))
    return out


def _stop(servers) -> None:
    for proc, _, log in servers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _, log in servers:
        proc.wait(30)
        log.close()


def _wait(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.2)


def _owners_pids(owners) -> set[int]:
    return {int(o.split(":")[1]) for _, o, _ in owners if o}


def test_two_servers_share_one_queue_and_both_take_chunks_of_one_file(queue_url, tmp_path):
    _tone_wav(tmp_path / "long.wav", 180.0)  # 12 to 24 chunks
    servers = _servers(queue_url, tmp_path, 2, 0.3)
    (a, base_a, _), (b, base_b, _) = servers
    store = _store(queue_url, tmp_path / "reader")
    try:
        with open(tmp_path / "long.wav", "rb") as f:
            job_id = httpx.post(f"http://{base_a}/jobs", files={"file": ("long.wav", f)}, timeout=30).json()["id"]
        _wait(lambda: store.get(job_id).status == "done", what="the job done")
        result = httpx.get(f"http://{base_b}/jobs/{job_id}/result", timeout=30).json()  # asked of the other
        owners = store.chunk_owners(job_id)
    finally:
        _stop(servers)
        store.close()
    assert _owners_pids(owners) == {a.pid, b.pid}, owners  # both servers worked on the one file
    assert all(attempts == 1 for _, _, attempts in owners)  # nothing done twice
    starts = [w["start"] for w in result["words"]]
    assert starts == sorted(starts) and len(starts) == len(set(starts)) and 0.9 * 180 <= len(starts) <= 180


def test_kill_9_one_server_mid_chunk_and_the_other_finishes_the_job_with_every_chunk_once(queue_url, tmp_path):
    _tone_wav(tmp_path / "long.wav", 150.0)
    servers = _servers(queue_url, tmp_path, 2, 1.0, lease=2.0)
    (a, base_a, _), (b, base_b, _) = servers
    store = _store(queue_url, tmp_path / "reader")
    try:
        with open(tmp_path / "long.wav", "rb") as f:
            job_id = httpx.post(f"http://{base_b}/jobs", files={"file": ("long.wav", f)}, timeout=30).json()["id"]

        _wait(lambda: _held_by(store, job_id, a.pid) and store.get(job_id).chunks_done >= 1, what="a at work")
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        held = _held_by(store, job_id, a.pid)  # what a held when it died (its rows stay as they were)
        _wait(lambda: store.get(job_id).status == "done", what="b finishing the job")
        owners = store.chunk_owners(job_id)
        result = httpx.get(f"http://{base_b}/jobs/{job_id}/result", timeout=30).json()
    finally:
        _stop(servers)
        store.close()
    assert held, "a held no chunk when it was killed"
    by_idx = {idx: (owner, attempts) for idx, owner, attempts in owners}
    for idx in held:  # each chunk a died holding was done by b, on its second claim
        owner, attempts = by_idx[idx]
        assert int(owner.split(":")[1]) == b.pid and attempts == 2
    assert all(owner for owner, _ in by_idx.values())  # every chunk's words are in, from one server each
    starts = [w["start"] for w in result["words"]]
    assert starts == sorted(starts) and len(starts) == len(set(starts)) and 0.9 * 150 <= len(starts) <= 150
    assert "took over chunk" in (tmp_path / "server1.log").read_text()



def _held_by(store: JobStore, job_id: str, pid: int) -> list[int]:
    """Chunks of the job that `pid`'s server holds, their words not in."""
    return [idx for idx, owner in store.leases(job_id) if int(owner.split(":")[1]) == pid]


def test_a_synchronous_transcription_goes_through_the_shared_queue_and_leaves_nothing_behind(queue_url, tmp_path):
    _tone_wav(tmp_path / "short.wav", 20.0)
    servers = _servers(queue_url, tmp_path, 1, 0.0)
    (_, base, _), = servers
    store = _store(queue_url, tmp_path / "reader")
    try:
        with open(tmp_path / "short.wav", "rb") as f:
            r = httpx.post(f"http://{base}/v1/audio/transcriptions", files={"file": ("short.wav", f)},
                           data={"response_format": "verbose_json", "timestamp_granularities[]": "word"}, timeout=60)
        left = store.list()
    finally:
        _stop(servers)
        store.close()
    assert r.status_code == 200 and 18 <= len(r.json()["words"]) <= 20
    assert left == []  # the job and its audio are gone once answered


def test_a_server_whose_postgresql_cannot_be_reached_stops_with_a_clear_error():
    import subprocess
    import sys

    from tests.live import free_port

    url = f"postgresql://streamserver:secret@127.0.0.1:{free_port()}/jobs"
    done = subprocess.run([sys.executable, "-m", "tests.fake_server", "--simulate-gpus", "1x16", "--jobs-db", url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "streamserver: error: --jobs-db postgresql://streamserver:***@127.0.0.1" in done.stderr
    assert "secret" not in done.stderr + done.stdout
