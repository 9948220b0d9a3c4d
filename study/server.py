"""The study's web server: the page, a small JSON API and the images, from the standard library's HTTP server.

    GET  /                      the page (study/page.html)
    GET  /api/study             the study's name, aspects with their questions, number of pairs
    POST /api/rater             {"name", "key"?} → {"key", "progress"}: a new name gets a fresh rater key; a known
                                name needs its key (the page keeps it), so no one can vote as someone else
    POST /api/next              {"key"} → the rater's next pair: {"showing", "prompt", "left", "right", "progress"}
                                (image URLs by random key; nothing in it tells the systems apart), or {"done": true}
    POST /api/vote              {"key", "showing", "answers": {aspect: "left"|"right"|"tie"}} → {"progress"}
    GET  /image/KEY             an image of the study, looked up by its random key in the database

Every request that changes something is a POST with a JSON body: a page of another site can make a browser send a
GET (an <img> tag) or a form POST, but not a JSON POST without a CORS preflight, which this server never grants.
Bound to 127.0.0.1 unless told otherwise; with a token (required to listen beyond this machine) every request must
carry it, as ``?token=`` or the ``X-Study-Token`` header. Malformed or unknown requests get a 4xx JSON error (the
page itself a short HTML one) and change nothing; no request names a file, so none can read outside the study.
A connection that sends nothing for ``timeout`` seconds is closed, so stalled clients cannot hold the server's
threads.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .store import Study, StudyError

log = logging.getLogger("human_eval")
PAGE = Path(__file__).with_name("page.html")
PAGE_PATHS = ("/", "/index.html")
MAX_BODY = 64 * 1024
# Seconds a connection may take to send its request, and to take each response. Long enough for a phone on a poor
# network to fetch an image (Python's sendall counts the whole send against it), short enough that half-sent
# requests cannot pile up: each holds one thread until then.
TIMEOUT = 60.0
# The listen queue: socketserver's default of 5 makes a burst of raters' requests wait for TCP's SYN retransmission
# (1 s, then 3 s...) or be reset (issue 29: 12 of 60 simultaneous votes); Linux caps it at net.core.somaxconn.
QUEUE = 128
MAX_CONNECTIONS = 64  # handled at once; one more is closed at once (the page says to press Submit again)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_page(message: str) -> bytes:
    """The page's own refusal, readable by a person (the API answers JSON)."""
    return ("<!doctype html><meta charset='utf-8'><meta name='viewport' content='width=device-width, "
            f"initial-scale=1'><title>Study</title><p style='font: 18px system-ui, sans-serif; margin: 24px'>"
            f"{html.escape(message)}</p>").encode()


def make_handler(study: Study, token: str | None, timeout: float = TIMEOUT, max_raters: int | None = None):
    page = PAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "t2i-study"

        def setup(self):
            self.timeout = timeout  # StreamRequestHandler puts it on the socket: reads and writes give up after it
            super().setup()

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
                self.send_header("Referrer-Policy", "no-referrer")  # the page's address carries the token
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj, status: int = 200):
            self._send(status, json.dumps(obj).encode(), "application/json")

        # --- request plumbing
        def _route(self, method: str, url, query):
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
                    raise StudyError("This study needs the full link you were given (it ends with ?token=…): open "
                                     "that link, or ask the study's organiser for it.", 403)
            if method == "POST" and (self.headers.get("Content-Type") or "").split(";")[0].strip() != \
                    "application/json":
                raise StudyError("send the body as Content-Type: application/json", 415)

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
                raw = self.rfile.read(length)
            except TimeoutError:
                self.close_connection = True
                raise StudyError("the request body did not arrive in time", 408) from None
            try:
                body = json.loads(raw or b"null")
            # ValueError: not JSON, not UTF-8, or an integer of more digits than Python converts (4,300);
            # RecursionError: arrays nested deeper than the parser's recursion limit
            except (ValueError, RecursionError):
                raise StudyError("the body is not valid JSON (or too deeply nested, or holds a huge number)") from None
            if not isinstance(body, dict):
                raise StudyError("the body must be a JSON object")
            return body

        def _handle(self, method: str):
            try:
                self._answer(method)
            except (TimeoutError, ConnectionError):  # the client stopped taking the answer: nobody to tell
                self.close_connection = True

        def _answer(self, method: str):
            url = urlsplit(self.path)
            try:
                self._route(method, url, parse_qs(url.query))
                path = url.path
                if method == "GET" and path in PAGE_PATHS:
                    return self._send(200, page, "text/html; charset=utf-8")
                if method == "GET" and path == "/api/study":
                    return self._json({"name": study.meta["name"], "aspects": study.aspects,
                                       "pairs": study.num_pairs, "votes_per_pair": study.votes_per_pair})
                if method == "POST" and path == "/api/rater":
                    body = self._body()
                    rater, key = study.sign_in(body.get("name"), body.get("key"), max_raters)
                    return self._json({"key": key, "progress": study.progress(rater)})
                if method == "POST" and path == "/api/next":
                    rater = study.authenticate(self._body().get("key"))
                    shown = study.next_showing(rater)
                    if shown is None:
                        return self._json({"done": True, "progress": study.progress(rater)})
                    return self._json({"showing": shown.id, "prompt": shown.prompt,
                                       "left": f"/image/{shown.left_image}", "right": f"/image/{shown.right_image}",
                                       "progress": study.progress(rater)})
                if method == "POST" and path == "/api/vote":
                    body = self._body()
                    rater = study.authenticate(body.get("key"))
                    study.record(rater, body.get("showing"), body.get("answers"))
                    return self._json({"ok": True, "progress": study.progress(rater)})
                if method == "GET" and path.startswith("/image/"):
                    file = study.image_path(path[len("/image/"):])
                    return self._send(200, file.read_bytes(), "image/png", cache=True)
                if method == "GET" and path in ("/api/rater", "/api/next", "/api/vote"):
                    raise StudyError("use POST with a JSON body", 405)
                raise StudyError("not found", 404 if method in ("GET", "POST") else 405)
            except StudyError as e:
                if method == "GET" and url.path in PAGE_PATHS:
                    return self._send(e.status, error_page(str(e)), "text/html; charset=utf-8")
                return self._json({"error": str(e)}, e.status)
            except (TimeoutError, ConnectionError):
                raise
            except Exception as e:  # a bug, not the client's fault: say so, keep serving
                log.exception("error handling %s %s", method, self.path)
                return self._json({"error": f"internal error: {type(e).__name__}"}, 500)

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_PUT(self):
            self._json({"error": "method not allowed"}, HTTPStatus.METHOD_NOT_ALLOWED)

        do_DELETE = do_PATCH = do_OPTIONS = do_PUT  # OPTIONS: no CORS preflight is ever granted

        def do_HEAD(self):  # a 405 without a body (HEAD answers carry none)
            self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


class Server(ThreadingHTTPServer):
    """The threaded server, bounded: at most MAX_CONNECTIONS handled at once, and each connection closed after
    ``deadline`` seconds (twice the socket timeout) whatever it is doing (the socket timeout alone lets a client that sends a byte now and then
    hold a thread for ever)."""

    request_queue_size = QUEUE
    daemon_threads = True
    deadline = TIMEOUT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: nothing was read, nothing changes
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        def cut():
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        timer = threading.Timer(self.deadline, cut)
        timer.daemon = True
        timer.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            timer.cancel()
            self._slots.release()


def make_server(study: Study, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                expose: bool = False, timeout: float = TIMEOUT, max_raters: int | None = None) -> Server:
    """A server for ``study`` (not yet serving: call serve_forever). Listening beyond loopback needs ``expose`` and
    a token. Holds the study's server lock (one server per study) until ``study`` is closed."""
    if token is not None and not token:
        raise StudyError("the token is empty (an unset variable?): give a token, or none on localhost")
    if token is not None and not (token.isascii() and token.isprintable()):
        raise StudyError("the token must be printable ASCII (the page sends it in a header)")
    if not is_loopback(host):
        if not expose:
            raise StudyError(f"--host {host} would expose the study beyond this machine: add --expose (and raters "
                             "need the token printed at start)")
        if not token:
            raise StudyError("--expose needs a rater token (--token, or let the command make one)")
    study.lock_for_serving()
    server = Server((host, port), make_handler(study, token, timeout, max_raters))
    server.deadline = 2 * timeout  # a stalled body gets its 408 at `timeout`; any connection ends by twice that
    return server
