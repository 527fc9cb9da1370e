"""A loopback endpoint that accepts Hub commits, for testing uploads for real.

olah serves reads only. `CommitEndpoint` answers the write side of the Hub API that
huggingface_hub's `create_repo` and `create_commit` use (repo creation, README metadata check,
preupload, commit) and turns each commit into a git commit in a repo under `mirrors`, the folder
olah serves, so what was uploaded can be downloaded back through olah. Every request is logged with
its Authorization header; with `token` set, requests without it are answered 401.

Files are always uploaded as regular (base64) blobs: the LFS and Xet paths are huggingface_hub's
own and need the real Hub's storage.
"""

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from tests.hub_server import git

_REPO = r"/api/(?P<type>models|datasets)/(?P<repo>[^/]+/[^/]+)"
_PREUPLOAD = re.compile(_REPO + r"/preupload/(?P<rev>[^/?]+)")
_COMMIT = re.compile(_REPO + r"/commit/(?P<rev>[^/?]+)")


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


@dataclass
class CommitEndpoint:
    """The server's state: where repos live, the token it wants, and what it was asked."""

    mirrors: Path
    token: str | None = None
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def repo(self, repo_type: str, repo_id: str) -> Path:
        return self.mirrors / repo_type / repo_id


class _Handler(BaseHTTPRequestHandler):
    endpoint: CommitEndpoint  # set on the subclass `serve` makes

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        state = self.endpoint
        state.requests.append(Request("POST", self.path, self.headers.get("Authorization")))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if state.token and self.headers.get("Authorization") != f"Bearer {state.token}":
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        path = self.path.split("?", 1)[0]
        with state.lock:
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if match := _PREUPLOAD.fullmatch(path):
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            if match := _COMMIT.fullmatch(path):
                return self._commit(state.repo(match["type"], match["repo"]), match["rev"], body)
        self._json(404, {"error": f"no route {path}"})

    def _create(self, payload: dict) -> None:
        repo_type = (payload.get("type") or "model") + "s"
        repo_id = f"{payload['organization']}/{payload['name']}"
        repo = self.endpoint.repo(repo_type, repo_id)
        if repo.exists():
            return self._json(409, {"error": "You already created this dataset repo", "url": repo_id})
        repo.mkdir(parents=True)
        git(repo, "init", "--quiet", "--initial-branch=main")
        self._json(200, {"url": f"http://{self.headers['Host']}/{repo_type}/{repo_id}"})

    def _validate_yaml(self, payload: dict) -> None:
        match = re.match(r"---\n(.*?)\n---\n", payload["content"], re.S)
        try:
            meta = yaml.safe_load(match[1]) if match else {}
        except yaml.YAMLError as e:
            return self._json(400, {"errors": [{"message": str(e)}]})
        if not isinstance(meta, dict):
            return self._json(400, {"errors": [{"message": "metadata is not a mapping"}]})
        self._json(200, {"errors": [], "warnings": []})

    def _commit(self, repo: Path, revision: str, body: bytes) -> None:
        if not (repo / ".git").is_dir():
            return self._json(404, {"error": "Repository not found"})
        if revision != "main":
            return self._json(400, {"error": "this test endpoint commits to main only"})
        header = None
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file" and item["value"].get("encoding") == "base64":
                target = repo / item["value"]["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(item["value"]["content"]))
            else:
                return self._json(400, {"error": f"unsupported commit operation {item['key']}"})
        git(repo, "add", "--all")
        git(repo, "commit", "--quiet", "--no-verify", "--allow-empty", "-m", header["summary"])
        sha = git(repo, "rev-parse", "HEAD").strip()
        self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{repo.parent.parent.name}/{repo.parent.name}/"
                                      f"{repo.name}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def serve(state: CommitEndpoint) -> tuple[ThreadingHTTPServer, str]:
    """Start serving `state` on a free loopback port in a daemon thread; returns the server and its URL."""
    handler = type("Handler", (_Handler,), {"endpoint": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
