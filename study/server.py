"""The study's web server: the page, a small JSON API and the images, from the standard library's HTTP server.

    GET  /                      the page (study/page.html)
    GET  /api/study             the study's name, aspects with their questions, number of pairs
    POST /api/rater             {"name"} → {"rater", "progress"}: a rater is identified by name and can come back
    GET  /api/next?rater=ID     the next pair for this rater: {"showing", "prompt", "left", "right", "progress"}
                                (image URLs by id; the systems' names are never sent), or {"done": true}
    POST /api/vote              {"rater", "showing", "answers": {aspect: "left"|"right"|"tie"}} → {"progress"}
    GET  /image/ID              an image of the study, looked up by id in the database

Bound to 127.0.0.1 unless told otherwise; with a token (required to listen beyond this machine) every request must
carry it, as ``?token=`` or the ``X-Study-Token`` header. Malformed or unknown requests get a 4xx JSON error and
change nothing; no request names a file, so none can read outside the study.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .store import Study, StudyError, as_id

log = logging.getLogger("human_eval")
PAGE = Path(__file__).with_name("page.html")
MAX_BODY = 64 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_handler(study: Study, token: str | None):
    page = PAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "t2i-study"

        def log_message(self, fmt, *args):  # through logging, not stderr prints
            log.debug("%s %s", self.address_string(), fmt % args)

        # --- responses
        def _send(self, status: int, body: bytes, ctype: str, cache: bool = False):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "private, max-age=3600" if cache else "no-store")
            if ctype.startswith("text/html"):
                self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self'; "
                                 "style-src 'unsafe-inline'; script-src 'unsafe-inline'")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj, status: int = 200):
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _error(self, status: int, message: str):
            self._json({"error": message}, status)

        # --- request plumbing
        def _route(self, method: str):
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if token is None:
                # No token: only this machine's own pages may talk to the server. The Host must name the loopback
                # address (a DNS-rebinding page's Host is its own domain), and votes must be sent as JSON, which a
                # page of another origin cannot do without a CORS preflight this server never grants.
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
                if not is_loopback(host):
                    raise StudyError("this server answers requests for localhost only", 403)
            else:
                given = self.headers.get("X-Study-Token") or (query.get("token") or [""])[0]
                if not hmac.compare_digest(given.encode(), token.encode()):
                    raise StudyError("a valid study token is required (the link you were given has it)", 403)
            if method == "POST" and (self.headers.get("Content-Type") or "").split(";")[0].strip() != \
                    "application/json":
                raise StudyError("send the body as Content-Type: application/json", 415)
            return url.path, query

        def _body(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise StudyError("a JSON body with Content-Length is required", 411) from None
            if length < 0:
                raise StudyError("a negative Content-Length")
            if length > MAX_BODY:
                raise StudyError("request body too large", 413)
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise StudyError("the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise StudyError("the body must be a JSON object")
            return body

        def _handle(self, method: str):
            try:
                path, query = self._route(method)
                if method == "GET" and path in ("/", "/index.html"):
                    return self._send(200, page, "text/html; charset=utf-8")
                if method == "GET" and path == "/api/study":
                    return self._json({"name": study.meta["name"], "aspects": study.aspects,
                                       "pairs": study.num_pairs, "votes_per_pair": study.votes_per_pair})
                if method == "POST" and path == "/api/rater":
                    rater = study.rater(self._body().get("name"))
                    return self._json({"rater": rater, "progress": study.progress(rater)})
                if method == "GET" and path == "/api/next":
                    rater = as_id((query.get("rater") or [""])[0], "rater")
                    shown = study.next_showing(rater)
                    if shown is None:
                        return self._json({"done": True, "progress": study.progress(rater)})
                    return self._json({"showing": shown.id, "pair": shown.pair, "prompt": shown.prompt,
                                       "left": f"/image/{shown.left_image}", "right": f"/image/{shown.right_image}",
                                       "progress": study.progress(rater)})
                if method == "POST" and path == "/api/vote":
                    body = self._body()
                    study.record(body.get("rater"), body.get("showing"), body.get("answers"))
                    return self._json({"ok": True, "progress": study.progress(as_id(body["rater"], "rater"))})
                if method == "GET" and path.startswith("/image/"):
                    file = study.image_path(path[len("/image/"):])
                    return self._send(200, file.read_bytes(), "image/png", cache=True)
                raise StudyError("not found", 404 if method in ("GET", "POST") else 405)
            except StudyError as e:
                return self._error(e.status, str(e))
            except Exception as e:  # a bug, not the client's fault: say so, keep serving
                log.exception("error handling %s %s", method, self.path)
                return self._error(500, f"internal error: {type(e).__name__}")

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_PUT(self):
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")

        do_DELETE = do_PATCH = do_PUT

    return Handler


def make_server(study: Study, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                expose: bool = False) -> ThreadingHTTPServer:
    """A server for ``study`` (not yet serving: call serve_forever). Listening beyond loopback needs ``expose`` and
    a token."""
    if not is_loopback(host):
        if not expose:
            raise StudyError(f"--host {host} would expose the study beyond this machine: add --expose (and raters "
                             "need the token printed at start)")
        if not token:
            raise StudyError("--expose needs a rater token (--token, or let the command make one)")
    server = ThreadingHTTPServer((host, port), make_handler(study, token))
    server.daemon_threads = True
    return server
