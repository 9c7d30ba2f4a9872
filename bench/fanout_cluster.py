"""Pub/sub deliveries/s between replicas: one Valkey (RedisBroker) against a 3-shard Valkey
Cluster (ClusterBroker, sharded pub/sub), in the same run.

    .venv/bin/python -m bench.fanout_cluster [--replicas 2] [--channels 256] [--seconds 5]
                                             [--rounds 2] [--batch 64]

Each "replica" is a process with the hub's own broker (server/broker.py), subscribed to
every channel (as when each Hoomi has members on every replica) and publishing 200-byte
payloads round-robin over the channels in batches of `--batch` (the hub's publish loop
sends what queued meanwhile in one pipeline), as fast as the broker takes them, for
`--seconds`. A replica drops its own echo, as the hub does, so each payload is one
delivery per other replica. Reported per mode:
  deliveries/s  payloads handed to the handler by the other replicas, from the start
                until the last one arrived (publishing stops after `--seconds`; the
                backlog is drained and counted, and missing ones are reported)
  node CPU      CPU seconds of each valkey-server process over the round, and the busiest
                node's share: the point of sharding is that no one node carries it all
  node out      bytes each node wrote to its clients and replicas over the round (INFO
                stats total_net_output_bytes), the same split without the CPU noise
Modes alternate for `--rounds` rounds (standalone, cluster, standalone, ...). Servers,
clients and the bench share the machine's cores: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import time
from typing import Any

import redis

from server.broker import ClusterBroker, RedisBroker, hoomi_channel
from server.testing.valkey import Valkey
from server.testing.valkey_cluster import ValkeyCluster

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


async def replica(mode: str, url: str, channels: list[str], start_at: float, seconds: float,
                  batch: int) -> dict[str, Any]:
    broker: ClusterBroker | RedisBroker = (ClusterBroker(url) if mode == "cluster"
                                          else RedisBroker(url))
    got = 0
    last = 0.0

    def handler(channel: str, payload: bytes) -> None:
        nonlocal got, last
        got += 1
        last = time.time()

    async def nothing() -> None:
        return None

    await broker.start(handler, nothing)
    for ch in channels:
        await broker.subscribe(ch)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    payload = os.urandom(200)
    sent = 0
    i = 0
    end = start_at + seconds
    while time.time() < end:
        events = [(channels[(i + k) % len(channels)], payload) for k in range(batch)]
        i += batch
        await broker.publish(events)
        sent += batch
    published_until = time.time()
    return {"broker": broker, "sent": sent, "got": lambda: got, "last": lambda: last,
            "published_until": published_until}


def worker(mode: str, url: str, channels: list[str], start_at: float, seconds: float,
           batch: int, expect: mp.Queue, out: mp.Queue) -> None:
    async def run() -> None:
        r = await replica(mode, url, channels, start_at, seconds, batch)
        out.put(("sent", r["sent"]))
        # Drain: the others' total arrives once they are done publishing.
        want: int = expect.get()
        deadline = time.time() + 30
        while r["got"]() < want and time.time() < deadline:
            await asyncio.sleep(0.01)
        quiet = time.time() + 0.3  # and nothing beyond it (a duplicate would show)
        while time.time() < quiet:
            await asyncio.sleep(0.01)
        await r["broker"].close()
        out.put(("got", r["got"](), r["last"]()))
    asyncio.run(run())


def output_bytes(port: int) -> int:
    with redis.Redis(port=port) as node:
        return int(node.info("stats")["total_net_output_bytes"])


def unbounded_pubsub_buffers(ports: list[int]) -> None:
    """A subscriber slower than the publishers must not be disconnected mid-measure."""
    for port in ports:
        with redis.Redis(port=port) as node:
            node.config_set("client-output-buffer-limit", "pubsub 0 0 0")


def round_(mode: str, url: str, pids: dict[int, int], args: argparse.Namespace
           ) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    channels = [hoomi_channel(os.urandom(16).hex()) for _ in range(args.channels)]
    start_at = time.time() + 3.0  # every replica subscribed by then
    outs = [ctx.Queue() for _ in range(args.replicas)]
    expects = [ctx.Queue() for _ in range(args.replicas)]
    procs = [ctx.Process(target=worker, args=(mode, url, channels, start_at, args.seconds,
                                              args.batch, expects[n], outs[n]))
             for n in range(args.replicas)]
    for p in procs:
        p.start()
    cpu0 = {port: cpu_seconds(pid) for port, pid in pids.items()}
    out0 = {port: output_bytes(port) for port in pids}
    sent = [outs[n].get(timeout=120)[1] for n in range(args.replicas)]
    for n in range(args.replicas):
        expects[n].put(sum(sent) - sent[n])
    got, last = [], []
    for n in range(args.replicas):
        _, g, t = outs[n].get(timeout=120)
        got.append(g)
        last.append(t)
    cpu1 = {port: cpu_seconds(pid) for port, pid in pids.items()}
    out1 = {port: output_bytes(port) for port in pids}
    for p in procs:
        p.join(30)
    expected = sum(sum(sent) - s for s in sent)
    elapsed = max(last) - start_at
    cpu = {port: cpu1[port] - cpu0[port] for port in pids}
    return {"mode": mode, "sent": sum(sent), "delivered": sum(got), "expected": expected,
            "rate": sum(got) / elapsed, "elapsed": elapsed, "cpu": cpu,
            "out": {port: out1[port] - out0[port] for port in pids}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    single = Valkey()
    cluster = ValkeyCluster()
    results = []
    try:
        single.start()
        cluster.start()
        assert single.proc is not None
        unbounded_pubsub_buffers([single.port, *cluster.ports])
        servers = {
            "standalone": (single.url, {single.port: single.proc.pid}),
            "cluster": (cluster.url, {p: pr.pid for p, pr in cluster.procs.items()}),
        }
        for _ in range(args.rounds):
            for mode in ("standalone", "cluster"):
                url, pids = servers[mode]
                results.append(round_(mode, url, pids, args))
        masters = set(cluster.masters())
    finally:
        cluster.stop()
        single.stop()
    print(f"replicas={args.replicas} channels={args.channels} seconds={args.seconds} "
          f"batch={args.batch} payload=200B cores={os.cpu_count()}")
    for r in results:
        cpu = r["cpu"]
        total = sum(cpu.values()) or 1.0
        nodes = " ".join(f"{c:.2f}{'m' if p in masters else ''}"
                         for p, c in sorted(cpu.items(), key=lambda kv: -kv[1]))
        print(f"  {r['mode']:10s} {r['rate']:9.0f} deliveries/s  "
              f"{r['delivered']}/{r['expected']} delivered ({r['sent']} published, "
              f"{r['elapsed']:.2f} s) | node CPU s {nodes} | busiest node "
              f"{100 * max(cpu.values()) / total:.0f} % of {total:.2f} s")
        out = r["out"]
        mib = " ".join(f"{b / 2**20:.1f}{'m' if p in masters else ''}"
                       for p, b in sorted(out.items(), key=lambda kv: -kv[1]))
        print(f"  {'':10s} node out MiB {mib} | busiest node "
              f"{100 * max(out.values()) / (sum(out.values()) or 1):.0f} %")


if __name__ == "__main__":
    main()
