"""server/metrics.py: frames counted as plain ints reach /metrics as the same counters."""

from __future__ import annotations

from hoomi_protocol import Ping, Send
from server.metrics import Metrics


def test_frame_counts_are_rendered_once_each_and_keep_adding_up():
    m = Metrics()
    for _ in range(3):
        m.count_out("ack")
    m.count_out("message")
    m.count_in(Send)
    first = m.render().decode()
    assert 'hoomi_frames_out_total{type="ack"} 3.0' in first
    assert 'hoomi_frames_out_total{type="message"} 1.0' in first
    assert 'hoomi_frames_in_total{type="send"} 1.0' in first
    m.count_out("ack")
    m.count_in(Ping)
    second = m.render().decode()
    assert 'hoomi_frames_out_total{type="ack"} 4.0' in second  # added once, not again
    assert 'hoomi_frames_out_total{type="message"} 1.0' in second
    assert 'hoomi_frames_in_total{type="ping"} 1.0' in second
