"""Benchmark a scan that reads its checkpoint straight from a throttled Hub: bytes, time, memory, disk.

Usage: python bench/stream.py [--bandwidth MB/s] [--link MB/s] [--out-dir DIR] [--keep]
                              [--crawl | --crawl-only] [--crawl-bandwidth MB/s]

One run does everything (bench/README.md "stream.py" has the figures):

1. Generates, in a child process, a Llama-shaped bfloat16 checkpoint of 618 MB (16 layers, 3
   shards) with a super weight planted at layer 2, W[100, 200], unless --out-dir already holds it.
2. Serves it on loopback under Hub-shaped URLs (model info, tree, resolve with HEAD, ETag,
   X-Repo-Commit and Range), each connection held to --bandwidth MB/s (default 50); --link caps all
   connections together. It counts the body bytes and GETs it answers.
3. Runs `superweight scan REPO --revision SHA --json --no-record` in a fresh process with its own
   HF_HOME, TMPDIR and SUPERWEIGHT_HOME, then with --verify, and prints for each: bytes fetched /
   bytes needed (target <= 1.05); the scan's seconds / (bytes fetched / bandwidth) (target <= 1.15,
   with --verify <= 1.3); peak RSS (os.wait4); weight-sized files left in those folders (target 0).
4. With --crawl: 8 small models (27 MB each), at --crawl-bandwidth per connection if given (their
   own server), crawled on a local Ray with 1 and then 2 workers: models per minute and the ratio.
   Each crawl gets a fresh local Ray that preloads the scan worker's modules, as `superweight crawl`
   starts one; the wall time is the crawl() call (vetting, actor starts, scans).
   --crawl-only runs this part alone (the large checkpoint is still generated and served).
Exits 1 if a scan fails or misses the planted weight; the ratios are reported, not enforced.
"""

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("superweight"))
MB = 1_000_000
REPO = "bench/llama-600m"
SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
PLANT = (2, 100, 200)  # layer, row, col
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8)  # bench/crawl.py's models
CHUNK = 1 << 16  # bytes written per throttle step
BURST = 1 << 20  # bytes a connection may send at once after idling
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"


# -- the checkpoint ----------------------------------------------------------------------------

def generate(path: Path, *, small: bool, seed: int) -> None:
    """Write the planted checkpoint (run in a child: it imports torch)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.checkpoints import Plant, build_model, plant

    model = build_model("llama", seed=seed, **(SMALL if small else dict(SHAPE, dtype=torch.bfloat16)))
    plant(model, [Plant(3, 10, 20) if small else Plant(*PLANT)])
    model.save_pretrained(path, max_shard_size="250MB")  # the large one in 3 shards


def ensure_checkpoint(path: Path, *, small: bool = False, seed: int = 0) -> None:
    """Generate the checkpoint at `path` in a child process, unless it is there already."""
    if not (path / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--generate", str(path), "--seed", str(seed)]
                       + (["--small"] if small else []), check=True)


def needed_bytes(folder: Path, token_ids: list[int]) -> int:
    """What a detection scan must read: each file's header, every tensor but the token embedding and the
    LM head, and the embedding rows of the prompt's distinct tokens."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            entries = json.loads(f.read(length))
        total += 8 + length
        for name, entry in entries.items():
            if name not in ("__metadata__", HEAD):
                size = entry["data_offsets"][1] - entry["data_offsets"][0]
                total += len(set(token_ids)) * size // entry["shape"][0] if name == EMBEDDING else size
    return total


# -- the throttled Hub -------------------------------------------------------------------------

@dataclass
class Repo:
    sha: str
    folder: Path

    def files(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.is_file() and not p.name.startswith("."))


@dataclass
class Meter:
    """What the server answered: body bytes, requests (GETs of files), connections busy at once."""

    bytes: int = 0
    requests: int = 0
    busy: int = 0
    most_busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sending(self, change: int, sent: int = 0) -> None:
        """A body starts (+1) or ends (-1, with the bytes it sent)."""
        with self.lock:
            self.requests += change > 0
            self.busy += change
            self.most_busy, self.bytes = max(self.most_busy, self.busy), self.bytes + sent


class Bucket:
    """A token bucket: `take(n)` returns once n bytes fit `rate` bytes a second (with a BURST allowance)."""

    def __init__(self, rate: float):
        self.rate, self.tokens, self.at = rate, float(BURST), time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:  # a shared bucket serves one connection at a time, like a link
            now = time.monotonic()
            self.tokens = min(BURST, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens < n:
                time.sleep((n - self.tokens) / self.rate)
                self.tokens, self.at = float(n), time.monotonic()
            self.tokens -= n


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    repos: dict[str, Repo]
    meter: Meter
    bandwidth: float
    link: Bucket | None

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate writes: with Nagle's algorithm on, the body's first
        # segment waits for the client's delayed ACK of the headers, 40 ms on every request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.bucket = Bucket(self.bandwidth)  # one per connection

    def do_GET(self) -> None:  # noqa: N802
        self._route(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._route(body=False)

    def _route(self, *, body: bool) -> None:
        parts = urllib.parse.urlsplit(self.path).path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and f"{parts[2]}/{parts[3]}" in self.repos:
            repo_id = f"{parts[2]}/{parts[3]}"
            answer = self._info(repo_id) if parts[4] == "revision" else self._tree(repo_id)
            return self._send(200, {"Content-Type": "application/json"}, json.dumps(answer).encode(), body)
        if len(parts) >= 5 and parts[2] == "resolve" and f"{parts[0]}/{parts[1]}" in self.repos:
            repo = self.repos[f"{parts[0]}/{parts[1]}"]
            name = urllib.parse.unquote("/".join(parts[4:]))
            if name in repo.files():
                return self._file(repo, repo.folder / name, body)
        self._send(404, {"X-Error-Code": "EntryNotFound"}, b"not found", body)

    def _info(self, repo_id: str) -> dict:
        repo = self.repos[repo_id]
        return {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False, "gated": False,
                "pipeline_tag": "text-generation", "tags": ["safetensors", "transformers"],
                "siblings": [{"rfilename": name} for name in repo.files()]}

    def _tree(self, repo_id: str) -> list[dict]:
        repo = self.repos[repo_id]
        return [{"type": "file", "path": name, "size": (repo.folder / name).stat().st_size, "oid": _etag(repo, name)}
                for name in repo.files()]

    def _file(self, repo: Repo, path: Path, body: bool) -> None:
        size = path.stat().st_size
        first, last, status = 0, size - 1, 200
        asked = self.headers.get("Range", "")
        if asked.startswith("bytes="):
            start, _, stop = asked[6:].partition("-")
            first, last, status = int(start), min(int(stop) if stop else size - 1, size - 1), 206
        headers = {"ETag": f'"{_etag(repo, path.name)}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes",
                   "Content-Length": str(last + 1 - first)}
        if status == 206:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        self._head(status, headers)
        if body:
            self._stream(path, first, last + 1 - first)

    def _stream(self, path: Path, offset: int, length: int) -> None:
        """Send `length` bytes of `path` from `offset`, no faster than the connection's (and link's) rate."""
        self.meter.sending(+1)
        sent = 0
        try:
            with open(path, "rb", buffering=0) as f:
                while sent < length:
                    chunk = os.pread(f.fileno(), min(CHUNK, length - sent), offset + sent)
                    self.bucket.take(len(chunk))
                    if self.link is not None:
                        self.link.take(len(chunk))
                    self.wfile.write(chunk)
                    sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.meter.sending(-1, sent)

    def _head(self, status: int, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _send(self, status: int, headers: dict, data: bytes, body: bool) -> None:
        self._head(status, {**headers, "Content-Length": str(len(data))})
        if body:
            self.wfile.write(data)


def _etag(repo: Repo, name: str) -> str:
    return hashlib.sha1(f"{repo.sha}/{name}".encode()).hexdigest()


def serve(repos: dict[str, Repo], *, bandwidth: float, link: float | None) -> tuple[ThreadingHTTPServer, Meter]:
    meter = Meter()
    handler = type("Handler", (HubHandler,), {"repos": repos, "meter": meter, "bandwidth": bandwidth,
                                              "link": Bucket(link) if link else None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, meter


def pinned(folder: Path) -> Repo:
    """A repo at a made-up commit sha (from the files' names and sizes)."""
    names = "".join(f"{p.name}:{p.stat().st_size}\n" for p in sorted(folder.iterdir()))
    return Repo(hashlib.sha1(names.encode()).hexdigest(), folder)


# -- measuring ---------------------------------------------------------------------------------

@dataclass
class Run:
    """One scan in a fresh process."""

    result: dict
    wall: float  # spawn to reap, imports included
    peak_rss: int  # bytes, the child's ru_maxrss
    served: int  # body bytes the server sent during it
    requests: int  # file GETs the server answered
    most_busy: int  # connections sending at once, at most
    left_on_disk: int  # bytes of weight-sized files in its HF cache, temp and home folders afterwards


def scan_once(url: str, repo_id: str, repo: Repo, meter: Meter, work: Path, *, verify: bool) -> Run:
    """Scan `repo_id` through the server at `url` with the real CLI, in a child with fresh folders of its own."""
    homes = {"HF_HOME": work / "hf", "TMPDIR": work / "tmp", "SUPERWEIGHT_HOME": work / "home"}
    for folder in homes.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in homes.items()}, "HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_CACHE", None)
    command = [CLI, "scan", repo_id, "--revision", repo.sha, "--json", "--no-record"] + (["--verify"] if verify else [])
    with meter.lock:
        before = (meter.bytes, meter.requests)
        meter.most_busy = 0
    out, err = work / "scan.out", work / "scan.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, cwd=work, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        raise RuntimeError(f"scan failed ({code}): {err.read_text()[-2000:]}")
    with meter.lock:
        served, requests, busy = meter.bytes - before[0], meter.requests - before[1], meter.most_busy
    return Run(json.loads(out.read_text().splitlines()[-1]), wall, usage.ru_maxrss * 1024, served, requests, busy,
               weight_bytes_on_disk(list(homes.values())))


def weight_bytes_on_disk(roots: list[Path]) -> int:
    """Bytes of files that could hold weights under `roots`: any safetensors file, or anything over 1 MB."""
    return sum(p.stat().st_size for root in roots for p in root.rglob("*")
               if p.is_file() and (p.suffix == ".safetensors" or p.stat().st_size > MB))


def mark(value: float, target: float) -> str:
    return f"{value:.2f} (target <= {target}: {'PASS' if value <= target else 'MISS'})"


def report(name: str, run: Run, *, needed: int | None, bandwidth: float, target: float) -> bool:
    """Print one run's figures; True if it found exactly the planted weight."""
    r = run.result
    found = [(w["layer"], w["out_channel"], w["in_channel"]) for w in r["super_weights"]]
    floor = r["bytes_fetched"] / bandwidth
    print(f"{name}: found {found} in {r['forwards']} streamed passes ({r['passes']} fetched); "
          f"{r['bytes_fetched'] / MB:.1f} MB in {r['requests']} requests (server: {run.served / MB:.1f} MB, "
          f"{run.requests} GETs, at most {run.most_busy} connections sending at once)")
    if needed is not None:
        print(f"  bytes fetched / bytes needed ({needed / MB:.1f} MB): {mark(r['bytes_fetched'] / needed, 1.05)}")
    print(f"  scan seconds {r['seconds']:.1f} (process wall {run.wall:.1f}, imports included; compute waited "
          f"{r['wait_seconds']:.1f} s for bytes) / fetched at {bandwidth / MB:.0f} MB/s ({floor:.1f} s): "
          f"{mark(r['seconds'] / floor, target)}")
    print(f"  peak RSS {run.peak_rss / MB:.0f} MB; weight bytes left on disk: {run.left_on_disk} "
          f"({'PASS' if run.left_on_disk == 0 else 'MISS'}); load average {os.getloadavg()[0]:.1f}")
    return found == [PLANT]


def crawl_part(url: str, repos: dict[str, Repo], work: Path) -> None:
    """Crawl the small models with 1 and 2 Ray workers through the throttled server; print models/minute."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from crawl import run  # bench/crawl.py: one timed crawl on a fresh local Ray, as `superweight crawl` has

    rates = {}
    for workers in (1, 2):
        done = run(url, sorted(repos), workers, work / f"crawl-{workers}")
        rates[workers] = done["succeeded"] / done["wall"] * 60
        print(f"crawl, {workers} worker(s): {done['succeeded']}/{len(repos)} models in {done['wall']:.1f} s = "
              f"{rates[workers]:.1f} models/min (every model vetted by {done['vet']:.1f} s)")
    print(f"crawl throughput 2 workers / 1 worker: {rates[2] / rates[1]:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidth", type=float, default=50, help="MB/s per connection")
    parser.add_argument("--link", type=float, default=None, help="MB/s for all connections together")
    parser.add_argument("--out-dir", type=Path, help="generate the checkpoint here (or reuse it); kept")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--crawl", action="store_true", help="also crawl 8 small models with 1 and 2 workers")
    parser.add_argument("--crawl-bandwidth", type=float, help="MB/s per connection for the crawl (default --bandwidth)")
    parser.add_argument("--crawl-only", action="store_true", help="the crawl alone (implies --crawl)")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.crawl |= args.crawl_only
    if args.generate:
        generate(args.generate, small=args.small, seed=args.seed)
        return 0
    work = Path(tempfile.mkdtemp(prefix="superweight-bench-stream-"))
    checkpoint = args.out_dir or work / "checkpoint"
    try:
        ensure_checkpoint(checkpoint)
        repos = {REPO: pinned(checkpoint)}
        if args.crawl:
            for i in range(8):
                ensure_checkpoint(work / f"small-{i}", small=True, seed=i)
                repos[f"bench/small-{i}"] = pinned(work / f"small-{i}")
        bandwidth = args.bandwidth * MB
        server, meter = serve(repos, bandwidth=bandwidth, link=args.link * MB if args.link else None)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        print(f"{checkpoint}: {sum(p.stat().st_size for p in checkpoint.glob('*.safetensors')) / MB:.0f} MB of "
              f"safetensors; served at {args.bandwidth:.0f} MB/s per connection"
              + (f", {args.link:.0f} MB/s in all" if args.link else ""))
        ok = True
        for verify in (() if args.crawl_only else (False, True)):
            run = scan_once(url, REPO, repos[REPO], meter, work / ("verify" if verify else "scan"), verify=verify)
            needed = None if verify else needed_bytes(checkpoint, run.result["tokens"])
            ok &= report("scan + verify" if verify else "scan", run, needed=needed, bandwidth=bandwidth,
                         target=1.3 if verify else 1.15)
        if args.crawl:  # its own server when its bandwidth differs: small models, network-bound at a lower rate
            small = {k: v for k, v in repos.items() if k != REPO}
            rate = (args.crawl_bandwidth or args.bandwidth) * MB
            crawl_server = serve(small, bandwidth=rate, link=None)[0] if args.crawl_bandwidth else server
            print(f"crawl: 8 models served at {rate / MB:.0f} MB/s per connection")
            crawl_part(f"http://127.0.0.1:{crawl_server.server_address[1]}", small, work)
            if crawl_server is not server:
                crawl_server.shutdown()
        server.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
