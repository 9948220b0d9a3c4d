"""A side-by-side study on disk: ``STUDY/study.json`` (what is compared), ``STUDY/systems/<name>/images/*.png`` (every
image shown, copied or generated into the study) and ``STUDY/votes.sqlite`` (raters, showings and votes).

Every vote is committed in its own transaction the moment it arrives (SQLite in WAL mode), so stopping the server,
even with SIGKILL, loses nothing already answered; a rater who comes back continues where they stopped, and a
showing they had not answered is shown again with the same sides.

Blinding: an image is known outside the study only by a random key (``images.key``), never by a number that follows
the order in which the systems' images were stored, and a showing is answered by its own (sequential) id, which says
nothing about the systems. Raters: a rater signs in with a name and gets a random secret (the rater key); every later
request of theirs carries it, and only its SHA-256 is stored, so a copy of votes.sqlite cannot vote as anyone.

Tables: ``items`` (prompt and seed), ``images`` (an item's image of one system, its file and key), ``pairs`` (one
item, two systems in study order), ``raters`` (name, hash of the key), ``showings`` (a pair shown to a rater with its
left and right systems, drawn at random), ``votes`` (one row per aspect of an answered showing: the choice as
clicked — left, right or tie — and the winning system it means).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

ASPECTS = {
    "relevance": "Which image matches the prompt better?",
    "aesthetics": "Which image is more beautiful?",
    "complexity": "Which image is more detailed and complex?",
    "defects": "Which image has FEWER defects (artefacts, broken shapes)?",
    "overall": "Which image do you prefer overall?",
}
CHOICES = ("left", "right", "tie")
PENDING_SECONDS = 600  # a showing nobody answered within this long no longer holds its pair back from other raters

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, seed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS images (id INTEGER PRIMARY KEY, item INTEGER NOT NULL REFERENCES items(id),
    system TEXT NOT NULL, path TEXT NOT NULL, key TEXT, UNIQUE(item, system));
CREATE UNIQUE INDEX IF NOT EXISTS images_key ON images(key);
CREATE TABLE IF NOT EXISTS pairs (id INTEGER PRIMARY KEY, item INTEGER NOT NULL REFERENCES items(id),
    system_a TEXT NOT NULL, system_b TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created REAL NOT NULL,
    key_hash TEXT);
CREATE TABLE IF NOT EXISTS showings (id INTEGER PRIMARY KEY, rater INTEGER NOT NULL REFERENCES raters(id),
    pair INTEGER NOT NULL REFERENCES pairs(id), left_system TEXT NOT NULL, right_system TEXT NOT NULL,
    shown REAL NOT NULL, answered REAL, UNIQUE(rater, pair));
CREATE TABLE IF NOT EXISTS votes (id INTEGER PRIMARY KEY, showing INTEGER NOT NULL REFERENCES showings(id),
    rater INTEGER NOT NULL REFERENCES raters(id), pair INTEGER NOT NULL REFERENCES pairs(id),
    left_system TEXT NOT NULL, right_system TEXT NOT NULL, aspect TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')), winner TEXT NOT NULL, time REAL NOT NULL,
    UNIQUE(showing, aspect));
"""


class StudyError(ValueError):
    """A request the study cannot honour; ``status`` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


MAX_ID = 2**63 - 1
# A system's name becomes a folder (systems/<name>/) and a column value beside "tie": letters, digits, ".", "_" and
# "-", starting with a letter or digit (so no path separator, no "..", no leading "-" read as an option or formula).
SYSTEM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TIE = "tie"  # the winner recorded for a tie (metrics/preference.py reads it), so no system may be called that
KEY_CHARS = re.compile(r"[A-Za-z0-9_-]{16,64}")  # what secrets.token_urlsafe makes; anything else is no key


def as_id(value, what: str) -> int:
    """A database id from a request: an int (or a string of ASCII digits) in [1, 2⁶³); 400 otherwise."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_ID:
        raise StudyError(f"{what} must be an integer id")
    return value


def check_system_name(name: str) -> str:
    if not isinstance(name, str) or not SYSTEM_NAME.fullmatch(name):
        raise StudyError(f"system name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit (it names a folder of the study)")
    if name.lower() == TIE:
        raise StudyError(f"system name {name!r} is the value recorded for a tie: choose another name")
    return name


def key_hash(key: str) -> str:
    """What is stored of a rater key: its SHA-256 (the key itself has 128 random bits, so no salt or slow hash is
    needed: there is nothing to guess from a dictionary)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Showing:
    id: int
    pair: int
    prompt: str
    left_image: str  # image keys
    right_image: str


def create(folder: Path, name: str, systems: list[str], items: list[tuple[str, int]],
           images: dict[tuple[int, str], str], aspects: list[str], votes_per_pair: int, sources: dict) -> None:
    """Write study.json and a fresh database: ``items`` are (prompt, seed); ``images[(item index, system)]`` is a path
    relative to ``folder``; every item gets one pair per two systems."""
    unknown = [a for a in aspects if a not in ASPECTS]
    if unknown:
        raise StudyError(f"unknown aspect(s) {unknown}; allowed: {', '.join(ASPECTS)}")
    if len(systems) < 2 or len(set(systems)) != len(systems):
        raise StudyError(f"a study compares two or more systems with distinct names, got {systems}")
    for s in systems:
        check_system_name(s)
    if not items:
        raise StudyError("a study needs at least one prompt")
    if votes_per_pair < 1:
        raise StudyError(f"votes per pair must be at least 1, got {votes_per_pair}")
    db_path = folder / "votes.sqlite"
    if db_path.exists():
        raise StudyError(f"{folder} already holds a study's votes ({db_path}); choose another --out")
    meta = {"name": name, "systems": systems, "sources": sources, "aspects": {a: ASPECTS[a] for a in aspects},
            "votes_per_pair": votes_per_pair, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    db = sqlite3.connect(db_path)
    with db:
        db.executescript(SCHEMA)
        for i, (prompt, seed) in enumerate(items):
            db.execute("INSERT INTO items VALUES (?, ?, ?)", (i, prompt, seed))
            for s in systems:
                db.execute("INSERT INTO images (item, system, path, key) VALUES (?, ?, ?, ?)",
                           (i, s, images[(i, s)], secrets.token_urlsafe(16)))
            for a, b in combinations(systems, 2):
                db.execute("INSERT INTO pairs (item, system_a, system_b) VALUES (?, ?, ?)", (i, a, b))
    db.close()
    (folder / "study.json").write_text(json.dumps(meta, indent=1))


class Study:
    """An open study: thread-safe (one connection, one lock; the HTTP server's threads share it)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        meta_file, db_file = self.folder / "study.json", self.folder / "votes.sqlite"
        if not meta_file.is_file() or not db_file.is_file():
            raise FileNotFoundError(f"{self.folder} is not a study (study.json and votes.sqlite); make one with "
                                    "`python pipeline/human_eval.py create`")
        self.meta = json.loads(meta_file.read_text())
        self.aspects: dict[str, str] = self.meta["aspects"]
        self.systems: list[str] = self.meta["systems"]
        self.votes_per_pair = int(self.meta.get("votes_per_pair", 3))
        self.db = sqlite3.connect(db_file, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed vote survives a power cut, not only a kill
        self.lock = threading.RLock()  # every use of the one connection holds it (the server's threads share it)
        self.rng = random.Random()
        self._serving = None
        self._upgrade()

    def _upgrade(self):
        """Give a study made before image and rater keys existed its image keys (its raters get a key when they
        next sign in, see sign_in), in one transaction."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(images)")}
        if "key" in columns:
            return
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("ALTER TABLE images ADD COLUMN key TEXT")
            self.db.execute("ALTER TABLE raters ADD COLUMN key_hash TEXT")
            for (image,) in self.db.execute("SELECT id FROM images").fetchall():
                self.db.execute("UPDATE images SET key = ? WHERE id = ?", (secrets.token_urlsafe(16), image))
            self.db.execute("CREATE UNIQUE INDEX images_key ON images(key)")
            self.db.execute("COMMIT")

    def lock_for_serving(self):
        """Hold STUDY/server.lock for as long as this study is open: a second server on the same study is refused.
        Two servers would each keep their own lock around the database and could hand one rater two pairs at once.
        flock is released by the kernel when the process dies, so a killed server leaves no stale lock."""
        import fcntl  # POSIX; the study is served from Linux or macOS

        handle = open(self.folder / "server.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StudyError(f"another server is already serving {self.folder}: stop it first, or send raters its "
                             "link", 409) from None
        self._serving = handle

    def close(self):
        with self.lock:  # after any vote being written
            self.db.close()
            if self._serving is not None:
                self._serving.close()  # releases the server lock
                self._serving = None

    def _one(self, sql, args=()):
        with self.lock:
            return self.db.execute(sql, args).fetchone()

    @property
    def num_pairs(self) -> int:
        return self._one("SELECT COUNT(*) FROM pairs")[0]

    @property
    def num_raters(self) -> int:
        return self._one("SELECT COUNT(*) FROM raters")[0]

    def sign_in(self, name, key=None, max_raters: int | None = None) -> tuple[int, str]:
        """(rater id, rater key) for the rater called ``name`` (1–64 printable characters). A new name makes a new
        rater with a fresh random key (refused past ``max_raters``); a known name needs its key (the page keeps it
        in the browser), so nobody can continue, or vote, as someone else. A rater made before keys existed gets
        one on their next sign-in."""
        name = name.strip() if isinstance(name, str) else ""
        if not 1 <= len(name) <= 64 or not name.isprintable():
            raise StudyError("a rater name is 1 to 64 printable characters")
        with self.lock:
            row = self._one("SELECT id, key_hash FROM raters WHERE name = ?", (name,))
            if row and row[1] is not None:
                if isinstance(key, str) and secrets.compare_digest(key_hash(key), row[1]):
                    return row[0], key
                raise StudyError(f"someone already signed in as {name!r} in another browser: continue there, or "
                                 "choose another name", 409)
            key = secrets.token_urlsafe(16)
            if row:
                self.db.execute("UPDATE raters SET key_hash = ? WHERE id = ?", (key_hash(key), row[0]))
                return row[0], key
            if max_raters is not None and self.num_raters >= max_raters:
                raise StudyError(f"this study takes at most {max_raters} raters, and all have signed in", 403)
            rater = self.db.execute("INSERT INTO raters (name, created, key_hash) VALUES (?, ?, ?)",
                                    (name, time.time(), key_hash(key))).lastrowid
            return rater, key

    def authenticate(self, key) -> int:
        """The id of the rater whose key this is; 403 otherwise."""
        row = None
        if isinstance(key, str) and KEY_CHARS.fullmatch(key):
            row = self._one("SELECT id FROM raters WHERE key_hash = ?", (key_hash(key),))
        if row is None:
            raise StudyError("unknown rater key: sign in again with your name", 403)
        return row[0]

    def progress(self, rater: int) -> dict:
        with self.lock:
            return self._progress(rater)

    def _progress(self, rater: int) -> dict:
        done = self._one("SELECT COUNT(*) FROM showings WHERE rater = ? AND answered IS NOT NULL", (rater,))[0]
        total_votes = self._one("SELECT COUNT(*) FROM showings WHERE answered IS NOT NULL")[0]
        return {"done": done, "pairs": self.num_pairs, "target_per_pair": self.votes_per_pair,
                "answered_showings": total_votes}

    def next_showing(self, rater: int) -> Showing | None:
        """The rater's unanswered showing if any (same sides), else a new one: among the pairs this rater has not
        judged, one with the fewest answers (plus recent unanswered showings to others), at random among equals;
        sides at random. None when the rater has judged every pair. ``rater`` is an authenticated id."""
        with self.lock:
            row = self._one("SELECT id FROM showings WHERE rater = ? AND answered IS NULL ORDER BY id LIMIT 1",
                            (rater,))
            if row is None:
                cutoff = time.time() - PENDING_SECONDS
                rows = self.db.execute(
                    "SELECT p.id, p.system_a, p.system_b, (SELECT COUNT(*) FROM showings s WHERE s.pair = p.id AND "
                    "(s.answered IS NOT NULL OR s.shown > ?)) AS load FROM pairs p WHERE p.id NOT IN "
                    "(SELECT pair FROM showings WHERE rater = ?)", (cutoff, rater)).fetchall()
                if not rows:
                    return None
                least = min(r[3] for r in rows)
                pair, a, b, _ = self.rng.choice([r for r in rows if r[3] == least])
                left, right = (a, b) if self.rng.random() < 0.5 else (b, a)
                self.db.execute("INSERT INTO showings (rater, pair, left_system, right_system, shown) VALUES "
                                "(?, ?, ?, ?, ?)", (rater, pair, left, right, time.time()))
                row = self._one("SELECT id FROM showings WHERE rater = ? AND pair = ?", (rater, pair))
            return self._showing(row[0])

    def _showing(self, sid: int) -> Showing:
        pair, left, right, item, prompt = self._one(
            "SELECT s.pair, s.left_system, s.right_system, p.item, i.prompt FROM showings s JOIN pairs p ON "
            "p.id = s.pair JOIN items i ON i.id = p.item WHERE s.id = ?", (sid,))
        image = {s: self._one("SELECT key FROM images WHERE item = ? AND system = ?", (item, s))[0]
                 for s in (left, right)}
        return Showing(sid, pair, prompt, image[left], image[right])

    def record(self, rater: int, showing, answers) -> None:
        """Store the answers {aspect: left|right|tie} of (authenticated) ``rater`` to a showing, all aspects in one
        transaction. Refused (and nothing written): an unknown showing (404), another rater's showing (403), one
        already answered (409), a missing or unknown aspect or choice (400)."""
        if not isinstance(answers, dict):
            raise StudyError("answers must be an object {aspect: left|right|tie}")
        missing = sorted(set(self.aspects) - set(answers))
        extra = sorted(set(answers) - set(self.aspects))
        if missing or extra:
            raise StudyError(f"answers need exactly the aspects {list(self.aspects)}" +
                             (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
        bad = {a: c for a, c in answers.items() if c not in CHOICES}
        if bad:
            raise StudyError(f"each answer is one of {', '.join(CHOICES)}; got {bad}")
        with self.lock:
            showing = as_id(showing, "showing")
            row = self._one("SELECT rater, pair, left_system, right_system, answered FROM showings WHERE id = ?",
                            (showing,))
            if row is None:
                raise StudyError(f"no showing {showing}: vote on the pair the page was given", 404)
            owner, pair, left, right, answered = row
            if owner != rater:
                raise StudyError("this showing was given to another rater", 403)
            if answered is not None:
                raise StudyError("this pair was already answered", 409)
            now = time.time()
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for aspect, choice in answers.items():
                    winner = {"left": left, "right": right, "tie": TIE}[choice]
                    self.db.execute("INSERT INTO votes (showing, rater, pair, left_system, right_system, aspect, "
                                    "choice, winner, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                    (showing, rater, pair, left, right, aspect, choice, winner, now))
                self.db.execute("UPDATE showings SET answered = ? WHERE id = ?", (now, showing))
                self.db.execute("COMMIT")
            except sqlite3.IntegrityError:  # answered by another process writing to the study (not a server)
                self.db.execute("ROLLBACK")
                raise StudyError("this pair was already answered", 409) from None
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def image_path(self, key: str) -> Path:
        """The file of the image with this key, resolved inside the study folder; 404 otherwise."""
        row = self._one("SELECT path FROM images WHERE key = ?", (key,)) if KEY_CHARS.fullmatch(key) else None
        if row is None:
            raise StudyError("no such image", 404)
        path = (self.folder / row[0]).resolve()
        if not path.is_relative_to(self.folder) or not path.is_file():
            raise StudyError("no such image", 404)
        return path

    def votes(self) -> list[dict]:
        """Every vote with its rater, pair, prompt, seed, the sides shown, the choice and the time (oldest first)."""
        with self.lock:
            rows = self._votes()
        keys = ["vote", "rater", "pair", "prompt", "seed", "system_a", "system_b", "left", "right", "aspect",
                "choice", "winner", "time"]
        return [dict(zip(keys, r)) for r in rows]

    def _votes(self) -> list[tuple]:
        return self.db.execute(
            "SELECT v.id, r.name, v.pair, i.prompt, i.seed, p.system_a, p.system_b, v.left_system, v.right_system, "
            "v.aspect, v.choice, v.winner, v.time FROM votes v JOIN raters r ON r.id = v.rater JOIN pairs p ON "
            "p.id = v.pair JOIN items i ON i.id = p.item ORDER BY v.id").fetchall()
