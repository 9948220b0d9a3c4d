"""The human side-by-side study: creating it and what it refuses, the server's API and its refusals (blinding, rater
keys, timeouts, a burst and 50 raters at once), votes surviving a killed server, the statistics against hand
computations and simulated raters, and the page driven by a real headless Chromium (a full study, a slow network,
a phone)."""

import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metrics.preference import Vote, agreement, bradley_terry, krippendorff_alpha, ranking, wilson, win_rates
from pipeline import human_eval
from study.server import make_server
from study.store import Study, StudyError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square", "a green triangle"]
IMAGE_URL = re.compile(r"/image/[A-Za-z0-9_-]{22}")  # a random key (secrets.token_urlsafe(16)), nothing else


def image_folder(folder: Path, prompts, seed: int, with_metadata=True) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for i, p in enumerate(prompts):
        arr = np.random.default_rng(seed * 100 + i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.png")
        rows.append({"file": f"{i}.png", "prompt": p})
        if not with_metadata:
            (folder / f"{i}.txt").write_text(p)
    if with_metadata:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def make_study(tmp: Path, systems=("a", "b"), prompts=PROMPTS, aspects=None) -> Path:
    argv = ["create", "--out", str(tmp / "study")]
    for k, name in enumerate(systems):
        argv += ["--system", f"{name}={image_folder(tmp / f'sys_{name}', prompts, k, with_metadata=k % 2 == 0)}"]
    if aspects:
        argv += ["--aspects", *aspects]
    human_eval.main(argv)
    return tmp / "study"


class Client:
    def __init__(self, base: str, token: str | None = None):
        self.base, self.token = base, token

    def call(self, path: str, body=None, raw: bytes | None = None, method=None, headers=None):
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        if self.token:
            req.add_header("X-Study-Token", self.token)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, ctype, payload = r.status, r.headers["Content-Type"], r.read()
        except urllib.error.HTTPError as e:
            status, ctype, payload = e.code, e.headers["Content-Type"], e.read()
        return status, json.loads(payload or b"{}") if ctype == "application/json" else payload

    def sign_in(self, name: str, key=None) -> str:
        status, res = self.call("/api/rater", {"name": name, "key": key})
        assert status == 200, res
        return res["key"]

    def next(self, key: str) -> dict:
        status, res = self.call("/api/next", {"key": key})
        assert status == 200, res
        return res

    def vote(self, key: str, showing, answers) -> int:
        return self.call("/api/vote", {"key": key, "showing": showing, "answers": answers})[0]


def serve_in_thread(server):
    # a short poll interval: shutdown() waits for it, once per test
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()


@pytest.fixture
def served(tmp_path):
    study_dir = make_study(tmp_path)
    study = Study(study_dir)
    server = make_server(study, "127.0.0.1", 0)
    serve_in_thread(server)
    yield Client(f"http://127.0.0.1:{server.server_address[1]}"), study
    server.shutdown()
    server.server_close()
    study.close()


def answers(study, choice="left"):
    return {a: choice for a in study.aspects}


# --- creating a study ----------------------------------------------------------------------------------------------

def test_create_from_image_folders_copies_every_image_into_the_study(tmp_path):
    study_dir = make_study(tmp_path, systems=("a", "b", "c"))
    study = Study(study_dir)
    assert study.systems == ["a", "b", "c"] and study.num_pairs == 3 * 3  # 3 prompts × 3 pairs of systems
    assert list(study.aspects) == ["relevance", "aesthetics", "complexity", "defects", "overall"]
    shutil.rmtree(tmp_path / "sys_a")  # self-contained: the sources can go
    keys = [k for (k,) in study.db.execute("SELECT key FROM images")]
    assert len(set(keys)) == 9 and all(study.image_path(k).is_relative_to(study_dir) for k in keys)


@pytest.mark.slow
def test_create_from_a_model_at_two_settings_and_a_folder_generates_the_same_seeds(tmp_path):
    from data.write_shards import write_toy
    from pipeline import train

    write_toy(tmp_path / "shards", count=16, resolution=16, max_samples=16)
    run = tmp_path / "run"
    train.main(["--config", str(ROOT / "launch/configs/demo.yaml"), "--output-dir", str(run), "--max-steps", "1",
                f"data.shards={tmp_path / 'shards'}", "data.resolution=16", "data.num_workers=0", "optim.batch_size=4",
                "logging.tracker=none", "logging.sample_every=0"])
    folder = image_folder(tmp_path / "old", PROMPTS * 2, 0)  # two images per prompt
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    out = human_eval.main(["create", "--out", str(tmp_path / "study"), "--prompts", str(tmp_path / "prompts.txt"),
                           "--system", f"w1={run / 'model'}@guidance=1,steps=2",
                           "--system", f"w5={run / 'model'}@guidance=5,steps=2,sampler=ddpm",
                           "--system", f"old={folder}", "--images-per-prompt", "2", "--json"])
    assert out["pairs"] == 3 * 2 * 3
    w1 = sorted((tmp_path / "study/systems/w1/images").glob("*.png"))
    w5 = sorted((tmp_path / "study/systems/w5/images").glob("*.png"))
    assert len(w1) == len(w5) == 6 and all(Image.open(f).size == (16, 16) for f in w1 + w5)
    meta = json.loads((tmp_path / "study/study.json").read_text())
    assert meta["sources"]["w5"]["sampler"] == "ddpm" and meta["sources"]["w5"]["guidance"] == 5
    records = {name: [json.loads(line) for line in (tmp_path / "study/systems" / name / "metadata.jsonl")
                      .read_text().splitlines()] for name in ("w1", "w5", "old")}
    assert [r["seed"] for r in records["w1"]] == [r["seed"] for r in records["w5"]]  # only the system differs
    assert len({r["seed"] for r in records["w1"]}) == 6 and [r["guidance"] for r in records["w5"]] == [5.0] * 6
    assert [r["prompt"] for r in records["old"]] == [r["prompt"] for r in records["w1"]]
    # creating again over a study with votes is refused, nothing is touched
    with pytest.raises(SystemExit, match="already holds a study"):
        human_eval.main(["create", "--out", str(tmp_path / "study"), "--system", f"a={folder}",
                         "--system", f"b={folder}"])
    # a create interrupted before its database, rerun with other settings for one system: only that system's images
    # are made again (the others are reused)
    (tmp_path / "study/votes.sqlite").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "study/systems").rglob("*.png")}
    human_eval.main(["create", "--out", str(tmp_path / "study"), "--prompts", str(tmp_path / "prompts.txt"),
                     "--system", f"w1={run / 'model'}@guidance=1,steps=2",
                     "--system", f"w5={run / 'model'}@guidance=5,steps=3,sampler=ddpm",
                     "--system", f"old={folder}", "--images-per-prompt", "2"])
    remade = {p.parent.parent.name for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert "w5" in remade and "w1" not in remade
    assert json.loads((tmp_path / "study/systems/w5/made_for.json").read_text())["spec"]["steps"] == 3


def test_a_folder_of_several_guidance_scales_must_be_narrowed_to_one(tmp_path):
    rows = [{"file": f"{p}_{g}.png", "prompt": p, "guidance": g, "seed": 1} for p in ("a", "b") for g in (1.0, 3.0)]
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, r in enumerate(rows):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / r["file"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = image_folder(tmp_path / "other", ["a", "b"], 3)
    with pytest.raises(SystemExit, match="guidance 1.0, 3.0: pick one"):
        human_eval.main(["create", "--out", str(tmp_path / "s1"), "--system", f"x={folder}", "--system", f"y={other}"])
    human_eval.main(["create", "--out", str(tmp_path / "s2"), "--system", f"x={folder}@guidance=3",
                     "--system", f"y={other}"])
    copied = [json.loads(line) for line in (tmp_path / "s2/systems/x/metadata.jsonl").read_text().splitlines()]
    assert [r["source"].rsplit("/", 1)[1] for r in copied] == ["a_3.0.png", "b_3.0.png"]


def test_systems_that_do_not_share_prompts_are_refused(tmp_path):
    a = image_folder(tmp_path / "a", PROMPTS, 0)
    b = image_folder(tmp_path / "b", PROMPTS[:2] + ["a yellow star"], 1)
    with pytest.raises(SystemExit, match="must share prompts"):
        human_eval.main(["create", "--out", str(tmp_path / "study"), "--system", f"a={a}", "--system", f"b={b}"])
    assert not (tmp_path / "study" / "votes.sqlite").exists()
    with pytest.raises(SystemExit, match="at least two"):
        human_eval.main(["create", "--out", str(tmp_path / "s2"), "--system", f"a={a}"])
    with pytest.raises(SystemExit, match="neither an exported model"):
        human_eval.main(["create", "--out", str(tmp_path / "s3"), "--system", f"a={a}", "--system", "b=/nowhere"])
    with pytest.raises(SystemExit, match="unknown setting"):
        human_eval.main(["create", "--out", str(tmp_path / "s4"), "--system", f"a={a}", "--system", f"b={b}@cfg=3"])


def test_create_refuses_what_would_make_a_broken_study_with_a_one_line_reason(tmp_path, capsys):
    a = image_folder(tmp_path / "a", PROMPTS, 0)
    b = image_folder(tmp_path / "b", PROMPTS, 1)

    def refused(*argv, match, code=None):
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        with pytest.raises(SystemExit) as e:
            human_eval.main(["create", "--out", str(out), *argv])
        message = str(e.value.code) if code is None else capsys.readouterr().err
        assert (code is None or e.value.code == code) and re.search(match, message), message
        assert not (out / "votes.sqlite").exists() and not (out / "systems").exists()  # refused before any work

    refused("--system", f"a={a}", "--system", f"b={b}", "--num-prompts", "0", match="must be at least 1", code=2)
    refused("--system", f"a={a}", "--system", f"b={b}", "--votes-per-pair", "-1", match="must be at least 1", code=2)
    for name in ("../evil", "x/y", "..", "-x", "@cmd", "+x", ".hidden"):  # path separators, option- or formula-like
        refused("--system", f"a={a}", f"--system={name}={b}", match="system name")
    for name in ("tie", "Tie"):  # the value recorded for a tie
        refused("--system", f"a={a}", f"--system={name}={b}", match="value recorded for a tie")
    assert not (tmp_path / "evil").exists()
    # a metadata file that calls the prompt "caption" (as captions files may) is read; one with neither says so
    c = image_folder(tmp_path / "c", PROMPTS, 2)
    meta = c / "metadata.jsonl"
    meta.write_text(meta.read_text().replace('"prompt"', '"caption"'))
    human_eval.main(["create", "--out", str(tmp_path / "ok"), "--system", f"a={a}", "--system", f"c={c}"])
    assert Study(tmp_path / "ok").num_pairs == 3
    meta.write_text(meta.read_text().replace('"caption"', '"text"'))
    refused("--system", f"a={a}", "--system", f"c={c}", match=r"metadata.jsonl line 1: each line needs .file. and "
            r".prompt. \(or .caption.\), found file, text")
    meta.write_text("{not json\n")
    refused("--system", f"a={a}", "--system", f"c={c}", match=r"metadata.jsonl line 1 is not JSON")


# --- the server ----------------------------------------------------------------------------------------------------

def test_api_round_trip_stores_the_sides_shown_and_the_winner(served):
    client, study = served
    status, info = client.call("/api/study")
    assert status == 200 and info["pairs"] == 3 and "overall" in info["aspects"]
    key = client.sign_in("ann")
    shown = client.next(key)
    assert shown["prompt"] in PROMPTS and IMAGE_URL.fullmatch(shown["left"]) and IMAGE_URL.fullmatch(shown["right"])
    status, png = client.call(shown["left"])
    assert status == 200 and png[:4] == b"\x89PNG"
    # a reload shows the same pair, same sides
    assert client.next(key) == shown
    choice = {"relevance": "left", "aesthetics": "right", "complexity": "tie", "defects": "left", "overall": "right"}
    status, res = client.call("/api/vote", {"key": key, "showing": shown["showing"], "answers": choice})
    assert status == 200 and res["progress"]["done"] == 1
    votes = {v["aspect"]: v for v in study.votes()}
    left, right = votes["overall"]["left"], votes["overall"]["right"]
    assert {left, right} == {"a", "b"} and votes["overall"]["rater"] == "ann"
    assert votes["relevance"]["winner"] == left and votes["overall"]["winner"] == right
    assert votes["complexity"]["winner"] == "tie" and votes["complexity"]["choice"] == "tie"
    assert all(v["time"] > 0 for v in votes.values())


def test_nothing_the_api_sends_tells_the_systems_apart(tmp_path):
    """Issue 29.1: image URLs were sequential ids (in a two-system study every odd id was system A) and the pair id
    encoded the systems. Now every answer holds only the showing, the prompt, two random image keys and progress."""
    study_dir = make_study(tmp_path, systems=("sysone", "systwo", "systhree"))
    study = Study(study_dir)
    server = make_server(study, "127.0.0.1", 0)
    serve_in_thread(server)
    try:
        client = Client(f"http://127.0.0.1:{server.server_address[1]}")
        texts, system_of = [], {}
        for name in ("ann", "bob"):
            key = client.sign_in(name)
            while not (shown := client.next(key)).get("done"):
                texts.append(json.dumps(shown))
                assert set(shown) == {"showing", "prompt", "left", "right", "progress"}
                assert IMAGE_URL.fullmatch(shown["left"]) and IMAGE_URL.fullmatch(shown["right"])
                assert client.vote(key, shown["showing"], answers(study)) == 200
                last = study.votes()[-1]
                system_of[shown["left"]], system_of[shown["right"]] = last["left"], last["right"]
        assert len(system_of) == 9 and len(set(system_of.values())) == 3  # every image of every system was shown
        assert not any(s in text for s in study.systems for text in texts)  # no system name anywhere
        for image_id in range(1, 10):  # images by sequential id, as before, are gone
            assert client.call(f"/image/{image_id}")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
        study.close()


def test_pairs_go_to_raters_so_that_each_gets_votes(served):
    client, study = served
    keys = [client.sign_in(n) for n in ("ann", "bob", "cat")]
    seen = []
    for key in keys:  # three raters, three pairs: the fewest-answered pair first, so each rater starts elsewhere
        shown = client.next(key)
        seen.append(shown["prompt"])
        client.vote(key, shown["showing"], answers(study))
    assert len(set(seen)) == 3
    for _ in range(2):  # a rater never sees a pair twice, and is told when every pair is done
        shown = client.next(keys[0])
        assert shown["prompt"] != seen[0]
        client.vote(keys[0], shown["showing"], answers(study))
    assert client.next(keys[0])["done"] is True


def test_raters_are_known_by_a_secret_key_not_by_name_or_number(served, tmp_path):
    """Issue 29.4: rater ids were sequential and the id in the body was the only identity."""
    client, study = served
    ann = client.sign_in("ann")
    bob = client.sign_in("bob")
    assert len(ann) >= 22 and ann != bob
    # the name alone does not let anyone in as ann, nor a made-up key; her own key does, with her progress
    for key in (None, "", bob, "x" * 22):
        status, res = client.call("/api/rater", {"name": "ann", "key": key})
        assert status == 409 and "another browser" in res["error"]
    shown = client.next(ann)
    assert client.vote(ann, shown["showing"], answers(study)) == 200
    status, res = client.call("/api/rater", {"name": "ann", "key": ann})
    assert status == 200 and res["key"] == ann and res["progress"]["done"] == 1
    # every request that reads or writes a rater's state needs the key: no key, a wrong one, or a rater id fails
    shown = client.next(ann)
    for body in ({}, {"key": "x" * 22}, {"key": 1}, {"rater": 1}):
        assert client.call("/api/next", body)[0] == 403
        assert client.call("/api/vote", {**body, "showing": shown["showing"], "answers": answers(study)})[0] == 403
    assert client.vote(bob, shown["showing"], answers(study)) == 403  # bob cannot answer ann's pair
    assert len(study.votes()) == 5
    # the database keeps only a hash of each key: a copy of it cannot vote as anyone
    dump = "\n".join(sqlite3.connect(study.folder / "votes.sqlite").iterdump())
    assert ann not in dump and bob not in dump
    # --max-raters: past that many names, a new one is refused (those signed in go on)
    other = Study(make_study(tmp_path / "capped"))
    server = make_server(other, "127.0.0.1", 0, max_raters=1)
    serve_in_thread(server)
    try:
        capped = Client(f"http://127.0.0.1:{server.server_address[1]}")
        first = capped.sign_in("one")
        assert capped.call("/api/rater", {"name": "two"})[0] == 403
        assert capped.sign_in("one", first) == first
    finally:
        server.shutdown()
        server.server_close()
        other.close()


BAD_REQUESTS = {
    "malformed json": ("/api/vote", b"{not json", 400),
    "body not an object": ("/api/vote", b"[1, 2]", 400),
    "deeply nested json": ("/api/vote", b"[" * 60000, 400),  # RecursionError in the parser
    "5000-digit integer": ("/api/vote", b'{"showing": 1' + b"0" * 5000 + b"}", 400),  # past Python's 4300 digits
    "body cut short": ("/api/vote", b'{"showing": ', 400),
    "unknown showing": ("/api/vote", {"showing": 9999}, 404),
    "showing not an int": ("/api/vote", {"showing": "1; DROP TABLE votes"}, 400),
    "unknown rater key": ("/api/vote", {"key": "A" * 22}, 403),
    "rater key not a string": ("/api/vote", {"key": 12345}, 403),
    "missing aspect": ("/api/vote", {"answers": {"overall": "left"}}, 400),
    "unknown aspect": ("/api/vote", {"answers": {"overall": "left", "speed": "left"}}, 400),
    "answers not an object": ("/api/vote", {"answers": "left"}, 400),
    "bad choice value": ("/api/vote", {"answers": "sideways"}, 400),
    "huge showing id": ("/api/vote", {"showing": 10**30}, 400),
    "empty rater name": ("/api/rater", {"name": ""}, 400),
    "rater name not a string": ("/api/rater", {"name": ["ann"]}, 400),
    "next by GET (an <img> tag could)": ("/api/next", None, 405),
    "vote by GET": ("/api/vote", None, 405),
    "unknown endpoint": ("/api/export", None, 404),
    "path outside the study": ("/../study.json", None, 404),
    "database by name": ("/votes.sqlite", None, 404),
    "image path traversal": ("/image/../votes.sqlite", None, 404),
    "encoded traversal": ("/image/%2e%2e%2fstudy.json", None, 404),
    "image by file name": ("/image/p00000_i000.png", None, 404),
    "image by sequential id": ("/image/1", None, 404),
    "huge image id": ("/image/99999999999999999999999", None, 404),
    "unicode digits": ("/image/%C2%B2", None, 404),
    "unknown image key": ("/image/" + "A" * 22, None, 404),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_and_lose_no_vote(served, case):
    client, study = served
    key = client.sign_in("ann")
    shown = client.next(key)
    client.vote(key, shown["showing"], answers(study))
    shown = client.next(key)
    before = study.votes()
    showings = study.db.execute("SELECT COUNT(*) FROM showings").fetchone()
    path, body, status = BAD_REQUESTS[case]
    if isinstance(body, dict):
        full = {"key": key, "showing": shown["showing"], "answers": answers(study)}
        full.update(body)
        if body.get("answers") == "sideways":
            full["answers"] = {a: "sideways" for a in study.aspects}
        got, payload = client.call(path, full)
    elif isinstance(body, bytes):
        got, payload = client.call(path, raw=body)
    else:
        got, payload = client.call(path)
    assert got == status, payload
    assert isinstance(payload, dict) and payload.get("error")
    assert study.votes() == before  # nothing stored, nothing lost
    assert study.db.execute("SELECT COUNT(*) FROM showings").fetchone() == showings  # no pair reserved either


def test_requests_from_other_sites_and_broken_bodies_are_refused(served):
    import http.client

    client, study = served
    key = client.sign_in("ann")
    shown = client.next(key)
    vote = json.dumps({"key": key, "showing": shown["showing"], "answers": answers(study)}).encode()
    # a page elsewhere can post text/plain without a preflight: refused; a DNS-rebinding page sends its own Host
    assert client.call("/api/vote", raw=vote, headers={"Content-Type": "text/plain"})[0] == 415
    assert client.call("/api/next", raw=b'{"key": "%s"}' % key.encode(), headers={"Content-Type": "text/plain"})[0] \
        == 415
    assert client.call("/api/study", headers={"Host": "evil.example:80"})[0] == 403
    host, port = client.base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)  # a negative length must not hang the server
    conn.putrequest("POST", "/api/vote")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", "-5")
    conn.endheaders()
    assert conn.getresponse().status == 400
    conn.close()
    assert study.votes() == []
    assert client.call("/api/vote", raw=vote)[0] == 200 and len(study.votes()) == 5


def test_a_second_vote_on_a_pair_and_a_vote_on_anothers_pair_are_refused(served):
    client, study = served
    ann = client.sign_in("ann")
    bob = client.sign_in("bob")
    shown = client.next(ann)
    assert client.vote(bob, shown["showing"], answers(study)) == 403
    assert client.vote(ann, shown["showing"], answers(study)) == 200
    assert client.vote(ann, shown["showing"], answers(study, "right")) == 409
    assert [v["choice"] for v in study.votes()] == ["left"] * 5


def test_exposing_the_server_needs_a_flag_and_a_token(tmp_path):
    study = Study(make_study(tmp_path))
    with pytest.raises(StudyError, match="--expose"):
        make_server(study, "0.0.0.0", 0)
    with pytest.raises(StudyError, match="token"):
        make_server(study, "0.0.0.0", 0, expose=True)
    # an empty token (an unset variable: --token "$TOKEN") turned off both the token and the localhost check
    with pytest.raises(StudyError, match="token is empty"):
        make_server(study, "127.0.0.1", 0, token="")
    with pytest.raises(StudyError, match="token is empty"):
        make_server(study, "0.0.0.0", 0, token="", expose=True)
    with pytest.raises(SystemExit, match="--token is empty"):
        human_eval.main(["serve", str(study.folder), "--port", "0", "--token", ""])
    server = make_server(study, "127.0.0.1", 0, token="s3cret")  # a token is enforced wherever it is set
    serve_in_thread(server)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert Client(base).call("/api/study")[0] == 403
        assert Client(base, "wrong").call("/api/study")[0] == 403
        assert Client(base, "s3cret").call("/api/study")[0] == 200
        assert Client(base).call("/api/study?token=s3cret")[0] == 200
        # the page without the token explains itself in words, not raw JSON
        status, page = Client(base).call("/")
        assert status == 403 and page.startswith(b"<!doctype html>") and b"full link you were given" in page
    finally:
        server.shutdown()
        server.server_close()
        study.close()


def test_a_study_made_before_image_and_rater_keys_gets_them_and_keeps_its_votes(tmp_path):
    study_dir = make_study(tmp_path)
    study = Study(study_dir)
    _fixed_table(study, [("old", "a", "b", "a")])
    study.close()
    db = sqlite3.connect(study_dir / "votes.sqlite")  # back to the schema of a study made before issue 29
    db.executescript("DROP INDEX images_key; ALTER TABLE images DROP COLUMN key; "
                     "ALTER TABLE raters DROP COLUMN key_hash;")
    db.close()
    study = Study(study_dir)
    keys = [k for (k,) in study.db.execute("SELECT key FROM images")]
    assert len(set(keys)) == 6 and all(IMAGE_URL.fullmatch(f"/image/{k}") for k in keys)
    rater, key = study.sign_in("old")  # the rater's first sign-in since: a key, and their progress
    assert study.progress(rater)["done"] == 1 and study.sign_in("old", key) == (rater, key)
    with pytest.raises(StudyError, match="another browser"):
        study.sign_in("old")
    assert len(study.votes()) == 5
    study.close()


def test_a_second_server_on_one_study_is_refused(tmp_path):
    """Two servers would each keep their own lock around the database and could hand a rater two showings."""
    study_dir = make_study(tmp_path)
    first, second = Study(study_dir), Study(study_dir)
    server = make_server(first, "127.0.0.1", 0)
    with pytest.raises(StudyError, match="another server is already serving"):
        make_server(second, "127.0.0.1", 0)
    server.server_close()
    first.close()  # the first server stopped: the study can be served again
    make_server(second, "127.0.0.1", 0).server_close()
    second.close()


def test_stalled_connections_are_closed_and_a_burst_waits_in_the_listen_queue(tmp_path):
    """Issue 29.5: half-sent requests held a thread each forever, and a listen queue of 5 reset or delayed bursts."""
    study = Study(make_study(tmp_path))
    server = make_server(study, "127.0.0.1", 0, timeout=0.5)
    address = server.server_address
    # Before the server accepts anything, 100 connections must complete TCP's handshake and wait in the listen
    # queue: past the queue's length Linux drops the SYN, and the client waits a second or more to try again.
    burst = []
    for _ in range(100):
        s = socket.socket()
        s.settimeout(0.5)
        s.connect(address)  # times out where the queue is full
        s.sendall(b"GET /api/study HTTP/1.0\r\nHost: localhost\r\n\r\n")
        burst.append(s)
    serve_in_thread(server)
    try:
        for s in burst:
            s.settimeout(10)
            assert s.makefile("rb").readline().startswith(b"HTTP/1.0 200")
            s.close()
        # stalled: a request line never ended, headers never ended, a body never sent (after its headers)
        stalled = []
        for partial in (b"GET /api/stu", b"POST /api/vote HTTP/1.1\r\nHost: localhost\r\n",
                        b"POST /api/vote HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"key\": "):
            for _ in range(10):
                s = socket.create_connection(address)
                s.sendall(partial)
                stalled.append((s, b"HTTP/1.0 408" if partial.endswith(b"{\"key\": ") else b""))
        base = f"http://127.0.0.1:{address[1]}"
        assert Client(base).call("/api/study")[0] == 200  # still answering meanwhile
        for s, expected in stalled:  # each is closed by the server (a body that never came gets a 408 first)
            s.settimeout(5)
            answer = s.makefile("rb").read()
            assert answer.startswith(expected) and (expected or answer == b""), answer
            s.close()
        assert study.votes() == []
        # a slow drip (a byte every 0.2 s, each within the socket timeout) is cut at the whole-request deadline
        s = socket.create_connection(address)
        start = time.monotonic()
        for byte in b"GET /api/study HTTP/1.0\r\nX-Slow: " + b"a" * 40:
            try:
                s.sendall(bytes([byte]))
            except OSError:  # the server closed it
                break
            time.sleep(0.2)
        s.settimeout(5)
        assert s.makefile("rb").read() == b"" and time.monotonic() - start < 3, time.monotonic() - start
        s.close()
        # HEAD and OPTIONS (a CORS preflight) get a 4xx, not the 501 of a method without a handler
        for method in ("HEAD", "OPTIONS"):
            s = socket.create_connection(address)
            s.sendall(f"{method} /api/vote HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            s.settimeout(5)
            assert s.makefile("rb").readline().startswith(b"HTTP/1.0 405"), method
            s.close()
    finally:
        server.shutdown()
        server.server_close()
        study.close()


def start_server(study_dir: Path, *extra) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline/human_eval.py"), "serve", str(study_dir),
                             *(extra or ("--port", "0"))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"(http://\S+)", line)
    if not match:
        proc.kill()
        raise AssertionError(f"the server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, match.group(1)


def test_votes_survive_a_killed_server_and_the_rater_continues(tmp_path):
    study_dir = make_study(tmp_path)
    proc, url = start_server(study_dir)
    try:
        client = Client(url.rstrip("/"))
        key = client.sign_in("ann")
        shown = client.next(key)
        client.vote(key, shown["showing"], answers(Study(study_dir)))
        pending = client.next(key)  # shown, not answered when the server dies
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc, url = start_server(study_dir)  # the killed server's lock went with it
    try:
        client = Client(url.rstrip("/"))
        assert client.call("/api/rater", {"name": "ann", "key": key})[1] == {"key": key, "progress": {
            "done": 1, "pairs": 3, "target_per_pair": 3, "answered_showings": 1}}
        again = client.next(key)
        assert again["showing"] == pending["showing"] and again["left"] == pending["left"]
        # a second server on the same study is refused with a one-line reason
        res = subprocess.run([sys.executable, str(ROOT / "pipeline/human_eval.py"), "serve", str(study_dir),
                              "--port", "0"], capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and "another server is already serving" in res.stderr
    finally:
        proc.terminate()
        proc.wait()
    assert len(Study(study_dir).votes()) == 5


def test_expose_prints_a_reachable_url_encoded_link(tmp_path):
    study_dir = make_study(tmp_path)
    # listening on every interface, with no token given: one is made
    proc, url = start_server(study_dir, "--host", "0.0.0.0", "--port", "0", "--expose")
    try:
        parts = urllib.parse.urlsplit(url)
        token = urllib.parse.parse_qs(parts.query)["token"][0]
        assert parts.hostname != "0.0.0.0"  # a wildcard address is nothing a rater can open: this machine's is
        assert len(token) >= 16 and Client(url.split("/?")[0]).call("/api/study")[0] == 403
        assert Client(url.split("/?")[0], token).call("/api/study")[0] == 200
        assert Client(url.rstrip("/")).call("")[0] == 200  # the printed link itself opens the page
    finally:
        proc.terminate()
        proc.wait()
    proc, url = start_server(study_dir, "--port", "0", "--token", "a+b&c=d/%#")  # a token that needs encoding
    try:
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(url).query) == {"token": ["a+b&c=d/%#"]}
        assert Client(url).call("")[0] == 200
    finally:
        proc.terminate()
        proc.wait()


def test_serve_refuses_a_public_address_without_expose(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "pipeline/human_eval.py"), "serve", str(make_study(tmp_path)),
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "--expose" in res.stderr


@pytest.mark.slow
def test_fifty_raters_at_once_lose_and_duplicate_no_vote(tmp_path):
    """50 raters start together, each signing in and answering 4 pairs, against the real server process; every vote
    lands exactly once. Prints the requests' latency (p50, p99), which the closing note of issue 29 quotes."""
    raters, rounds = 50, 4
    study_dir = make_study(tmp_path, prompts=[f"prompt {i}" for i in range(8)], aspects=["overall"])
    proc, url = start_server(study_dir)
    client = Client(url.rstrip("/"))
    latencies, failures, barrier = [], [], threading.Barrier(raters)

    def timed(path, body):
        t = time.perf_counter()
        status, res = client.call(path, body)
        latencies.append(time.perf_counter() - t)
        assert status == 200, (path, status, res)
        return res

    def rater(i):
        try:
            barrier.wait(timeout=30)
            key = timed("/api/rater", {"name": f"rater{i}"})["key"]
            for _ in range(rounds):
                shown = timed("/api/next", {"key": key})
                timed("/api/vote", {"key": key, "showing": shown["showing"], "answers": {"overall": "left"}})
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=rater, args=(i,), daemon=True) for i in range(raters)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120  # a hard bound: a hung server fails the test, it does not hang it
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "raters still waiting after 120 s"
    finally:
        proc.terminate()
        proc.wait()
    assert not failures, failures[:3]
    votes = Study(study_dir).votes()
    assert len(votes) == raters * rounds
    assert len({(v["rater"], v["pair"]) for v in votes}) == raters * rounds  # none twice
    assert {v["rater"] for v in votes} == {f"rater{i}" for i in range(raters)}
    p50, p99 = np.percentile(latencies, [50, 99])
    print(f"\n{raters} raters, {len(latencies)} requests: latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    assert len(latencies) == raters * (1 + 2 * rounds) and p99 < 5.0  # loose: ~0.2 s measured on 2 busy cores


# --- statistics ----------------------------------------------------------------------------------------------------

def test_wilson_interval_matches_the_textbook_values():
    lo, hi = wilson(8, 10)  # Wilson (1927); e.g. Newcombe (1998), Table I: 8/10 → 0.4902, 0.9433
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)


def test_wilson_interval_always_holds_its_proportion():
    """Issue 29.2: the upper bound of a unanimous 1.0 came out as 0.9999999999999999, and the plot's error bar below
    it (1.0 - 0.99…) was negative: results crashed on the first realistic study."""
    for n in range(1, 500):
        for successes in (0, 0.5, n / 2, n - 0.5, n):
            lo, hi = wilson(successes, n)
            assert 0.0 <= lo <= successes / n <= hi <= 1.0, (successes, n, lo, hi)


def test_krippendorff_alpha_on_krippendorffs_own_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", nominal example: 4 coders, 12 units, α = 0.743
    units = [[1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4], [4, 4, 4, 4],
             [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3]]
    assert round(krippendorff_alpha(units), 3) == 0.743
    assert krippendorff_alpha([[1, 1], [1, 1]]) is None  # one category: no disagreement to expect


def test_bradley_terry_equals_the_maximum_likelihood_fit():
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    strength = np.array([0.8, 0.0, -0.5, -1.0])
    rows = []
    for _ in range(400):
        i, j = rng.choice(4, 2, replace=False)
        p = 1 / (1 + np.exp(strength[j] - strength[i]))
        rows.append((i, j, 1.0 if rng.random() < p else 0.0))
    data = np.array(rows)
    got = bradley_terry(data, 4, prior=0.0)

    def nll(theta):
        d = theta[data[:, 0].astype(int)] - theta[data[:, 1].astype(int)]
        return -(data[:, 2] * -np.logaddexp(0, -d) + (1 - data[:, 2]) * -np.logaddexp(0, d)).sum()

    ref = minimize(nll, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(got, ref - ref.mean(), atol=1e-5)
    assert list(np.argsort(-got)) == [0, 1, 2, 3]
    # a system that won every game still gets a finite score with the prior
    assert np.isfinite(bradley_terry(np.array([[0, 1, 1.0]] * 5), 2)).all()


def simulated_votes(systems: list[str], raters: str, units: int = 1000, per_pair: int = 3, seed: int = 0):
    """``per_pair`` raters judging every pair of ``units // pairs of systems`` prompts. "random": each answer drawn
    uniformly from first, second, tie. "unanimous": every rater names the better system of a fixed order in which
    systems[1] beats everyone and the others follow in study order (so the winner is sometimes the pair's first
    system, sometimes its second)."""
    rng = np.random.default_rng(seed)
    order = [systems[1], systems[0], *systems[2:]]
    pairs = list(combinations(systems, 2))
    votes, pair = [], 0
    for _ in range(-(-units // len(pairs))):
        for a, b in pairs:
            pair += 1
            for r in range(per_pair):
                winner = rng.choice([a, b, "tie"]) if raters == "random" else min(a, b, key=order.index)
                votes.append(Vote(f"r{r}", pair, (a, b), "overall", str(winner)))
    return votes, order


@pytest.mark.parametrize("raters", ["random", "unanimous"])
@pytest.mark.parametrize("num_systems", [2, 3, 5])
def test_statistics_of_simulated_raters(num_systems, raters, tmp_path):
    """Issue 29.3: α was computed on the winners' names pooled over pairs, so random raters scored 0.079 with three
    systems and 0.174 with five. Random raters must get α ≈ 0, win rates ≈ ½ and a flat ranking; unanimous ones
    α = 1 (or no α at all where every answer is the same), win rates of 0 or 1 with intervals that still make sense,
    the true order, and a plot."""
    systems = [f"s{i}" for i in range(num_systems)]
    votes, order = simulated_votes(systems, raters)
    rates = win_rates(votes, systems, ["overall"])
    ranks = ranking(votes, systems, "overall", bootstrap=20)
    (agree,) = agreement(votes, ["overall"])
    assert len(rates) == num_systems * (num_systems - 1) // 2 and len(ranks) == num_systems
    for r in rates:
        assert 0.0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1.0
        assert 0.0 < r["ci_high"] - r["ci_low"] < 4 / r["votes"] ** 0.5  # not degenerate, not vacuous
    for r in ranks:
        assert np.isfinite([r["bt_score"], r["ci_low"], r["ci_high"]]).all()
        assert r["ci_low"] <= r["bt_score"] <= r["ci_high"]
    if raters == "random":
        assert abs(agree["krippendorff_alpha"]) < 0.03, agree
        assert agree["percent_agreement"] == pytest.approx(1 / 3, abs=0.03)
        assert all(abs(r["win_rate"] - 0.5) < 4 * 0.5 / r["votes"] ** 0.5 for r in rates)
        assert all(abs(r["bt_score"]) < 0.2 for r in ranks)
    else:
        assert agree["percent_agreement"] == 1.0
        # two systems: the same answer everywhere, so no disagreement to expect and α undefined (None)
        assert agree["krippendorff_alpha"] == (None if num_systems == 2 else 1.0)
        assert all(r["win_rate"] == float(order.index(r["system"]) < order.index(r["opponent"])) for r in rates)
        assert [r["system"] for r in ranks] == order
        assert all(a["ci_low"] > b["ci_high"] for a, b in zip(ranks, ranks[1:]))  # the order is certain
    result = {"study": "simulated", "aspects": ["overall"], "votes": len(votes), "raters": 3, "win_rates": rates}
    human_eval.plot(result, tmp_path / "win_rates.png")
    assert Image.open(tmp_path / "win_rates.png").size[0] > 200


def _fixed_table(study: Study, table: list[tuple[str, str, str, str]]):
    """Cast votes (rater, system_a, system_b, winner or "tie") through Study.record, on a pair of those two systems
    the rater has not judged, shown with sides at random; the choice clicked (for every aspect) is the side where
    the winner is."""
    import random

    rng = random.Random(0)
    ids = {}
    for name, a, b, winner in table:
        if name not in ids:
            ids[name] = study.sign_in(name)[0]
        rater = ids[name]
        pair = study.db.execute(
            "SELECT id FROM pairs WHERE ((system_a = ? AND system_b = ?) OR (system_a = ? AND system_b = ?)) AND id "
            "NOT IN (SELECT pair FROM showings WHERE rater = ?) ORDER BY id LIMIT 1", (a, b, b, a, rater)).fetchone()[0]
        left, right = (a, b) if rng.random() < 0.5 else (b, a)
        showing = study.db.execute("INSERT INTO showings (rater, pair, left_system, right_system, shown) VALUES "
                                   "(?, ?, ?, ?, ?)", (rater, pair, left, right, time.time())).lastrowid
        choice = "tie" if winner == "tie" else "left" if winner == left else "right"
        study.record(rater, showing, {aspect: choice for aspect in study.aspects})


def test_results_reproduce_a_hand_computed_win_rate_interval_and_ranking(tmp_path):
    prompts = [f"prompt {i}" for i in range(10)]
    study_dir = make_study(tmp_path, systems=("a", "b"), prompts=prompts, aspects=["overall"])
    study = Study(study_dir)
    # 10 votes of a vs b: 7 wins, 2 ties, 1 loss → (7 + ½·2)/10 = 0.8, Wilson on 8 of 10: [0.4902, 0.9433]
    _fixed_table(study, [(f"r{i}", "a", "b", w) for i, w in enumerate(["a"] * 7 + ["tie"] * 2 + ["b"])])
    lefts = [v["left"] for v in study.votes()]
    assert 0 < lefts.count("a") < 10  # both sides were shown
    study.close()
    result = human_eval.main(["results", str(study_dir), "--json"])
    (row,) = result["win_rates"]
    assert (row["system"], row["opponent"], row["wins"], row["ties"], row["losses"]) == ("a", "b", 7, 2, 1)
    assert row["win_rate"] == pytest.approx(0.8) and (round(row["ci_low"], 4), round(row["ci_high"], 4)) == \
        (0.4902, 0.9433)
    out = study_dir / "results"
    votes_csv = (out / "votes.csv").read_text().splitlines()
    assert votes_csv[0].startswith("vote,rater,pair,prompt,seed,system_a,system_b,left,right,aspect,choice,winner")
    assert len(votes_csv) == 11
    assert Image.open(out / "win_rates.png").size[0] > 200
    assert result["ranking"] == [] and not (out / "ranking.csv").exists()  # two systems: the win rate says it all


def test_results_when_one_system_wins_every_vote(tmp_path):
    """Issue 29.2, end to end: a study where one system wins every vote gets its results, plot included."""
    study_dir = make_study(tmp_path, systems=("a", "b"), prompts=[f"prompt {i}" for i in range(7)])
    study = Study(study_dir)
    _fixed_table(study, [(f"r{i}", "a", "b", "a") for i in range(7)])
    study.close()
    result = human_eval.main(["results", str(study_dir), "--json"])
    assert all(r["win_rate"] == 1.0 and r["ci_high"] == 1.0 and r["ci_low"] < 1.0 for r in result["win_rates"])
    assert Image.open(study_dir / "results" / "win_rates.png").size[0] > 200


def test_results_rank_three_systems_and_measure_agreement(tmp_path):
    study_dir = make_study(tmp_path, systems=("a", "b", "c"), prompts=["p0", "p1"], aspects=["overall"])
    study = Study(study_dir)
    table = [("r1", "a", "b", "a"), ("r1", "b", "c", "b"), ("r1", "a", "c", "a"),
             ("r2", "a", "b", "a"), ("r2", "b", "c", "c"), ("r2", "a", "c", "a")]
    _fixed_table(study, table)
    study.close()
    result = human_eval.main(["results", str(study_dir), "--json", "--bootstrap", "50"])
    assert [r["system"] for r in result["ranking"]][0] == "a"
    assert all(r["ci_low"] <= r["bt_score"] <= r["ci_high"] for r in result["ranking"])
    (agree,) = result["agreement"]
    assert agree["pairs_with_2_or_more_raters"] >= 1 and agree["percent_agreement"] is not None
    # every file results writes is described on the study's page (issue 29.11)
    written = sorted(p.name for p in (study_dir / "results").iterdir())
    assert written == ["agreement.csv", "ranking.csv", "results.json", "votes.csv", "win_rates.csv", "win_rates.png"]
    doc = (ROOT / "docs" / "human_study.md").read_text()
    assert all(f"`{name}`" in doc for name in written)
    assert re.search(r"`ranking.csv`[^.]*three or more systems", doc)


def test_csv_cells_that_spreadsheets_would_run_as_formulas_are_neutralised(tmp_path):
    """Issue 29.8: rater names (and prompts) beginning with = + - @ went into votes.csv as formulas."""
    import csv

    prompts = ["=HYPERLINK(\"http://evil.example\")", "-2+3", "a plain prompt"]
    study_dir = make_study(tmp_path, prompts=prompts, aspects=["overall"])
    study = Study(study_dir)
    names = ["=1+1", "+cmd", "-sum", "@SUM(A1)", "ann"]
    _fixed_table(study, [(name, "a", "b", "a") for name in names])
    study.close()
    human_eval.main(["results", str(study_dir)])
    rows = list(csv.DictReader(open(study_dir / "results" / "votes.csv", newline="")))
    assert sorted(r["rater"] for r in rows) == sorted("'" + n if n != "ann" else n for n in names)
    assert all(r["prompt"][0] not in "=+-@" for r in rows)
    assert {v["rater"] for v in Study(study_dir).votes()} == set(names)  # the database keeps them as they were


def test_agreement_counts_the_system_chosen_not_the_side():
    votes = [Vote("r1", 1, ("a", "b"), "overall", "a"), Vote("r2", 1, ("a", "b"), "overall", "a"),
             Vote("r1", 2, ("a", "b"), "overall", "b"), Vote("r2", 2, ("a", "b"), "overall", "a")]
    (row,) = agreement(votes, ["overall"])
    assert row["percent_agreement"] == 0.5 and row["pairs_with_2_or_more_raters"] == 2
    assert ranking(votes, ["a", "b"], "overall", bootstrap=0)[0]["system"] == "a"


# --- the page in a real browser ------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the page's tests (Debian's package, driven by Playwright: nothing downloaded)."""
    if CHROMIUM is None:
        pytest.skip("needs Chromium (Debian: apt-get install chromium; .ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with playwright.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def served_page(tmp_path, browser):
    """(page factory, study) for a study of three prompts and two systems served from this process."""
    study = Study(make_study(tmp_path))
    server = make_server(study, "127.0.0.1", 0)
    serve_in_thread(server)
    contexts = []

    def open_page(**context_options):
        contexts.append(browser.new_context(**context_options))
        page = contexts[-1].new_page()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        return page

    yield open_page, study
    for context in contexts:
        context.close()
    server.shutdown()
    server.server_close()
    study.close()


def sign_in(page, name="ann"):
    page.fill("#name", name)
    page.click("#start")
    wait_until_ready(page)


def wait_until_ready(page):
    """Until both images of the pair on screen are shown and the answer buttons work (they start disabled)."""
    from playwright.sync_api import expect

    expect(page.locator("#judge")).to_be_visible()
    expect(page.locator("#aspects button").first).to_be_enabled()


@pytest.mark.slow
def test_page_in_headless_chromium_a_full_blind_study_through_a_server_restart(tmp_path, browser):
    from playwright.sync_api import expect

    study_dir = make_study(tmp_path, systems=("sysone", "systwo"))
    proc, url = start_server(study_dir, "--port", "0", "--token", "tok3n")  # the link carries the token
    assert url.endswith("?token=tok3n")
    requests, responses, answered = [], [], []
    try:
        context = browser.new_context()
        page = context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("response", lambda r: responses.append(r) if "/api/" in r.url else None)

        def read_answers():  # the API's answers, read before the page moves on
            answered.extend(r.json() for r in responses)
            responses.clear()

        page.goto(url.split("?")[0])  # without the token: a sentence, not raw JSON
        expect(page.locator("body")).to_contain_text("needs the full link you were given")
        page.goto(url)
        # the start page says what a tie means and how long the study is
        expect(page.locator("#login")).to_contain_text("Tie when neither is better")
        expect(page.locator("#length")).to_contain_text("3 pairs with 5 questions each")
        page.fill("#name", "ann")
        page.keyboard.press("Enter")
        wait_until_ready(page)
        assert page.text_content("#prompt") in PROMPTS
        expect(page.locator("#left")).to_have_attribute("src", re.compile(r"^/image/[A-Za-z0-9_-]{22}\?token=tok3n$"))
        assert page.locator("#left").evaluate("img => img.complete && img.naturalWidth") == 16  # the PNG shows
        # first pair by keyboard: left, right, tie, left, right; then Enter
        for key in ["1", "ArrowRight", "2", "ArrowLeft", "3"]:
            page.keyboard.press(key)
        page.keyboard.press("Enter")
        expect(page.locator("#progress")).to_have_text("Judged 1 of 3 pairs")
        wait_until_ready(page)
        read_answers()
        votes = Study(study_dir).votes()
        want = {"relevance": "left", "aesthetics": "right", "complexity": "tie", "defects": "left", "overall": "right"}
        assert {v["aspect"]: v["choice"] for v in votes} == want
        assert all(v["winner"] == (v[v["choice"]] if v["choice"] != "tie" else "tie") for v in votes)

        # the server dies with the second pair on screen: the answers stay, the rater is told what to do
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for row in page.locator("#aspects .aspect").all():  # second pair by clicking: every aspect "left"
            row.locator("button[data-choice=left]").click()
        page.click("#submit")
        expect(page.locator("#error")).to_contain_text("Cannot reach the study server")
        expect(page.locator("#error")).to_contain_text("press Submit again")
        assert "Failed to fetch" not in page.text_content("#error")
        assert page.locator("#aspects button.chosen").count() == 5
        port = str(urllib.parse.urlsplit(url).port)
        proc, url = start_server(study_dir, "--port", port, "--token", "tok3n")
        page.click("#submit")
        expect(page.locator("#progress")).to_have_text("Judged 2 of 3 pairs")
        wait_until_ready(page)
        expect(page.locator("#error")).to_be_empty()
        read_answers()
        assert len(Study(study_dir).votes()) == 10

        page.goto(url)  # a reload (same browser): the name and key are remembered, the third pair comes back
        expect(page.locator("#name")).to_have_value("ann")  # restored once the page has read the study (async)
        page.click("#start")
        expect(page.locator("#progress")).to_have_text("Judged 2 of 3 pairs")
        wait_until_ready(page)
        for _ in study_aspects(study_dir):
            page.keyboard.press("ArrowDown")
        page.keyboard.press("Enter")
        page.wait_for_selector("#done:not(.hidden)")
        read_answers()
        context.close()
    finally:
        proc.terminate()
        proc.wait()
    result = human_eval.main(["results", str(study_dir), "--json"])
    assert result["votes"] == 15 and result["raters"] == 1 and result["pairs_judged"] == 3
    # blind: no address the page asked for, and no field of any answer, tells the systems apart
    for address in requests:
        parts = urllib.parse.urlsplit(address)
        assert parts.path in ("/", "/api/study", "/api/rater", "/api/next", "/api/vote") or \
            IMAGE_URL.fullmatch(parts.path), address
        assert parts.query in ("", "token=tok3n"), address
    shown = [a for a in answered if "showing" in a]
    assert len(shown) == 4 and all(set(a) == {"showing", "prompt", "left", "right", "progress"} for a in shown)
    assert not any(name in json.dumps(answered) for name in ("sysone", "systwo"))


def test_page_takes_no_answer_until_both_new_images_are_shown(served_page):
    """Issue 29.6: on a slow network the prompt changed at once while the previous images stayed, and the keys and
    Submit already worked. Here the new pair's two images are held back (Playwright's route interception)."""
    from playwright.sync_api import expect

    open_page, study = served_page
    page = open_page()
    held = []
    page.route(re.compile(r"/image/"), lambda route: held.append(route))

    def refuses_answers():
        expect(page.locator("#loading")).to_be_visible()
        expect(page.locator("#prompt")).not_to_be_visible()  # neither the new prompt nor the old images
        expect(page.locator("#left")).not_to_be_visible()
        for key in ["1", "2", "3", "Enter"]:
            page.keyboard.press(key)
        assert page.locator("#aspects button.chosen").count() == 0
        assert page.locator("#aspects button:enabled").count() == 0 and page.locator("#submit").is_disabled()

    def arrive_one_by_one():
        deadline = time.monotonic() + 10
        while len(held) < 2 and time.monotonic() < deadline:
            page.wait_for_timeout(20)
        assert len(held) == 2
        refuses_answers()
        held.pop(0).continue_()  # one image arrives: still nothing
        page.wait_for_timeout(300)
        refuses_answers()
        held.pop(0).continue_()
        wait_until_ready(page)
        expect(page.locator("#left")).to_be_visible()
        expect(page.locator("#prompt")).to_be_visible()
        assert page.locator("#right").evaluate("img => img.complete && img.naturalWidth") == 16

    page.fill("#name", "ann")
    page.click("#start")
    arrive_one_by_one()  # the first pair, after signing in
    for _ in study.aspects:
        page.keyboard.press("1")
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_have_text("Judged 1 of 3 pairs")
    arrive_one_by_one()  # the next pair, after a vote: the previous images must not be judged under its prompt
    for _ in study.aspects:
        page.keyboard.press("3")
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_have_text("Judged 2 of 3 pairs")
    assert [v["choice"] for v in study.votes()] == ["left"] * 5 + ["right"] * 5


def test_page_on_a_phone(served_page):
    """Issue 29.10: on a phone Submit started below the first screen, the page stayed scrolled down after a vote
    (next prompt and progress off screen), and the Tie button was 31 px tall."""
    from playwright.sync_api import expect

    open_page, study = served_page
    width, height = 375, 560  # an iPhone SE's screen less the browser's bars, in CSS px
    page = open_page(viewport={"width": width, "height": height}, is_mobile=True, has_touch=True,
                     device_scale_factor=2)
    page.fill("#name", "ann")
    page.tap("#start")
    wait_until_ready(page)
    for step in range(2):
        assert page.evaluate("window.scrollY") == 0
        box = page.locator("#submit").bounding_box()
        assert box["y"] + box["height"] <= height, box  # on the first screen
        for button in page.locator("#aspects button").all():  # touch targets of 44 CSS px (WCAG 2.5.5)
            b = button.bounding_box()
            assert b["height"] >= 44 and b["width"] >= 44, b
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # nothing sideways
        # the page is longer than the screen, so the rater scrolls down to answer the last questions
        assert page.evaluate("document.documentElement.scrollHeight") > height
        for row in page.locator("#aspects .aspect").all():
            row.locator("button[data-choice=tie]").tap()
        page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
        assert page.evaluate("window.scrollY") > 0
        page.tap("#submit")
        expect(page.locator("#progress")).to_have_text(f"Judged {step + 1} of 3 pairs")
        wait_until_ready(page)
    assert page.locator("#prompt").bounding_box()["y"] >= 0 and page.evaluate("window.scrollY") == 0
    assert [v["choice"] for v in study.votes()] == ["tie"] * 10


def study_aspects(study_dir: Path) -> list[str]:
    return list(json.loads((study_dir / "study.json").read_text())["aspects"])
