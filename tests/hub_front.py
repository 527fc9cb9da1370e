"""The front of the local Hub for crawl tests: `/api/models` of our own, everything else from olah.

olah has no `/api/models` route (NOTES.md), and a crawl needs one endpoint for both discovery and
downloads. `HubFront` answers `GET /api/models` from the git repos olah serves (newest first, with
the filters huggingface_hub's `list_models` sends) and passes every other request through to olah
unchanged. Tests steer faults through it: hold a request until released (to kill a worker mid-scan),
answer 503 (to exercise retries), or stop serving altogether (the Hub goes away mid-crawl).
"""

import json
import re
import threading
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

    Only whole-file GETs are held: header reads (Range requests, as get_safetensors_metadata makes
    while a crawl vets a model) and HEADs pass.
    """

    pattern: str
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class HubFront:
    upstream: str  # olah's endpoint
    mirrors: Path  # the folder olah serves (models/<org>/<name> git repos)
    gated: set[str] = field(default_factory=set)  # repo ids listed as gated
    holds: list[Hold] = field(default_factory=list)
    fail_next: int = 0  # answer 503 to this many proxied requests matching fail_pattern
    fail_pattern: str = ""  # a regex; "" matches every request
    requests: list[str] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None
    url: str = ""

    def hold(self, pattern: str) -> Hold:
        held = Hold(pattern)
        self.holds.append(held)
        return held

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
        front = self.front
        front.requests.append(self.path)
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/api/models":
            return self._send(200, {"Content-Type": "application/json"},
                              json.dumps(front.listing(urllib.parse.parse_qs(url.query))).encode(), body)
        for held in front.holds:
            if re.search(held.pattern, self.path) and self.command == "GET" and "Range" not in self.headers:
                held.arrived.set()
                held.release.wait(timeout=300)
        if front.stopped.is_set():
            self.close_connection = True  # the server went away: no answer at all
            return
        if front.fail_next > 0 and re.search(front.fail_pattern, self.path):
            front.fail_next -= 1
            return self._send(503, {"Content-Type": "text/plain"}, b"Service Unavailable (test)", body)
        request = urllib.request.Request(front.upstream + self.path, method=self.command, headers={
            k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS})
        try:
            with _OPENER.open(request, timeout=60) as response:
                status, headers, data = response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            status, headers, data = e.code, e.headers, e.read()
        if status == 200 and (match := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))):
            # olah ignores Range (NOTES.md); the Hub honours it, and get_safetensors_metadata relies on it.
            first, last = int(match[1]), int(match[2] or len(data) - 1)
            total, data = len(data), data[first:last + 1]
            status, headers = 206, {**dict(headers.items()), "Content-Range": f"bytes {first}-{first + len(data) - 1}/{total}",
                                    "Content-Length": str(len(data))}
        if status == 200 and (gated := self._gated_info(url.path)):  # olah knows nothing of gating
            data = json.dumps({**json.loads(data), "gated": gated}).encode()
        kept = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
        if not body and headers.get("Content-Length"):  # HEAD: the size of the file, not of our empty body
            kept["Content-Length"] = headers["Content-Length"]
        self._send(status, kept, data, body)

    def _gated_info(self, path: str) -> str | None:
        """ "manual" for model_info of a gated repo (/api/models/ORG/NAME/revision/REV)."""
        parts = path.split("/")
        if len(parts) >= 6 and parts[1:3] == ["api", "models"] and parts[5] == "revision":
            return "manual" if f"{parts[3]}/{parts[4]}" in self.front.gated else None
        return None

    def _send(self, status: int, headers: dict, data: bytes, body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def serve(front: HubFront) -> HubFront:
    """Start `front` on a free loopback port in a daemon thread; sets front.server and front.url."""
    handler = type("Handler", (_Handler,), {"front": front})
    front.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    front.url = f"http://127.0.0.1:{front.server.server_address[1]}"
    threading.Thread(target=front.server.serve_forever, daemon=True).start()
    return front
