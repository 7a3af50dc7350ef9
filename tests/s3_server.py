"""An S3 API on loopback for tests: moto's standalone server (as s3fs's own tests use it), one process per use."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

MOTO = Path(sys.executable).with_name("moto_server")


@contextmanager
def moto_s3(log_dir: Path, bucket: str):
    """Start moto on 127.0.0.1 (a free port), point AWS and fsspec's s3 settings at it (Dask workers and driver
    subprocesses inherit them), make `bucket`, and yield an s3fs filesystem; everything is undone after."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    if not MOTO.exists():
        pytest.skip("moto_server is not installed")
    import s3fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(Path(log_dir) / "moto.log", "w")
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():
        mp.setenv(k, v)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir(bucket)
        yield fs
    finally:
        mp.undo()
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        s3fs.S3FileSystem.clear_instance_cache()
