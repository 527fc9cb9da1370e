"""The front of the local Hub for crawl tests: `/api/models` of our own, everything else from olah.

olah has no `/api/models` route (NOTES.md), and a crawl needs one endpoint for both discovery and
downloads. `HubFront` answers `GET /api/models` from the git repos olah serves (newest first, with
the filters huggingface_hub's `list_models` sends) and passes every other request through to olah
unchanged. Tests steer faults through it: hold a request until released (to kill a worker mid-scan),
answer 503 (to exercise retries), break range reads the ways networks and servers do (`Fault`), or
stop serving altogether (the Hub goes away mid-crawl). Every answer is logged (`answers`).
"""

import json
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.hub_server import git

_HOP_HEADERS = {"connection", "transfer-encoding", "keep-alive", "host", "content-length"}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # pass redirects through to the client, as a proxy should


_OPENER = urllib.request.build_opener(_NoRedirects)


@dataclass
class Hold:
    """Downloads whose path matches the regex `pattern` wait until `release` is set; `arrived` is set when one does.

    Whole-file GETs and a scan's range reads are held: other range reads (as get_safetensors_metadata
    makes while a crawl vets a model) and HEADs pass.
    """

    pattern: str
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


_PINNED = re.compile(r"/resolve/[0-9a-f]{40}/")  # a file at a commit sha
FAULT_KINDS = ("reset", "whole", "short", "429", "503", "trickle", "bloat", "bloat-chunked")


@dataclass
class Fault:
    """The next `count` GETs whose path matches the regex `path` (and, with `covers`, whose Range holds
    that byte) are answered wrongly; count None: every one of them (a storm).

    Kinds: "reset": the 206 headers and half the body, then a TCP reset; "whole": 200 and the whole
    file (Range ignored); "short": a 206 whose Content-Length and body are half the range asked for;
    "429": Too Many Requests with `Retry-After: retry_after`; "503": Service Unavailable; "trickle": the 206
    headers, then the body a byte every 20 ms (never idle long enough for a read timeout); "bloat": the
    answer (JSON) padded to `padding` bytes with a field of its own, with its Content-Length;
    "bloat-chunked": the same padded answer sent chunked, its size declared nowhere.
    """

    kind: str
    path: str = ""
    count: int | None = 1
    covers: int | None = None
    retry_after: int = 1
    padding: int = 0  # bytes a bloated answer is padded to
    hits: int = 0  # requests answered with this fault so far

    def matches(self, method: str, path: str, range_header: str) -> bool:
        if method != "GET" or not re.search(self.path, path) or (self.count is not None and self.hits >= self.count):
            return False
        if self.covers is None:
            return True
        asked = _range(range_header)
        return asked is not None and asked[0] <= self.covers <= (asked[1] if asked[1] is not None else self.covers)


@dataclass(frozen=True)
class Answer:
    """One answered request: when it arrived (time.monotonic()), what it asked, the status, and the fault if any."""

    at: float
    method: str
    path: str
    range: str
    status: int
    fault: str | None = None


def _range(header: str) -> tuple[int, int | None] | None:
    """(first, last) of a `bytes=FIRST-LAST` Range header (last None when open-ended), else None."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", header)
    return (int(match[1]), int(match[2]) if match[2] else None) if match else None


@dataclass
class HubFront:
    upstream: str  # olah's endpoint
    mirrors: Path  # the folder olah serves (models/<org>/<name> git repos)
    gated: set[str] = field(default_factory=set)  # repo ids listed as gated
    holds: list[Hold] = field(default_factory=list)
    fail_next: int = 0  # answer 503 to this many proxied requests matching fail_pattern
    fail_pattern: str = ""  # a regex; "" matches every request
    requests: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    files: dict[str, tuple] = field(default_factory=dict)  # whole files at pinned commits, by path
    stopped: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None
    url: str = ""

    def hold(self, pattern: str) -> Hold:
        held = Hold(pattern)
        self.holds.append(held)
        return held

    def fault(self, kind: str, path: str = "", *, count: int | None = 1, covers: int | None = None,
              retry_after: int = 1, padding: int = 0) -> Fault:
        """Answer matching GETs wrongly from now on (see Fault); returns it, to read its `hits` after."""
        assert kind in FAULT_KINDS, kind
        fault = Fault(kind, path, count, covers, retry_after, padding)
        with self.lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str, range_header: str) -> Fault | None:
        """The first fault that matches this request, counted as hit (threads answer at once: locked)."""
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path, range_header):
                    fault.hits += 1
                    return fault
        return None

    def pinned_file(self, path: str, fetch) -> tuple[int, object, bytes]:
        """The whole file at `path` (a /resolve/ of a commit sha: it never changes), from `fetch` once.

        olah reads a whole file for every request (about 90 ms for a 1 MB file here); a scan makes
        dozens of range reads of one file.
        """
        with self.lock:
            known = self.files.get(path)
        if known is not None:
            return known
        answer = fetch()
        if answer[0] == 200:
            with self.lock:
                self.files[path] = answer
        return answer

    def stop(self) -> None:
        """Stop answering: close the listening socket; held requests are then dropped unanswered."""
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()
        for held in self.holds:
            held.release.set()

    def listing(self, query: dict[str, list[str]]) -> list[dict]:
        """What the Hub's /api/models answers for `query`, from the git repos."""
        models = []
        for repo in sorted((self.mirrors / "models").glob("*/*")):
            repo_id = f"{repo.parent.name}/{repo.name}"
            files = git(repo, "ls-tree", "-r", "--name-only", "HEAD").split()
            created, modified = git(repo, "log", "--reverse", "--format=%at").split()[0], git(repo, "log", "-1", "--format=%at").strip()
            tags = ["transformers"] + (["safetensors"] if any(f.endswith(".safetensors") for f in files) else [])
            models.append({
                "id": repo_id, "modelId": repo_id, "sha": git(repo, "rev-parse", "HEAD").strip(),
                "createdAt": _iso(created), "lastModified": _iso(modified), "tags": tags,
                "pipeline_tag": "text-generation", "private": False,
                "gated": "manual" if repo_id in self.gated else False,
            })
        wanted = set(query.get("filter", []))
        models = [m for m in models if wanted <= set(m["tags"])
                  and query.get("pipeline_tag", [m["pipeline_tag"]])[0] == m["pipeline_tag"]]
        sort = query.get("sort", ["lastModified"])[0]
        models.sort(key=lambda m: (m.get(sort) or "", m["id"]), reverse=True)
        return models[: int(query.get("limit", [len(models)])[0])]


def _iso(unix: str) -> str:
    return datetime.fromtimestamp(int(unix), UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class _Handler(BaseHTTPRequestHandler):
    front: HubFront
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        self.arrived = time.monotonic()
        front = self.front
        front.requests.append(self.path)
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/api/models":
            return self._send(200, {"Content-Type": "application/json"},
                              json.dumps(front.listing(urllib.parse.parse_qs(url.query))).encode(), body)
        for held in front.holds:
            if re.search(held.pattern, self.path) and self.command == "GET" and not self._reads_a_header():
                held.arrived.set()
                held.release.wait(timeout=300)
        if front.stopped.is_set():
            self.close_connection = True  # the server went away: no answer at all
            return
        if front.fail_next > 0 and re.search(front.fail_pattern, self.path):
            front.fail_next -= 1
            return self._send(503, {"Content-Type": "text/plain"}, b"Service Unavailable (test)", body)
        fault = front.take_fault(self.command, self.path, self.headers.get("Range", ""))
        if fault is not None and fault.kind in ("429", "503"):
            extra = {"Retry-After": str(fault.retry_after)} if fault.kind == "429" else {}
            return self._send(int(fault.kind), {"Content-Type": "text/plain", **extra}, b"(test)", body, fault)
        status, headers, data = self._proxy(forward_range=fault is None or fault.kind != "whole")
        if status == 200 and (gated := self._gated_info(url.path)):  # olah knows nothing of gating
            data = json.dumps({**json.loads(data), "gated": gated}).encode()
        kept = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
        if not body and headers.get("Content-Length"):  # HEAD: the size of the file, not of our empty body
            kept["Content-Length"] = headers["Content-Length"]
        if fault is not None and status == 206 and fault.kind == "short":
            data = data[: len(data) // 2]  # a complete answer, with fewer bytes than its Content-Range says
            kept["Content-Length"] = str(len(data))
        if fault is not None and status == 206 and fault.kind == "reset":
            return self._reset(status, kept, data, fault)
        if fault is not None and status == 206 and fault.kind == "trickle":
            return self._trickle(status, kept, data, fault)
        if fault is not None and status == 200 and fault.kind.startswith("bloat"):
            data = json.dumps({**json.loads(data), "padding": "x" * fault.padding}).encode()
            if fault.kind == "bloat-chunked":
                return self._chunked(status, kept, data, fault)
        self._send(status, kept, data, body, fault)

    def _proxy(self, *, forward_range: bool) -> tuple[int, object, bytes]:
        """olah's answer to this request, as the Hub gives it: a Range honoured with a 206 (unless not
        `forward_range`: then the Range is dropped and the whole file comes back with a 200)."""
        asked = _range(self.headers.get("Range", ""))
        if self.command == "GET" and asked is not None and _PINNED.search(self.path):
            status, headers, data = self.front.pinned_file(self.path, self._upstream)
        else:
            status, headers, data = self._upstream(keep_range=forward_range)
        if status == 200 and asked is not None and forward_range:
            # olah ignores Range (NOTES.md); the Hub honours it, and get_safetensors_metadata relies on it.
            first, last = asked[0], asked[1] if asked[1] is not None else len(data) - 1
            total, data = len(data), data[first:last + 1]
            status, headers = 206, {**dict(headers.items()), "Content-Range": f"bytes {first}-{first + len(data) - 1}/{total}",
                                    "Content-Length": str(len(data))}
        return status, headers, data

    def _upstream(self, *, keep_range: bool = False) -> tuple[int, object, bytes]:
        """Pass this request on to olah (without its Range unless `keep_range`); its status, headers and body."""
        skip = _HOP_HEADERS if keep_range else _HOP_HEADERS | {"range"}
        request = urllib.request.Request(self.front.upstream + self.path, method=self.command,
                                         headers={k: v for k, v in self.headers.items() if k.lower() not in skip})
        try:
            with _OPENER.open(request, timeout=60) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def _reset(self, status: int, headers: dict, data: bytes, fault: Fault) -> None:
        """Send the headers and half the body, then reset the connection (SO_LINGER 0: an RST, not a FIN)."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True
        self._log(status, fault)

    def _trickle(self, status: int, headers: dict, data: bytes, fault: Fault) -> None:
        """The headers, then the body a byte every 20 ms until it is sent or the client hangs up."""
        self._log(status, fault)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        stop = threading.Event()
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                stop.wait(0.02)  # the pace of the trickle, on the server's side
        except OSError:  # the client gave up on us
            pass
        self.close_connection = True

    def _chunked(self, status: int, headers: dict, data: bytes, fault: Fault) -> None:
        """`data` in chunked transfer encoding: no Content-Length says how much will come."""
        self._log(status, fault)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(0, len(data), 1 << 16):
                piece = data[i:i + (1 << 16)]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client stopped reading: what the bound is for
            pass
        self.close_connection = True

    def _reads_a_header(self) -> bool:
        """A ranged GET that is not a scan's (vetting's get_safetensors_metadata reading a header).

        A scan's range reads say so in their User-Agent (scanner.fetch.HubFile: `superweight/VERSION`).
        """
        return "Range" in self.headers and "superweight/" not in self.headers.get("User-Agent", "")

    def _gated_info(self, path: str) -> str | None:
        """ "manual" for model_info of a gated repo (/api/models/ORG/NAME/revision/REV)."""
        parts = path.split("/")
        if len(parts) >= 6 and parts[1:3] == ["api", "models"] and parts[5] == "revision":
            return "manual" if f"{parts[3]}/{parts[4]}" in self.front.gated else None
        return None

    def _log(self, status: int, fault: Fault | None) -> None:
        answer = Answer(self.arrived, self.command, self.path, self.headers.get("Range", ""), status,
                        fault.kind if fault else None)
        with self.front.lock:
            self.front.answers.append(answer)

    def _send(self, status: int, headers: dict, data: bytes, body: bool, fault: Fault | None = None) -> None:
        self._log(status, fault)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client read the headers and hung up (a bound)
                self.close_connection = True


def serve(front: HubFront) -> HubFront:
    """Start `front` on a free loopback port in a daemon thread; sets front.server and front.url."""
    handler = type("Handler", (_Handler,), {"front": front})
    front.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    front.url = f"http://127.0.0.1:{front.server.server_address[1]}"
    threading.Thread(target=front.server.serve_forever, daemon=True).start()
    return front
