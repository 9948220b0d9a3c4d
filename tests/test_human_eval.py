"""The human side-by-side study: creating it, the server's API and its refusals, votes surviving a killed server,
the statistics against hand computations, and the page driven by a real headless Chromium."""

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metrics.preference import Vote, agreement, bradley_terry, krippendorff_alpha, ranking, wilson
from pipeline import human_eval
from study.server import make_server
from study.store import Study, StudyError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


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
                payload = r.read()
                return r.status, json.loads(payload) if r.headers["Content-Type"] == "application/json" else payload
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def served(tmp_path):
    study_dir = make_study(tmp_path)
    study = Study(study_dir)
    server = make_server(study, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Client(f"http://127.0.0.1:{server.server_address[1]}"), study
    server.shutdown()
    server.server_close()
    study.close()


def _vote_count(study: Study) -> int:
    return len(study.votes())


def answers(study, choice="left"):
    return {a: choice for a in study.aspects}


# --- creating a study ----------------------------------------------------------------------------------------------

def test_create_from_image_folders_copies_every_image_into_the_study(tmp_path):
    study_dir = make_study(tmp_path, systems=("a", "b", "c"))
    study = Study(study_dir)
    assert study.systems == ["a", "b", "c"] and study.num_pairs == 3 * 3  # 3 prompts × 3 pairs of systems
    assert list(study.aspects) == ["relevance", "aesthetics", "complexity", "defects", "overall"]
    shutil.rmtree(tmp_path / "sys_a")  # self-contained: the sources can go
    for image_id in range(1, 10):
        assert study.image_path(str(image_id)).is_relative_to(study_dir)


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


# --- the server ----------------------------------------------------------------------------------------------------

def test_api_round_trip_stores_the_sides_shown_and_the_winner(served):
    client, study = served
    status, info = client.call("/api/study")
    assert status == 200 and info["pairs"] == 3 and "overall" in info["aspects"]
    _, r = client.call("/api/rater", {"name": "ann"})
    rater = r["rater"]
    _, shown = client.call(f"/api/next?rater={rater}")
    assert shown["prompt"] in PROMPTS and re.fullmatch(r"/image/\d+", shown["left"])  # blind: no system names
    assert set(shown) == {"showing", "pair", "prompt", "left", "right", "progress"}
    status, png = client.call(shown["left"])
    assert status == 200 and png[:4] == b"\x89PNG"
    # a reload shows the same pair, same sides
    assert client.call(f"/api/next?rater={rater}")[1] == shown
    choice = {"relevance": "left", "aesthetics": "right", "complexity": "tie", "defects": "left", "overall": "right"}
    status, res = client.call("/api/vote", {"rater": rater, "showing": shown["showing"], "answers": choice})
    assert status == 200 and res["progress"]["done"] == 1
    votes = {v["aspect"]: v for v in study.votes()}
    left, right = votes["overall"]["left"], votes["overall"]["right"]
    assert {left, right} == {"a", "b"} and votes["overall"]["rater"] == "ann"
    assert votes["relevance"]["winner"] == left and votes["overall"]["winner"] == right
    assert votes["complexity"]["winner"] == "tie" and votes["complexity"]["choice"] == "tie"
    assert all(v["time"] > 0 for v in votes.values())


def test_pairs_go_to_raters_so_that_each_gets_votes(served):
    client, study = served
    raters = [client.call("/api/rater", {"name": n})[1]["rater"] for n in ("ann", "bob", "cat")]
    seen = []
    for rater in raters:  # three raters, three pairs: the fewest-answered pair first, so each rater starts elsewhere
        _, shown = client.call(f"/api/next?rater={rater}")
        seen.append(shown["pair"])
        client.call("/api/vote", {"rater": rater, "showing": shown["showing"], "answers": answers(study)})
    assert len(set(seen)) == 3
    for _ in range(2):  # a rater never sees a pair twice, and is told when every pair is done
        _, shown = client.call(f"/api/next?rater={raters[0]}")
        assert shown["pair"] != seen[0]
        client.call("/api/vote", {"rater": raters[0], "showing": shown["showing"], "answers": answers(study)})
    assert client.call(f"/api/next?rater={raters[0]}")[1]["done"] is True


BAD_REQUESTS = {
    "malformed json": ("/api/vote", b"{not json", 400),
    "body not an object": ("/api/vote", b"[1, 2]", 400),
    "unknown showing": ("/api/vote", {"showing": 9999}, 404),
    "showing not an int": ("/api/vote", {"showing": "1; DROP TABLE votes"}, 400),
    "unknown rater": ("/api/vote", {"rater": 777}, 404),
    "missing aspect": ("/api/vote", {"answers": {"overall": "left"}}, 400),
    "unknown aspect": ("/api/vote", {"answers": {"overall": "left", "speed": "left"}}, 400),
    "answers not an object": ("/api/vote", {"answers": "left"}, 400),
    "bad choice value": ("/api/vote", {"answers": "sideways"}, 400),
    "huge showing id": ("/api/vote", {"showing": 10**30}, 400),
    "huge rater id": ("/api/vote", {"rater": -(10**30)}, 400),
    "huge rater in query": ("/api/next?rater=99999999999999999999999", None, 400),
    "huge image id": ("/image/99999999999999999999999", None, 404),
    "unicode digits": ("/image/%C2%B2", None, 404),
    "empty rater name": ("/api/rater", {"name": ""}, 400),
    "rater not an int": ("/api/next?rater=abc", None, 400),
    "unknown endpoint": ("/api/export", None, 404),
    "path outside the study": ("/../study.json", None, 404),
    "database by name": ("/votes.sqlite", None, 404),
    "image path traversal": ("/image/../votes.sqlite", None, 404),
    "encoded traversal": ("/image/%2e%2e%2fstudy.json", None, 404),
    "image by file name": ("/image/p00000_i000.png", None, 404),
    "unknown image": ("/image/12345", None, 404),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_and_lose_no_vote(served, case):
    client, study = served
    rater = client.call("/api/rater", {"name": "ann"})[1]["rater"]
    shown = client.call(f"/api/next?rater={rater}")[1]
    client.call("/api/vote", {"rater": rater, "showing": shown["showing"], "answers": answers(study)})
    shown = client.call(f"/api/next?rater={rater}")[1]
    before = study.votes()
    path, body, status = BAD_REQUESTS[case]
    if isinstance(body, dict):
        full = {"rater": rater, "showing": shown["showing"], "answers": answers(study)}
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


def test_requests_from_other_sites_and_broken_bodies_are_refused(served):
    import http.client

    client, study = served
    rater = client.call("/api/rater", {"name": "ann"})[1]["rater"]
    shown = client.call(f"/api/next?rater={rater}")[1]
    vote = json.dumps({"rater": rater, "showing": shown["showing"], "answers": answers(study)}).encode()
    # a page elsewhere can post text/plain without a preflight: refused; a DNS-rebinding page sends its own Host
    assert client.call("/api/vote", raw=vote, headers={"Content-Type": "text/plain"})[0] == 415
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
    ann = client.call("/api/rater", {"name": "ann"})[1]["rater"]
    bob = client.call("/api/rater", {"name": "bob"})[1]["rater"]
    shown = client.call(f"/api/next?rater={ann}")[1]
    assert client.call("/api/vote", {"rater": bob, "showing": shown["showing"], "answers": answers(study)})[0] == 403
    assert client.call("/api/vote", {"rater": ann, "showing": shown["showing"], "answers": answers(study)})[0] == 200
    assert client.call("/api/vote", {"rater": ann, "showing": shown["showing"],
                                     "answers": answers(study, "right")})[0] == 409
    assert [v["choice"] for v in study.votes()] == ["left"] * 5


def test_exposing_the_server_needs_a_flag_and_a_token(tmp_path):
    study = Study(make_study(tmp_path))
    with pytest.raises(StudyError, match="--expose"):
        make_server(study, "0.0.0.0", 0)
    with pytest.raises(StudyError, match="token"):
        make_server(study, "0.0.0.0", 0, expose=True)
    server = make_server(study, "127.0.0.1", 0, token="s3cret")  # a token is enforced wherever it is set
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert Client(base).call("/api/study")[0] == 403
        assert Client(base, "wrong").call("/api/study")[0] == 403
        assert Client(base, "s3cret").call("/api/study")[0] == 200
        assert Client(base).call("/api/study?token=s3cret")[0] == 200
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
        rater = client.call("/api/rater", {"name": "ann"})[1]["rater"]
        shown = client.call(f"/api/next?rater={rater}")[1]
        client.call("/api/vote", {"rater": rater, "showing": shown["showing"], "answers": answers(Study(study_dir))})
        pending = client.call(f"/api/next?rater={rater}")[1]  # shown, not answered when the server dies
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc, url = start_server(study_dir)
    try:
        client = Client(url.rstrip("/"))
        assert client.call("/api/rater", {"name": "ann"})[1] == {"rater": rater, "progress": {
            "done": 1, "pairs": 3, "target_per_pair": 3, "answered_showings": 1}}
        again = client.call(f"/api/next?rater={rater}")[1]
        assert again["showing"] == pending["showing"] and again["left"] == pending["left"]
    finally:
        proc.terminate()
        proc.wait()
    assert len(Study(study_dir).votes()) == 5


def test_expose_without_a_token_makes_one_and_prints_it_in_the_link(tmp_path):
    proc, url = start_server(make_study(tmp_path), "--port", "0", "--expose")
    try:
        token = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["token"][0]
        base = url.split("/?")[0]
        assert len(token) >= 16 and Client(base).call("/api/study")[0] == 403
        assert Client(base, token).call("/api/study")[0] == 200
    finally:
        proc.terminate()
        proc.wait()


def test_serve_refuses_a_public_address_without_expose(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "pipeline/human_eval.py"), "serve", str(make_study(tmp_path)),
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "--expose" in res.stderr


# --- statistics ----------------------------------------------------------------------------------------------------

def test_wilson_interval_matches_the_textbook_values():
    lo, hi = wilson(8, 10)  # Wilson (1927); e.g. Newcombe (1998), Table I: 8/10 → 0.4902, 0.9433
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson(10, 10) == (pytest.approx(0.7225, abs=1e-4), pytest.approx(1.0))


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


def _fixed_table(study: Study, table: list[tuple[str, str, str, str]], aspect="overall"):
    """Cast votes (rater, system_a, system_b, winner or "tie") through Study.record, on a pair of those two systems
    the rater has not judged, shown with sides at random; the choice clicked is the side where the winner is."""
    import random

    rng = random.Random(0)
    for name, a, b, winner in table:
        rater = study.rater(name)
        pair = study.db.execute(
            "SELECT id FROM pairs WHERE ((system_a = ? AND system_b = ?) OR (system_a = ? AND system_b = ?)) AND id "
            "NOT IN (SELECT pair FROM showings WHERE rater = ?) ORDER BY id LIMIT 1", (a, b, b, a, rater)).fetchone()[0]
        left, right = (a, b) if rng.random() < 0.5 else (b, a)
        showing = study.db.execute("INSERT INTO showings (rater, pair, left_system, right_system, shown) VALUES "
                                   "(?, ?, ?, ?, ?)", (rater, pair, left, right, time.time())).lastrowid
        study.record(rater, showing, {aspect: "tie" if winner == "tie" else "left" if winner == left else "right"})


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
    assert result["ranking"] == []  # two systems: the win rate says it all


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
    assert (study_dir / "results" / "ranking.csv").is_file()
    (agree,) = result["agreement"]
    assert agree["pairs_with_2_or_more_raters"] >= 1 and agree["percent_agreement"] is not None


def test_agreement_counts_the_system_chosen_not_the_side():
    votes = [Vote("r1", 1, ("a", "b"), "overall", "a"), Vote("r2", 1, ("a", "b"), "overall", "a"),
             Vote("r1", 2, ("a", "b"), "overall", "b"), Vote("r2", 2, ("a", "b"), "overall", "a")]
    (row,) = agreement(votes, ["overall"])
    assert row["percent_agreement"] == 0.5 and row["pairs_with_2_or_more_raters"] == 2
    assert ranking(votes, ["a", "b"], "overall", bootstrap=0)[0]["system"] == "a"


# --- the page in a real browser ------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium; .ci/run installs it)")
def test_page_in_headless_chromium_votes_land_and_a_restarted_server_continues(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    expect = playwright.expect
    study_dir = make_study(tmp_path)
    proc, url = start_server(study_dir, "--port", "0", "--token", "tok3n")  # the link carries the token
    assert url.endswith("?token=tok3n")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    try:
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
            context = browser.new_context()
            page = context.new_page()
            page.goto(url)
            page.fill("#name", "ann")
            page.keyboard.press("Enter")
            page.wait_for_selector("#judge:not(.hidden)")
            assert page.text_content("#prompt") in PROMPTS
            expect(page.locator("#left")).to_have_attribute("src", re.compile(r"^/image/\d+\?token=tok3n$"))
            page.wait_for_load_state("load")
            assert page.locator("#left").evaluate("img => img.complete && img.naturalWidth") == 16  # the PNG shows
            # first pair by keyboard: left, right, tie, left, right; then Enter
            for key in ["1", "ArrowRight", "2", "ArrowLeft", "3"]:
                page.keyboard.press(key)
            page.keyboard.press("Enter")
            expect(page.locator("#progress")).to_have_text("Judged 1 of 3 pairs")
            # second pair by clicking: every aspect "left"
            for row in page.query_selector_all("#aspects tr"):
                row.query_selector("button[data-choice=left]").click()
            page.click("#submit")
            expect(page.locator("#progress")).to_have_text("Judged 2 of 3 pairs")
            votes = Study(study_dir).votes()
            assert len(votes) == 10 and {v["rater"] for v in votes} == {"ann"}
            first = {v["aspect"]: v for v in votes if v["pair"] == votes[0]["pair"]}
            want = {"relevance": "left", "aesthetics": "right", "complexity": "tie", "defects": "left",
                    "overall": "right"}
            assert {a: v["choice"] for a, v in first.items()} == want
            assert all(v["winner"] == (v[v["choice"]] if v["choice"] != "tie" else "tie") for v in votes)

            proc.send_signal(signal.SIGKILL)  # mid-study: the third pair is on screen, unanswered
            proc.wait()
            port = str(urllib.parse.urlsplit(url).port)
            proc, url = start_server(study_dir, "--port", port, "--token", "tok3n")  # same origin: same storage
            page.goto(url)  # same browser: the name is remembered
            assert page.input_value("#name") == "ann"
            page.click("#start")
            expect(page.locator("#progress")).to_have_text("Judged 2 of 3 pairs")
            for _ in study_aspects(study_dir):
                page.keyboard.press("ArrowDown")
            page.keyboard.press("Enter")
            page.wait_for_selector("#done:not(.hidden)")
            browser.close()
    finally:
        proc.terminate()
        proc.wait()
    result = human_eval.main(["results", str(study_dir), "--json"])
    assert result["votes"] == 15 and result["raters"] == 1 and result["pairs_judged"] == 3


def study_aspects(study_dir: Path) -> list[str]:
    return list(json.loads((study_dir / "study.json").read_text())["aspects"])
