"""A local, standard-library-only fake of the Hugging Face Hub and ModelScope hub.

The real download clients (``huggingface_hub.snapshot_download`` and
``modelscope.snapshot_download``) talk plain HTTP to this server, so tests
exercise the genuine client code paths (cache layout, refs, ETags, resume,
error mapping) without network access and without mocking anything.

Only the endpoints those two clients need for *downloads* are implemented.

Hugging Face side (huggingface_hub 2.x), selected with ``HF_ENDPOINT``:

* ``GET /api/{models|datasets}/{repo_id}[/revision/{rev}]``   repo info (``sha``, ``siblings``)
* ``GET /api/{models|datasets}/{repo_id}/tree/{rev}[/{path}]``  file listing (``?recursive=``)
* ``HEAD|GET /[datasets/]{repo_id}/resolve/{rev}/{filename}``   file metadata / content

ModelScope side (modelscope 1.40 / modelscope-hub 0.5 "legacy" ``/api/v1`` API),
selected with ``MODELSCOPE_ENDPOINT``:

* ``GET /api/v1/models/{owner}/{name}``                     model info
* ``GET /api/v1/models/{owner}/{name}/revisions``           branches and tags
* ``GET /api/v1/models/{owner}/{name}/repo/files``          file listing (``Revision``, ``Recursive``, ``Root``)
* ``HEAD|GET /api/v1/models/{owner}/{name}/repo``           file content (``Revision``, ``FilePath``)
* ``GET /api/v1/repos/internalAccelerationInfo``            region probe, answered 404

Usage::

    with HubServer() as hub:
        sha = hub.add_repo("org/tiny", {"config.json": b"{}"})
        # HF_ENDPOINT=hub.url / MODELSCOPE_ENDPOINT=hub.url, then call the real clients.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import pathlib
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer"]

FileSource = pathlib.Path | bytes | str

# Files stored through git-lfs on a real Hub repo (the default `.gitattributes`
# of a new HF model repo), plus anything big. For those the Hub announces the
# sha256 as ETag, so the client names the cached blob after the sha256; keeping
# that behaviour makes the cache layout identical to a real download.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".gguf", ".msgpack", ".model")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
DEFAULT_BRANCH = "main"  # HF default branch; also the fallback for ModelScope's "master"
MODELSCOPE_DEFAULT_BRANCH = "master"
CHUNK_SIZE = 1024 * 1024
COMMIT_SHA_RE = re.compile(r"[0-9a-f]{40}")
HF_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


# ---------------------------------------------------------------------------
# Repository model
# ---------------------------------------------------------------------------
def _git_blob_oid(size: int, chunks: Iterator[bytes]) -> str:
    """The id git gives a blob: sha1 over "blob <size>\\0" + content (what HF reports as `oid`)."""
    digest = hashlib.sha1(b"blob %d\x00" % size)
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class HubFile:
    """One file of a commit. Content stays on disk for `Path` sources (model weights can be big)."""

    path: str
    source: bytes | pathlib.Path
    size: int
    sha256: str
    git_oid: str  # blob id of the content, or of the LFS pointer file for LFS files
    lfs: bool

    @classmethod
    def create(cls, path: str, source: FileSource) -> HubFile:
        if isinstance(source, str):
            source = source.encode()
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        sha256 = hashlib.sha256()
        for chunk in _read_chunks(source, 0, size):
            sha256.update(chunk)
        lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD
        if lfs:
            pointer = _lfs_pointer(sha256.hexdigest(), size)
            git_oid = _git_blob_oid(len(pointer), iter([pointer]))
        else:
            git_oid = _git_blob_oid(size, _read_chunks(source, 0, size))
        return cls(path, source, size, sha256.hexdigest(), git_oid, lfs)

    @property
    def etag(self) -> str:
        # HF uses the sha256 as ETag for LFS files and the git blob id otherwise.
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))

    def read(self, start: int, end: int) -> Iterator[bytes]:
        """Content bytes [start, end)."""
        return _read_chunks(self.source, start, end)


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _read_chunks(source: bytes | pathlib.Path, start: int, end: int) -> Iterator[bytes]:
    if isinstance(source, bytes):
        for offset in range(start, end, CHUNK_SIZE):
            yield source[offset : min(offset + CHUNK_SIZE, end)]
        return
    with source.open("rb") as fh:
        fh.seek(start)
        remaining = end - start
        while remaining > 0:
            chunk = fh.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


@dataclass
class Commit:
    sha: str
    files: dict[str, HubFile]
    created_at: float = field(default_factory=time.time)

    def directories(self) -> list[str]:
        """All directories that contain files (git has no empty directories)."""
        dirs = {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}
        return sorted(dirs)


@dataclass
class Repo:
    repo_type: str  # "model" | "dataset" | "space"
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """Branch, then tag, then full commit sha (the order git uses for refs)."""
        sha = self.branches.get(revision) or self.tags.get(revision) or revision
        return self.commits.get(sha)

    @property
    def owner_and_name(self) -> tuple[str, str]:
        owner, _, name = self.repo_id.rpartition("/")
        return owner, name


# ---------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------
class HttpError(Exception):
    """Raised by route handlers; rendered by the Hub flavour of the route (HF or ModelScope)."""

    def __init__(self, status: int, message: str, hf_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.hf_code = hf_code  # value of HF's X-Error-Code header, which the HF client maps to exceptions
        self.headers = headers or {}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]
    params: dict[str, str]  # named groups of the route regex, url-decoded


@dataclass
class Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Iterator[bytes] = b""
    length: int | None = None  # required when body is an iterator


def _json_response(payload: object, status: int = 200, headers: dict | None = None) -> Response:
    body = json.dumps(payload).encode()
    return Response(status, {"Content-Type": "application/json", **(headers or {})}, body)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return [start, end) for a single `bytes=` range, None when absent. Raises 416 when unsatisfiable."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes=") :].strip().partition("-")
    if first == "":  # suffix range: last N bytes
        start, end = max(size - int(last), 0), size
    else:
        start, end = int(first), (min(int(last) + 1, size) if last else size)
    if start >= size or start >= end:
        raise HttpError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _file_response(hub_file: HubFile, range_header: str | None, headers: dict[str, str]) -> Response:
    """200 with the whole file, or 206 for a Range request (both clients resume partial downloads)."""
    headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
    span = _parse_range(range_header, hub_file.size)
    if span is None:
        return Response(200, headers, hub_file.read(0, hub_file.size), hub_file.size)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{hub_file.size}"
    return Response(206, headers, hub_file.read(start, end), end - start)


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------
class HubServer:
    """Serves in-memory repos to the real huggingface_hub and modelscope clients.

    Binds a free port on 127.0.0.1 at construction (so `url` is known before
    `__enter__`); `__enter__` starts serving in a daemon thread, `__exit__` stops.
    """

    def __init__(self, require_token: str | None = None) -> None:
        self.require_token = require_token
        self.requests: list[str] = []  # raw request paths (with query), in arrival order
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.Lock()
        self._httpd = _ThreadingHubHTTPServer(("127.0.0.1", 0), _HubRequestHandler, self)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None
        self._routes = self._build_routes()

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> HubServer:
        # A short poll interval keeps `shutdown()` (and so each test's teardown) fast.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- content -----------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, FileSource],
        revision: str = DEFAULT_BRANCH,
        tags: list[str] | tuple[str, ...] = (),
        repo_type: str = "model",
    ) -> str:
        """Add a commit holding exactly `files`; point branch `revision` and every tag at it.

        If `revision` is itself a 40-hex sha, that becomes the commit id and no
        branch is created. Returns the commit sha.
        """
        hub_files = {path.strip("/"): HubFile.create(path.strip("/"), src) for path, src in files.items()}
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id))
            if COMMIT_SHA_RE.fullmatch(revision):
                sha = revision
            else:
                # Deterministic but unique per add_repo call, like a git commit on top of history.
                seed = f"{repo_type}/{repo_id}#{len(repo.commits)}:" + ",".join(
                    f"{p}={f.git_oid}" for p, f in sorted(hub_files.items())
                )
                sha = hashlib.sha1(seed.encode()).hexdigest()
                repo.branches[revision] = sha
            repo.commits[sha] = Commit(sha, hub_files)
            for tag in tags:
                repo.tags[tag] = sha
        return sha

    def add_dir(
        self,
        repo_id: str,
        path: pathlib.Path,
        revision: str = DEFAULT_BRANCH,
        tags: list[str] | tuple[str, ...] = (),
        repo_type: str = "model",
    ) -> str:
        """Add every file under `path` (recursively, `.git/` excluded) as one commit."""
        root = pathlib.Path(path)
        files = {
            p.relative_to(root).as_posix(): p
            for p in sorted(root.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(root).parts
        }
        return self.add_repo(repo_id, files, revision=revision, tags=tags, repo_type=repo_type)

    def _repo(self, repo_type: str, repo_id: str) -> Repo | None:
        with self._lock:
            return self._repos.get((repo_type, repo_id))

    # -- routing -------------------------------------------------------------
    def _build_routes(self) -> list[tuple[str, re.Pattern[str], Callable[[Request], Response]]]:
        """(flavour, path regex, handler). First match wins, so specific routes come first.

        Regexes run on the still-percent-encoded path: HF encodes `/` inside a
        revision (`refs%2Fpr%2F1`) but not inside a filename.
        """
        hf_api = rf"/api/(?P<type>{'|'.join(HF_REPO_TYPES)})/(?P<repo>.+?)"  # repo ids may lack a namespace
        hf_prefix = r"/(?:(?P<type>datasets|spaces)/)?"  # file URLs of models have no type prefix
        ms_repo = r"(?P<repo>[^/]+/[^/]+)"
        routes: list[tuple[str, str, Callable[[Request], Response]]] = [
            ("ms", r"/api/v1/repos/internalAccelerationInfo", self._ms_region_probe),
            ("ms", rf"/api/v1/models/{ms_repo}/repo/files", self._ms_list_files),
            ("ms", rf"/api/v1/models/{ms_repo}/repo", self._ms_download),
            ("ms", rf"/api/v1/models/{ms_repo}/revisions", self._ms_revisions),
            ("ms", rf"/api/v1/models/{ms_repo}", self._ms_model_info),
            ("hf", rf"{hf_api}/revision/(?P<rev>[^/]+)", self._hf_repo_info),
            ("hf", rf"{hf_api}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._hf_tree),
            ("hf", hf_api, self._hf_repo_info),  # no revision: default branch
            ("hf", rf"{hf_prefix}(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._hf_resolve),
        ]
        return [(flavour, re.compile(pattern), handler) for flavour, pattern, handler in routes]

    def handle(self, method: str, raw_path: str, headers: Mapping[str, str]) -> Response:
        """Entry point used by the request handler: record, authenticate, route, render errors."""
        self.requests.append(raw_path)
        url = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        for flavour, pattern, handler in self._routes:
            match = pattern.fullmatch(url.path)
            if match is None:
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            try:
                self._check_token(headers)
                return handler(Request(method, url.path, query, headers, params))
            except HttpError as error:
                return self._render_error(flavour, error)
        return self._render_error("hf", HttpError(404, f"No route for {url.path}"))

    # -- auth ----------------------------------------------------------------
    def _check_token(self, headers: Mapping[str, str]) -> None:
        """Both clients send `Authorization: Bearer <token>`; ModelScope also sends an m_session_id cookie."""
        if self.require_token is None:
            return
        auth = headers.get("Authorization") or ""
        cookie = headers.get("Cookie") or ""
        if auth == f"Bearer {self.require_token}" or f"m_session_id={self.require_token}" in cookie:
            return
        if auth:
            # Exact message: the HF client then raises a plain 401 HfHubHTTPError, not RepositoryNotFoundError.
            raise HttpError(401, "Invalid credentials in Authorization header")
        # Like the real Hub for a private repo without credentials: 401 + RepoNotFound.
        raise HttpError(401, "Invalid username or password.", hf_code="RepoNotFound")

    @staticmethod
    def _render_error(flavour: str, error: HttpError) -> Response:
        if flavour == "hf":
            # The HF client picks its exception class from X-Error-Code / X-Error-Message.
            # Header values must be latin-1; revision names in messages may not be.
            headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode(), **error.headers}
            if error.hf_code:
                headers["X-Error-Code"] = error.hf_code
            return _json_response({"error": error.message}, error.status, headers)
        # ModelScope maps the HTTP status (404 -> NotExistError, 401 -> AuthenticationError).
        # A numeric "Code" outside its business-code table keeps that mapping.
        body = {"Code": error.status, "Message": error.message, "Success": False, "RequestId": uuid.uuid4().hex}
        return _json_response(body, error.status, error.headers)

    # -- shared lookups ------------------------------------------------------
    def _lookup(self, repo_type: str, repo_id: str, revision: str) -> tuple[Repo, Commit]:
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            raise HttpError(404, "Repository not found", hf_code="RepoNotFound")
        commit = repo.resolve(revision)
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {revision}", hf_code="RevisionNotFound")
        return repo, commit

    # -- Hugging Face routes -------------------------------------------------
    def _hf_repo_info(self, req: Request) -> Response:
        """`HfApi.repo_info`: snapshot_download only needs `sha`; siblings make `model_info` useful too."""
        repo_type = HF_REPO_TYPES[req.params["type"]]
        repo, commit = self._lookup(repo_type, req.params["repo"], req.params.get("rev", DEFAULT_BRANCH))
        with_blobs = req.query.get("blobs", "").lower() == "true"  # files_metadata=True
        siblings = []
        for f in commit.files.values():
            sibling: dict[str, object] = {"rfilename": f.path}
            if with_blobs:
                sibling.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}
            siblings.append(sibling)
        return _json_response(
            {
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.owner_and_name[0] or None,
                "sha": commit.sha,
                "lastModified": _iso(commit.created_at),
                "createdAt": _iso(min(c.created_at for c in repo.commits.values())),
                "private": self.require_token is not None,
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _hf_tree(self, req: Request) -> Response:
        """`HfApi.list_repo_tree`: one page (no `Link: next` header), dirs as "directory" entries."""
        repo_type = HF_REPO_TYPES[req.params["type"]]
        _, commit = self._lookup(repo_type, req.params["repo"], req.params["rev"])
        base = req.params.get("path", "").strip("/")
        recursive = req.query.get("recursive", "").lower() == "true"
        if base and base not in commit.directories():
            raise HttpError(404, f"Entry not found: {base}", hf_code="EntryNotFound")

        def wanted(path: str) -> bool:
            if base and not path.startswith(base + "/"):
                return False
            rest = path[len(base) + 1 :] if base else path
            return recursive or "/" not in rest

        entries: list[dict[str, object]] = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in commit.directories()
            if wanted(d)
        ]
        for f in commit.files.values():
            if wanted(f.path):
                entry: dict[str, object] = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
                entries.append(entry)
        return _json_response(entries)

    def _hf_resolve(self, req: Request) -> Response:
        """HEAD gives hf_hub_download its metadata (commit, ETag, size); GET streams the file.

        The real Hub answers LFS files with a 302 to a CDN; we serve them directly but
        keep the headers the client reads from that 302 (X-Linked-Etag / X-Linked-Size).
        """
        repo_type = HF_REPO_TYPES.get(req.params.get("type", "models"), "model")
        _, commit = self._lookup(repo_type, req.params["repo"], req.params["rev"])
        hub_file = commit.files.get(req.params["file"])
        if hub_file is None:
            # X-Repo-Commit lets the client cache the file's absence under `.no_exist/<sha>/`.
            raise HttpError(404, "Entry not found", hf_code="EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{hub_file.etag}"'}
        if hub_file.lfs:
            headers.update({"X-Linked-Etag": f'"{hub_file.sha256}"', "X-Linked-Size": str(hub_file.size)})
        return _file_response(hub_file, req.headers.get("Range"), headers)

    # -- ModelScope routes ---------------------------------------------------
    def _ms_commit(self, repo_id: str, revision: str | None) -> tuple[Repo, Commit]:
        """ModelScope defaults to "master"; fall back to HF's "main" so one add_repo serves both clients."""
        revision = revision or MODELSCOPE_DEFAULT_BRANCH
        repo = self._repo("model", repo_id)
        if repo is not None and repo.resolve(revision) is None and revision == MODELSCOPE_DEFAULT_BRANCH:
            revision = DEFAULT_BRANCH
        return self._lookup("model", repo_id, revision)

    @staticmethod
    def _ms_ok(data: object) -> Response:
        """The legacy /api/v1 envelope: the client unwraps `Data`."""
        return _json_response(
            {"Code": 200, "Data": data, "Message": "success", "Success": True, "RequestId": uuid.uuid4().hex}
        )

    def _ms_region_probe(self, req: Request) -> Response:
        # Asked with a 0.2 s timeout to detect Aliyun intranet acceleration; 404 means "not in a cloud region".
        raise HttpError(404, "Not an internal network")

    def _ms_model_info(self, req: Request) -> Response:
        repo, commit = self._ms_commit(req.params["repo"], req.query.get("Revision"))
        owner, name = repo.owner_and_name
        return self._ms_ok(
            {
                "Id": int(hashlib.sha1(repo.repo_id.encode()).hexdigest()[:8], 16),
                "Name": name,
                "Path": owner,
                "ChineseName": "",
                "Revision": commit.sha,
                "CreatedTime": int(commit.created_at),
                "LastUpdatedTime": int(commit.created_at),
                "Visibility": 1 if self.require_token else 5,
            }
        )

    def _ms_revisions(self, req: Request) -> Response:
        repo, _ = self._ms_commit(req.params["repo"], None)

        def describe(refs: dict[str, str]) -> list[dict[str, object]]:
            return [
                {"Revision": name, "CommitId": sha, "CreatedAt": int(repo.commits[sha].created_at), "Message": ""}
                for name, sha in refs.items()
            ]

        return self._ms_ok({"RevisionMap": {"Branches": describe(repo.branches), "Tags": describe(repo.tags)}})

    def _ms_list_files(self, req: Request) -> Response:
        """`repo/files`: every entry carries `Sha256` + `Size`, which the client verifies after download."""
        _, commit = self._ms_commit(req.params["repo"], req.query.get("Revision"))
        recursive = req.query.get("Recursive", "").lower() == "true"
        root = req.query.get("Root", "").strip("/")

        def wanted(path: str) -> bool:
            if root and not path.startswith(root + "/"):
                return False
            rest = path[len(root) + 1 :] if root else path
            return recursive or "/" not in rest

        def entry(path: str, kind: str, hub_file: HubFile | None) -> dict[str, object]:
            return {
                "Name": path.rsplit("/", 1)[-1],
                "Path": path,
                "Type": kind,  # "blob" or "tree"; the client skips trees
                "Size": hub_file.size if hub_file else 0,
                "Sha256": hub_file.sha256 if hub_file else "",
                "IsLFS": bool(hub_file and hub_file.lfs),
                "Id": hub_file.git_oid if hub_file else hashlib.sha1(path.encode()).hexdigest(),
                "Mode": "33188" if hub_file else "16384",
                "Revision": commit.sha,
                "CommitId": commit.sha,
                "CommittedDate": int(commit.created_at),
                "CommitterName": "hub-server",
                "CommitMessage": "",
                "InCheck": False,
            }

        files = [entry(d, "tree", None) for d in commit.directories() if wanted(d)]
        files += [entry(f.path, "blob", f) for f in commit.files.values() if wanted(f.path)]
        return self._ms_ok({"Files": files, "LatestCommitter": {"Id": commit.sha, "CommitterName": "hub-server"}})

    def _ms_download(self, req: Request) -> Response:
        _, commit = self._ms_commit(req.params["repo"], req.query.get("Revision"))
        file_path = req.query.get("FilePath", "").strip("/")
        hub_file = commit.files.get(file_path)
        if hub_file is None:
            raise HttpError(404, f"File {file_path} does not exist")
        return _file_response(hub_file, req.headers.get("Range"), {"ETag": f'"{hub_file.etag}"'})


class _ThreadingHubHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, hub: HubServer) -> None:
        self.hub = hub
        super().__init__(address, handler)


class _HubRequestHandler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: both clients reuse connections; every response sets Content-Length.
    protocol_version = "HTTP/1.1"
    server: _ThreadingHubHTTPServer

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, send_body: bool) -> None:
        response = self.server.hub.handle(self.command, self.path, self.headers)
        body = response.body
        length = len(body) if isinstance(body, bytes) else response.length
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length or 0))
        self.end_headers()
        if not send_body:
            return
        try:
            for chunk in [body] if isinstance(body, bytes) else body:
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # client gave up mid-download (e.g. it will resume)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean; `HubServer.requests` records traffic instead
