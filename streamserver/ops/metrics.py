"""Prometheus metrics: one `Metrics` object per server, on its own registry.

Nothing here is a module global, so several apps in one process (tests) never
share a counter. Figures that already live elsewhere — connections per device
(the allocator), memory and utilisation (the `MemoryMonitor`) — are read at
scrape time by a collector instead of being mirrored into gauges that could
drift. Everything else is recorded through the few verbs below, which the
connection, the device runtime (and later its batching scheduler) call.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from gpu_manager import Allocator, MemoryMonitor

PREFIX = "streamserver_"
STAGES = ("encoder", "decoder", "vad", "diarization")
# Where the process's CPU goes, per device: the live streams' Whisper encoder and decoder, the free
# decode that checks an utterance's ending, the VAD, the diarizer, and file jobs' decodes. What the
# process spends besides (the event loop, audio decoding, JSON) is its CPU time less their sum.
CPU_STAGES = ("encoder", "decoder", "ending_check", "vad", "diarization", "file")
REJECTION_REASONS = ("full", "unauthorized", "origin", "draining")
REALTIME_WINDOW_SECONDS = 60.0

LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LAG_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0)
TURN_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


class RealtimeWindow:
    """Compute seconds and audio seconds per device over a sliding window (thread-safe).

    The device worker adds compute time, connections add processed audio; the
    ratio of the two sums is the realtime factor (below 1: faster than real time).
    """

    def __init__(self, seconds: float = REALTIME_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[int, deque[tuple[float, float, float]]] = {}

    def add(self, gpu_id: int, compute_seconds: float = 0.0, audio_seconds: float = 0.0) -> None:
        now = self.clock()
        with self._lock:
            entries = self._entries.setdefault(gpu_id, deque())
            entries.append((now, compute_seconds, audio_seconds))
            self._prune(entries, now)

    def factor(self, gpu_id: int) -> float:
        with self._lock:
            entries = self._entries.get(gpu_id)
            if not entries:
                return 0.0
            self._prune(entries, self.clock())
            compute = sum(e[1] for e in entries)
            audio = sum(e[2] for e in entries)
        return compute / audio if audio > 0 else 0.0

    def _prune(self, entries: deque, now: float) -> None:
        while entries and entries[0][0] < now - self.seconds:
            entries.popleft()


class _DeviceCollector:
    """Per-device gauges read when Prometheus scrapes: connections, memory, utilisation, realtime factor."""

    def __init__(self, allocator: Allocator, memory: MemoryMonitor, realtime: RealtimeWindow,
                 viewers: Callable[[int], int]) -> None:
        self.allocator = allocator
        self.memory = memory
        self.realtime = realtime
        self.viewers = viewers

    def collect(self) -> Iterable[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=["gpu_id"])

        active = gauge("active_connections", "Live /asr connections on the device")
        held = gauge("held_for_resume", "Slots held for streams whose client dropped and may resume")
        watching = gauge("viewers", "Read-only viewers of the device's streams (they take no slot)")
        slots = gauge("max_connections", "Connection slots of the device (its limit)")
        room = gauge("free_slots", "Connection slots a new stream could take on the device")
        used = gauge("gpu_memory_used_bytes", "Device memory in use (NVML; accounted bytes when simulated)")
        free = gauge("gpu_memory_free_bytes", "Device memory free")
        total = gauge("gpu_memory_total_bytes", "Device memory in all")
        util = gauge("gpu_utilization_ratio", "Device utilisation, 0 to 1 (NVML; 0 when simulated)")
        rtf = gauge("realtime_factor", "Compute seconds per audio second over the last minute")
        for load in self.allocator.loads():
            label = [str(load.device.id)]
            figures = self.memory.figures(load.device)
            active.add_metric(label, load.active)
            held.add_metric(label, load.held)
            watching.add_metric(label, self.viewers(load.device.id))
            slots.add_metric(label, load.limit)
            room.add_metric(label, load.free)
            used.add_metric(label, figures.used_bytes)
            free.add_metric(label, figures.free_bytes)
            total.add_metric(label, figures.total_bytes)
            util.add_metric(label, figures.utilization_percent / 100.0)
            rtf.add_metric(label, self.realtime.factor(load.device.id))
        return [active, held, watching, slots, room, used, free, total, util, rtf]


class _JobCollector:
    """Job counts by status (read from the job store at scrape time) and file throughput."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily(PREFIX + "jobs", "File jobs by status", labels=["status"])
        store = self.metrics._jobs
        for status, n in (store.counts() if store is not None else {}).items():
            jobs.add_metric([status], n)
        rate = GaugeMetricFamily(PREFIX + "file_throughput_ratio",
                                 "File audio seconds transcribed per wall second, over the last minute")
        rate.add_metric([], self.metrics.file_throughput())
        return [jobs, rate]


class Metrics:
    """The server's metrics and the verbs that record them."""

    def __init__(self, allocator: Allocator, memory: MemoryMonitor, realtime: RealtimeWindow | None = None) -> None:
        self.registry = CollectorRegistry()
        self.realtime = realtime or RealtimeWindow()
        r = self.registry
        gpu = ["gpu_id"]
        self.admissions = Counter(PREFIX + "admissions", "Connections admitted", gpu, registry=r)
        self.rejections = Counter(PREFIX + "rejections", "Connections refused before admission", ["reason"],
                                  registry=r)
        self.errors = Counter(PREFIX + "connection_errors", "Connections ended by an error, by close code",
                              ["gpu_id", "code"], registry=r)
        self.loads = Counter(PREFIX + "model_loads", "Model loads completed", gpu, registry=r)
        self.unloads = Counter(PREFIX + "model_unloads", "Model unloads", gpu, registry=r)
        self.load_seconds = Histogram(PREFIX + "model_load_seconds", "Time to load a device's models", gpu,
                                      buckets=LOAD_BUCKETS, registry=r)
        self.batch_size = Histogram(PREFIX + "batch_size", "Streams per inference batch", ["gpu_id", "stage"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram(PREFIX + "queue_wait_seconds", "Wait between submitting work and its start",
                                    ["gpu_id", "stage"], buckets=WAIT_BUCKETS, registry=r)
        self.caption_lag = Histogram(PREFIX + "caption_lag_seconds",
                                     "Wall time from audio arriving to the update that commits its words", gpu,
                                     buckets=LAG_BUCKETS, registry=r)
        self.turn_end = Histogram(PREFIX + "turn_end_seconds",
                                  "Wall time from the arrival of an utterance's end of speech (the VAD's, with its "
                                  "pad) to the update that tells the end with every word (speech_final, completed); "
                                  "the endpointing silence included", gpu, buckets=TURN_BUCKETS, registry=r)
        self.received = Counter(PREFIX + "audio_received_seconds", "Audio received from clients", gpu, registry=r)
        self.processed = Counter(PREFIX + "audio_processed_seconds", "Audio the pipeline has processed", gpu,
                                 registry=r)
        self.file_audio_seconds = Counter(PREFIX + "file_audio_processed_seconds",
                                          "File (job) audio transcribed", gpu, registry=r)
        self.file_device_seconds = Counter(PREFIX + "file_device_seconds",
                                           "Device time spent on file (job) work", gpu, registry=r)
        self.compute_cpu = Counter(PREFIX + "compute_cpu_seconds",
                                   "Process CPU seconds spent in model calls, by stage (all threads of the "
                                   "process while the device's worker ran the call)", ["gpu_id", "stage"], registry=r)
        self._file_window: deque[tuple[float, float]] = deque()  # (time, seconds) of file chunks done
        self._jobs = None
        # Viewers per device: set by the server once it has its viewer registry.
        self.viewers: Callable[[int], int] = lambda gpu_id: 0
        r.register(_DeviceCollector(allocator, memory, self.realtime, lambda gpu_id: self.viewers(gpu_id)))
        r.register(_JobCollector(self))
        for d in allocator.devices:  # every series exists from the start, at zero
            g = str(d.id)
            for family in (self.admissions, self.loads, self.unloads, self.load_seconds, self.caption_lag, self.turn_end,
                           self.received, self.processed, self.file_audio_seconds, self.file_device_seconds):
                family.labels(g)
            for stage in STAGES:
                self.batch_size.labels(g, stage)
                self.queue_wait.labels(g, stage)
            for stage in CPU_STAGES:
                self.compute_cpu.labels(g, stage)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)

    # -- connections --------------------------------------------------------
    def admitted(self, gpu_id: int) -> None:
        self.admissions.labels(str(gpu_id)).inc()

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def connection_error(self, gpu_id: int, code: int) -> None:
        self.errors.labels(str(gpu_id), str(code)).inc()

    def audio_received(self, gpu_id: int, seconds: float) -> None:
        self.received.labels(str(gpu_id)).inc(seconds)

    def audio_processed(self, gpu_id: int, seconds: float) -> None:
        if seconds > 0:
            self.processed.labels(str(gpu_id)).inc(seconds)
            self.realtime.add(gpu_id, audio_seconds=seconds)

    def observe_caption_lag(self, gpu_id: int, seconds: float) -> None:
        self.caption_lag.labels(str(gpu_id)).observe(max(seconds, 0.0))

    def observe_turn_end(self, gpu_id: int, seconds: float) -> None:
        self.turn_end.labels(str(gpu_id)).observe(max(seconds, 0.0))

    # -- device runtime / scheduler -------------------------------------------
    def model_loaded(self, gpu_id: int, seconds: float) -> None:
        self.loads.labels(str(gpu_id)).inc()
        self.load_seconds.labels(str(gpu_id)).observe(seconds)

    def model_unloaded(self, gpu_id: int) -> None:
        self.unloads.labels(str(gpu_id)).inc()

    def observe_batch(self, gpu_id: int, stage: str, size: int, wait_seconds: float) -> None:
        """One batch of `size` streams ran `stage`; its work had waited `wait_seconds` for the device."""
        g = str(gpu_id)
        self.batch_size.labels(g, stage).observe(size)
        self.queue_wait.labels(g, stage).observe(max(wait_seconds, 0.0))

    def spent_cpu(self, gpu_id: int, stage: str, seconds: float) -> None:
        """`seconds` of process CPU went to `stage` (one of `CPU_STAGES`) on the device."""
        if seconds > 0:
            self.compute_cpu.labels(str(gpu_id), stage).inc(seconds)

    def attach_jobs(self, store) -> None:
        self._jobs = store

    def file_audio(self, gpu_id: int, seconds: float) -> None:
        self.file_audio_seconds.labels(str(gpu_id)).inc(seconds)
        self._file_window.append((time.monotonic(), seconds))

    def file_compute(self, gpu_id: int, seconds: float) -> None:
        """Device time a file round took: shows whether files ran while live streams were busy."""
        self.file_device_seconds.labels(str(gpu_id)).inc(seconds)

    def file_throughput(self, window: float = 60.0) -> float:
        now = time.monotonic()
        while self._file_window and self._file_window[0][0] < now - window:
            self._file_window.popleft()
        return sum(s for _, s in self._file_window) / window

    def observe_compute(self, gpu_id: int, seconds: float) -> None:
        """Device time spent on inference (the numerator of the realtime factor)."""
        self.realtime.add(gpu_id, compute_seconds=seconds)

    # -- exposition -------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
