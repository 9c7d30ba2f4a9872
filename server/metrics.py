"""Prometheus metrics, on a registry owned by the app (no process globals)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # What an operator's dashboards expect next to the hub's own: process_* (memory,
        # CPU, open and max file descriptors, start time), python_gc_* and python_info.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.connections = Gauge("hoomi_connections", "Open WebSocket connections", registry=r)
        self.feeds = Gauge("hoomi_feeds", "Hoomis this replica is subscribed to", registry=r)
        self.frames_in = Counter("hoomi_frames_in", "Frames received, by type", ["type"],
                                 registry=r)
        self.frames_out = Counter("hoomi_frames_out", "Frames sent, by type", ["type"],
                                  registry=r)
        self.errors = Counter("hoomi_errors", "Error frames and responses, by code", ["code"],
                              registry=r)
        self.closes = Counter("hoomi_closes", "Connections closed by the hub, by close code",
                              ["code"], registry=r)
        self.refused = Counter("hoomi_refused_upgrades",
                               "WebSocket upgrades refused with 503, by reason", ["reason"],
                               registry=r)
        self.aborted = Counter("hoomi_aborted_sockets",
                               "Sockets aborted because their close could not be written and "
                               "answered within HOOMI_CLOSE_TIMEOUT_S", registry=r)
        self.batch_size = Histogram(
            "hoomi_writer_batch_size", "Messages per committed batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.batch_seconds = Histogram(
            "hoomi_writer_batch_seconds", "Time to commit one batch and deliver it",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.ack_seconds = Histogram(
            "hoomi_ack_seconds", "From a send frame read to its ack queued",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=r)
        self.writer_queue = Gauge("hoomi_writer_queue", "Messages waiting for a batch",
                                  registry=r)
        self.writer_queue_bytes = Gauge(
            "hoomi_writer_queue_bytes", "Ciphertext bytes waiting for a batch "
            "(sends get unavailable past HOOMI_WRITER_QUEUE_MB)", registry=r)
        self.gap_fills = Counter("hoomi_gap_fill_messages",
                                 "Messages read from PostgreSQL to fill pub/sub gaps", registry=r)
        # The message archive (HOOMI_ARCHIVE_URL, storage/archive.py).
        self.archived_messages = Counter(
            "hoomi_archived_messages", "Messages this replica moved to archive segments",
            registry=r)
        self.archive_segments = Counter(
            "hoomi_archive_segments", "Archive segments this replica wrote", registry=r)
        self.archive_read_seconds = Histogram(
            "hoomi_archive_read_seconds",
            "Reading and verifying one archive segment on a cache miss (read-through)",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
            registry=r)
        # Scheduled backups (HOOMI_BACKUP_URL): every replica reports the newest verified
        # backup at the destination, whichever replica made it; alert when
        # time() - hoomi_backup_last_success_timestamp_seconds > 2 x the interval.
        self.backup_last_success = Gauge(
            "hoomi_backup_last_success_timestamp_seconds",
            "When the newest verified backup at HOOMI_BACKUP_URL was taken (Unix time)",
            registry=r)
        self.backup_seconds = Gauge("hoomi_backup_duration_seconds",
                                    "How long the last backup this replica made took",
                                    registry=r)
        self.backup_bytes = Gauge("hoomi_backup_size_bytes",
                                  "Size of the last backup this replica made", registry=r)
        self.backups = Counter("hoomi_backups", "Verified backups this replica made",
                               registry=r)
        self.backup_failures = Counter("hoomi_backup_failures",
                                       "Scheduled backups that failed on this replica",
                                       registry=r)

        # Frames in and out are counted for every frame (four per acked message): as
        # plain ints here, added to their Counter children when the metrics are rendered.
        # A child's inc() takes its lock and checks the amount (~0.4 µs); render() runs
        # on the event loop, as the counting does, so nothing is lost in between.
        self._in: dict[type, int] = {}
        self._out: dict[str, int] = {}

    def count_in(self, frame_type: type) -> None:
        """One frame of this class in (frames_in, label: the class's lowercased name)."""
        counts = self._in
        counts[frame_type] = counts.get(frame_type, 0) + 1

    def count_out(self, kind: str) -> None:
        """One frame of this kind queued for a socket (frames_out)."""
        counts = self._out
        counts[kind] = counts.get(kind, 0) + 1

    def _fold(self) -> None:
        counts_in, self._in = self._in, {}
        for frame_type, n in counts_in.items():
            self.frames_in.labels(frame_type.__name__.lower()).inc(n)
        counts_out, self._out = self._out, {}
        for kind, n in counts_out.items():
            self.frames_out.labels(kind).inc(n)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        self._fold()
        return generate_latest(self.registry)
