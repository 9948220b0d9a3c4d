"""Remote shards that survive faults: a real HTTP server on 127.0.0.1 that answers 503, cuts bodies short and resets
connections, with and without range requests; a pipe: command that fails once; retries spent; a training run on
faulty shards gives the samples (and losses) of a fault-free one."""

import json
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from data import DataConfig, Loader
from data.write_shards import write_toy

ROOT = Path(__file__).resolve().parents[1]


class FaultyServer:
    """Serves the .tar files of a folder; ``plan[name]`` lists the faults of that file's 1st, 2nd, … request ("503",
    "cut": the full length announced, half the body sent, connection closed; "reset": a TCP reset mid-body; "ok").
    Range requests are honoured unless ``ranges=False``. Bound to 127.0.0.1; shuts itself down after ``limit`` s."""

    def __init__(self, folder: Path, plan: dict[str, list[str]], ranges: bool = True, limit: float = 120):
        self.requests: dict[str, int] = {}
        self.faults = 0  # faults served (each must cost the reader exactly one retry)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                n = server.requests[name] = server.requests.get(name, 0) + 1
                faults = plan.get(name, [])
                fault = faults[n - 1] if n <= len(faults) else "ok"
                server.faults += fault != "ok"
                if fault == "503":
                    self.send_error(503, "Slow Down")
                    return
                data = (folder / name).read_bytes()
                start = 0
                rng = self.headers.get("Range")
                if ranges and rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "ok":
                    self.wfile.write(body)
                    return
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if fault == "reset":  # SO_LINGER 0: close sends RST
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(limit, self.httpd.shutdown)
        self.timer.daemon = True
        self.timer.start()

    def stop(self):
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("remote") / "shards"
    write_toy(out, count=64, resolution=16, seed=1, max_samples=8)
    return out


def read(spec, steps=10, **kw):
    cfg = DataConfig(shards=spec, num_workers=0, shuffle_buffer=8, resolution=8, streams=2, retry_delay=0.01, **kw)
    loader = Loader(cfg, 8)
    it = iter(loader)
    return [next(it) for _ in range(steps)], loader


PLAN = {"00000.tar": ["503", "cut", "reset"], "00003.tar": ["cut", "cut"], "00005.tar": ["reset", "503"],
        "00007.tar": ["cut"]}


@pytest.mark.parametrize("ranges", [True, False])
def test_faults_are_retried_and_the_samples_are_those_of_a_fault_free_read(shards, ranges):
    """With range requests the read resumes where it broke; without (the server sends the whole body again) the
    bytes already read are skipped: either way the same samples in the same order, retries counted."""
    reference, _ = read(str(shards / "{00000..00007}.tar"))
    server = FaultyServer(shards, PLAN, ranges=ranges)
    try:
        got, loader = read(server.url + "/{00000..00007}.tar")
    finally:
        server.stop()
    assert [b.keys for b in got] == [b.keys for b in reference]
    assert all(torch.equal(a.images, b.images) for a, b in zip(got, reference))
    assert loader.skipped.get("remote_retries") == server.faults >= 6  # every fault served, retried once
    assert "remote_shard_failed" not in loader.skipped and "truncated_tar" not in loader.skipped
    assert server.requests["00000.tar"] >= 4 and server.requests["00007.tar"] >= 2


def test_spent_retries_skip_the_rest_of_the_shard_and_the_run_goes_on(shards):
    """A shard cut halfway whose server then answers 503 to the retries: after data.retries the rest of it is skipped
    and counted (and stays skipped when the server recovers: no sample missing its image or caption), its first half
    and every other shard are read, nothing raises."""
    server = FaultyServer(shards, {"00002.tar": ["cut", "503", "503"]})
    try:
        got, loader = read(server.url + "/{00000..00007}.tar", steps=7, retries=2)
    finally:
        server.stop()
    skipped = loader.skipped
    assert skipped["remote_shard_failed"] == 1 and skipped["remote_retries"] == 2  # cut, 503: retried; 503: given up
    keys = [k for b in got for k, e in zip(b.keys, b.epochs) if e == 0]
    assert len(keys) == len(set(keys)) > 48  # every other shard's samples, once
    shard2 = {k for k in keys if 16 <= int(k) < 24}  # toy keys count up: shard 2 holds 16…23
    assert 0 < len(shard2) < 8  # the samples before the cut came, the rest was skipped
    assert all(b.images.shape[0] == 8 for b in got)
    epoch0_requests = server.requests["00002.tar"]
    assert epoch0_requests in (3, 4)  # the cut, two 503s; (4: epoch 1 began reading it again, fault-free)


def test_a_pipe_command_that_fails_once_is_rerun_and_its_bytes_skipped(shards, tmp_path):
    """A ``pipe:`` that prints half the shard and exits 18 (curl's "transfer closed"), then works: the same samples."""
    script = tmp_path / "flaky.py"
    script.write_text(
        "import os, sys\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "mark = sys.argv[1] + '.failed'\n"
        "if not os.path.exists(mark):\n"
        "    open(mark, 'w').close()\n"
        "    sys.stdout.buffer.write(data[: len(data) // 2]); sys.stdout.flush(); sys.exit(18)\n"
        "sys.stdout.buffer.write(data)\n")
    copies = tmp_path / "copies"
    copies.mkdir()
    for f in sorted(shards.glob("*.tar")):
        (copies / f.name).write_bytes(f.read_bytes())
    urls = [f"pipe:{sys.executable} {script} {copies / f.name}" for f in sorted(shards.glob("*.tar"))]
    reference, _ = read(str(shards / "{00000..00007}.tar"))
    got, loader = read(urls)
    assert [b.keys for b in got] == [b.keys for b in reference]
    assert loader.skipped["remote_retries"] == 8


@pytest.mark.slow
def test_training_on_faulty_remote_shards_equals_a_fault_free_run(shards, tmp_path):
    """The job on http shards that fail (503s, cuts, resets) finishes with the losses of the same job on the local
    files (the same samples, in the same order); the retries are in metrics.jsonl and the log."""
    from pipeline import train

    def run(spec, out):
        train.main(["--config", str(ROOT / "launch/configs/demo.yaml"), "--output-dir", str(out), "--max-steps", "3",
                    f"data.shards={spec}", "data.resolution=16", "data.num_workers=1", "data.shuffle_buffer=8",
                    "data.streams=2", "data.retry_delay=0.01", "optim.batch_size=8", "logging.tracker=none",
                    "logging.every=1", "logging.sample_every=0"])
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    reference = run(str(shards / "{00000..00007}.tar"), tmp_path / "local")
    server = FaultyServer(shards, PLAN)
    try:
        got = run(server.url + "/{00000..00007}.tar", tmp_path / "remote")
    finally:
        server.stop()
    assert [m["loss"] for m in got] == [m["loss"] for m in reference]
    assert got[-1]["skipped/remote_retries"] > 0 and "skipped/remote_retries" not in reference[-1]
