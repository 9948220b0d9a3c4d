"""Human side-by-side study: create it, serve it to raters on a local web page, and read the results.

    python pipeline/human_eval.py create --out study/ --prompts held_out.txt --num-prompts 50 \\
        --system base=runs/demo/model@guidance=3 --system strong=runs/demo/model@guidance=7,sampler=heun,steps=25 \\
        --system old=samples_v1/                       # a folder of images with metadata.jsonl (sample.py's) or .txt
    python pipeline/human_eval.py serve study/       # http://127.0.0.1:8765 ; --host 0.0.0.0 --expose for others
    python pipeline/human_eval.py results study/     # win rates ± 95% CI, Bradley–Terry ranking, agreement, CSV, plot

A system is an exported model with its sampling settings (``PATH@guidance=G,sampler=S,steps=N,negative=TEXT``) or
a folder of existing images. Every system shows an image for the same prompts and seeds: models generate theirs
(from the same seeds, so only the system differs), folders must hold one for every prompt (matched by prompt, in
order). Images are copied or generated into the study folder, which is self-contained: move it to where the raters
are. Each pair (prompt, seed, two systems) is shown with the sides drawn at random; raters answer one question per
aspect (left / right / tie). docs/human_study.md says what the study guarantees (blinding, rater keys, durability)
and what each results file holds; study/store.py what is stored, metrics/preference.py the statistics.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import socket
import sys
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.store import ASPECTS, Study, StudyError, check_system_name, create  # noqa: E402

log = logging.getLogger("human_eval")
SETTINGS = {"guidance": float, "sampler": str, "steps": int, "negative": str}


# --- create --------------------------------------------------------------------------------------------------------

def parse_system(text: str, defaults: dict) -> tuple[str, dict]:
    """"NAME=PATH[@key=value,...]" → (name, {"path", "kind": model|folder, settings}). For a model the settings are
    how it samples (defaults filled in); for an image folder they pick its images (e.g. one guidance scale of a
    sample.py folder that holds several)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise StudyError(f"--system {text!r}: expected NAME=PATH[@guidance=G,sampler=S,steps=N]")
    check_system_name(name)
    path, _, opts = rest.partition("@")
    given = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key not in SETTINGS:
            raise StudyError(f"--system {name}: unknown setting {key!r}; allowed: {', '.join(SETTINGS)}")
        try:
            given[key] = SETTINGS[key](value)
        except ValueError:
            raise StudyError(f"--system {name}: {key}={value!r} is not a {SETTINGS[key].__name__}") from None
    folder = Path(path)
    if (folder / "config.json").is_file():
        return name, {"path": path, "kind": "model", **defaults, **given}
    if folder.is_dir():
        return name, {"path": path, "kind": "folder", "select": given}
    raise StudyError(f"--system {name}: {path} is neither an exported model folder (config.json) nor a folder of "
                     "images")


def folder_entries(folder: Path, select: dict | None = None) -> list[dict]:
    """{"prompt", "file", and what else the folder's metadata.jsonl says (seed, guidance, sampler, steps)} of a
    folder's images, those matching ``select`` (e.g. {"guidance": 3.0}); from metadata.jsonl (sample.py, evaluate.py
    run) or same-named .txt files. A folder that mixes settings must be narrowed with ``select``."""
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        entries = [metadata_entry(folder, meta, n, line)
                   for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    else:
        from data.folders import list_images

        entries = [{"prompt": f.with_suffix(".txt").read_text(encoding="utf-8").strip(), "file": f}
                   for f in list_images(folder) if f.with_suffix(".txt").is_file()]
    select = select or {}
    key_of = {"negative": "negative_prompt"}
    entries = [e for e in entries if all(e.get(key_of.get(k, k)) == v for k, v in select.items())]
    for key in ("guidance", "sampler", "steps", "negative_prompt"):
        values = sorted({str(e[key]) for e in entries if key in e})
        if len(values) > 1:
            raise StudyError(f"{folder} holds images made with {key} {', '.join(values)}: pick one with "
                             f"NAME={folder}@{'negative' if key == 'negative_prompt' else key}=VALUE")
    return entries


def metadata_entry(folder: Path, meta: Path, n: int, line: str) -> dict:
    """Line ``n`` of a folder's metadata.jsonl as {"prompt", "file" (a path), ...}; the prompt may be called
    "caption", as in the captions files evaluate.py reads."""
    try:
        row = json.loads(line)
    except ValueError as e:
        raise StudyError(f"{meta} line {n} is not JSON ({e})") from None
    if not isinstance(row, dict) or not isinstance(row.get("file"), str) or \
            not isinstance(row.get("prompt", row.get("caption")), str):
        keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise StudyError(f"{meta} line {n}: each line needs \"file\" and \"prompt\" (or \"caption\"), found {keys}")
    return {**row, "prompt": row.get("prompt", row.get("caption")), "file": folder / row["file"]}


def study_prompts(args, specs: dict) -> list[str]:
    if args.prompts:
        from data.folders import held_out_captions

        return held_out_captions(args.prompts, args.num_prompts)
    folders = [s for s in specs.values() if s["kind"] == "folder"]
    if not folders:
        raise StudyError("give --prompts (a .txt, .jsonl or shards) for the models to draw")
    prompts = list(dict.fromkeys(e["prompt"] for e in folder_entries(Path(folders[0]["path"]), folders[0]["select"])))
    if not prompts:
        raise StudyError(f"{folders[0]['path']} has no images with prompts (metadata.jsonl or .txt beside them)")
    return prompts[:args.num_prompts]


def cmd_create(args) -> dict:
    import torch
    from PIL import Image

    from pipeline.generate import image_seed

    out = Path(args.out)
    if (out / "votes.sqlite").exists():
        raise StudyError(f"{out} already holds a study with votes; choose another --out (nothing was changed)")
    defaults = {"guidance": args.guidance, "sampler": args.sampler, "steps": args.steps, "negative": ""}
    specs = dict(parse_system(s, defaults) for s in args.system)
    if len(specs) != len(args.system):
        raise StudyError("two --system entries share a name")
    if len(specs) < 2:
        raise StudyError("a side-by-side study needs at least two --system entries")
    prompts = study_prompts(args, specs)
    k = args.images_per_prompt
    items = [(p, image_seed(args.seed, pi, ii)) for pi, p in enumerate(prompts) for ii in range(k)]
    # Folders first, all of them read before anything is written: a folder that lacks a prompt, or whose metadata
    # is broken, is a bad study, found before any image is copied or any model generates anything.
    images: dict[tuple[int, str], str] = {}
    folders: dict[str, dict[str, list[dict]]] = {}
    for name, spec in specs.items():
        if spec["kind"] != "folder":
            continue
        by_prompt = folders[name] = {}
        for entry in folder_entries(Path(spec["path"]), spec["select"]):
            by_prompt.setdefault(entry["prompt"], []).append(entry)
        missing = [p for p in prompts if len(by_prompt.get(p, [])) < k]
        if missing:
            raise StudyError(f"system {name} ({spec['path']}) has fewer than {k} image(s) for {len(missing)} of the "
                             f"study's {len(prompts)} prompts, e.g. {missing[:2]}: the systems of a study must share "
                             "prompts")
    for name, by_prompt in folders.items():
        target = out / "systems" / name / "images"
        target.mkdir(parents=True, exist_ok=True)
        records = []
        for pi, p in enumerate(prompts):
            for ii in range(k):
                entry = by_prompt[p][ii]
                rel = Path("systems") / name / "images" / f"p{pi:05d}_i{ii:03d}.png"
                try:
                    Image.open(entry["file"]).convert("RGB").save(out / rel)
                except OSError as e:
                    raise StudyError(f"system {name}: cannot read {entry['file']}: {e}") from None
                images[(pi * k + ii, name)] = str(rel)
                records.append({**entry, "file": f"images/{rel.name}", "source": str(entry["file"])})
        write_jsonl(records, out / "systems" / name / "metadata.jsonl")
    from pipeline.checkpoint import load_exported
    from pipeline.generate import Job, run_jobs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded: dict[str, tuple] = {}
    for name, spec in specs.items():
        if spec["kind"] != "model":
            continue
        if spec["path"] not in loaded:
            loaded = {spec["path"]: load_exported(spec["path"], device)}  # one model in memory at a time
        unet, encoder, diffusion, vae, meta = loaded[spec["path"]]
        jobs = [Job(pi, ii, p, spec["negative"], image_seed(args.seed, pi, ii), spec["guidance"])
                for pi, p in enumerate(prompts) for ii in range(k)]
        folder = out / "systems" / name
        made_for = {"spec": {**spec, "path": str(Path(spec["path"]).resolve())}, "prompts": prompts,
                    "seeds": [j.seed for j in jobs], "model_step": meta["step"]}
        if (folder / "made_for.json").is_file() and json.loads((folder / "made_for.json").read_text()) != made_for:
            log.warning("system %s: settings, prompts, seeds or model changed since its images were made: "
                        "making them again", name)
            for old in (folder / "images").glob("*.png"):
                old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "made_for.json").write_text(json.dumps(made_for, indent=1))
        todo = sum(not (folder / "images" / j.name).is_file() for j in jobs)
        log.info("system %s: %d of %d images to generate (%s)", name, todo, len(jobs), spec)
        records = run_jobs(jobs, unet, encoder, diffusion, meta["resolution"], folder, spec["sampler"],
                           spec["steps"], args.batch_size, skip_existing=True, vae=vae)
        write_jsonl(records, folder / "metadata.jsonl")  # each image's prompt, seed and settings
        for j in jobs:
            images[(j.prompt_index * k + j.image_index, name)] = str(Path("systems") / name / "images" / j.name)
    sources = {name: {**spec, "path": str(Path(spec["path"]).resolve())} for name, spec in specs.items()}
    create(out, args.name or out.resolve().name, list(specs), items, images, args.aspects, args.votes_per_pair,
           sources)
    pairs = len(items) * len(specs) * (len(specs) - 1) // 2
    log.info("study %s: %d systems, %d prompts × %d image(s), %d pairs; serve it with: python "
             "pipeline/human_eval.py serve %s", out, len(specs), len(prompts), k, pairs, out)
    return {"study": str(out), "systems": list(specs), "prompts": len(prompts), "pairs": pairs}


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))


# --- serve ---------------------------------------------------------------------------------------------------------

def reachable_host(host: str) -> str:
    """What raters can type to reach a server listening on ``host``: "localhost" for loopback; for a wildcard
    address (0.0.0.0, ::), which names no machine, this machine's address on its default route (connecting a UDP
    socket picks it and sends nothing; 192.0.2.1 and 2001:db8::1 are documentation addresses, RFC 5737 and 3849),
    or its host name where there is no route; IPv6 in brackets."""
    from study.server import is_loopback

    if is_loopback(host):
        return "localhost"
    if host in ("0.0.0.0", "::"):
        family, probe = (socket.AF_INET6, "2001:db8::1") if host == "::" else (socket.AF_INET, "192.0.2.1")
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                host = s.getsockname()[0]
        except OSError:
            host = socket.gethostname()
    return f"[{host}]" if ":" in host else host


def cmd_serve(args) -> dict:
    from study.server import make_server

    if args.token is not None and not args.token:
        raise StudyError("--token is empty (an unset variable?): give a token, or leave --token out")
    if not args.timeout > 0:
        raise StudyError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    study = Study(args.study)
    token = args.token
    if args.expose and not token:
        token = secrets.token_urlsafe(16)
    server = make_server(study, args.host, args.port, token, args.expose, args.timeout, args.max_raters)
    host, port = server.server_address[:2]
    url = f"http://{reachable_host(host)}:{port}/" + (f"?token={quote(token, safe='')}" if token else "")
    print(f"serving study {study.meta['name']!r} ({study.num_pairs} pairs, {len(study.systems)} systems) at {url}",
          flush=True)
    print("votes are saved as they arrive; Ctrl-C stops the server (raters can come back later in the same browser)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        study.close()
    return {"stopped": True}


# --- results -------------------------------------------------------------------------------------------------------

def analyse(study: Study, bootstrap: int = 200) -> dict:
    from metrics.preference import Vote, agreement, ranking, win_rates

    rows = study.votes()
    votes = [Vote(r["rater"], r["pair"], (r["system_a"], r["system_b"]), r["aspect"], r["winner"]) for r in rows]
    aspects = list(study.aspects)
    left = sum(r["choice"] == "left" for r in rows)
    decided = sum(r["choice"] != "tie" for r in rows)
    return {
        "study": study.meta["name"], "systems": study.systems, "aspects": aspects, "votes": len(rows),
        "raters": len({r["rater"] for r in rows}), "pairs_judged": len({r["pair"] for r in rows}),
        "pairs": study.num_pairs,
        "win_rates": win_rates(votes, study.systems, aspects),
        "ranking": [row for a in aspects for row in ranking(votes, study.systems, a, bootstrap)]
        if len(study.systems) > 2 else [],
        "agreement": agreement(votes, aspects),
        "left_share_of_decided_votes": left / decided if decided else None,  # ~0.5 unless raters favour a side
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["win_rates"]
    pairs = list(dict.fromkeys((r["system"], r["opponent"]) for r in rows))
    aspects = result["aspects"]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(aspects) * max(1, len(pairs)) ** 0.5 + 2), 3.6), dpi=120)
    width = 0.8 / max(1, len(pairs))
    for k, (a, b) in enumerate(pairs):
        xs, ys, lo, hi = [], [], [], []
        for i, aspect in enumerate(aspects):
            r = next((r for r in rows if (r["aspect"], r["system"], r["opponent"]) == (aspect, a, b)), None)
            if r:
                xs.append(i + (k - (len(pairs) - 1) / 2) * width)
                ys.append(r["win_rate"])
                lo.append(r["win_rate"] - r["ci_low"])
                hi.append(r["ci_high"] - r["win_rate"])
        ax.bar(xs, ys, width * 0.9, yerr=[lo, hi], capsize=3, label=f"{a} vs {b}")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(aspects)), aspects)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate (ties ½), 95% CI")
    ax.set_title(f"{result['study']}: {result['votes']} votes by {result['raters']} rater(s)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# A text cell starting with one of these is run as a formula by spreadsheets (OWASP, "CSV Injection"); rater names
# and prompts come from outside, so such a cell gets a leading apostrophe, which spreadsheets show as text and hide.
# votes.sqlite and results.json keep the text as it was.
def cmd_results(args) -> dict:
    study = Study(args.study)
    result = analyse(study, args.bootstrap)
    out = Path(args.out) if args.out else study.folder / "results"
    out.mkdir(parents=True, exist_ok=True)
    from data.files import write_csv

    write_csv(study.votes(), out / "votes.csv")
    write_csv(result["win_rates"], out / "win_rates.csv")
    if result["ranking"]:
        write_csv(result["ranking"], out / "ranking.csv")
    write_csv(result["agreement"], out / "agreement.csv")
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if result["win_rates"]:
        plot(result, out / "win_rates.png")
    log.info("%d votes by %d raters on %d of %d pairs; wrote %s", result["votes"], result["raters"],
             result["pairs_judged"], result["pairs"], out)
    for r in result["win_rates"]:
        log.info("%-10s %s vs %s: %.3f [%.3f, %.3f] (%d votes)", r["aspect"], r["system"], r["opponent"],
                 r["win_rate"], r["ci_low"], r["ci_high"], r["votes"])
    study.close()
    return result


# --- command line --------------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("create", help="make a study: images of every system for the same prompts and seeds")
    sp.add_argument("--out", required=True, help="the study folder to create")
    sp.add_argument("--system", action="append", default=[], required=True, metavar="NAME=PATH[@k=v,...]",
                    help="a system: an exported model (with @guidance=,sampler=,steps=,negative=) or an image folder; "
                         "repeat for each (two or more)")
    sp.add_argument("--prompts", help="prompts: .txt, .jsonl or shards (default: the first image folder's prompts)")
    sp.add_argument("--num-prompts", type=positive_int, default=50, help="at most this many prompts")
    sp.add_argument("--images-per-prompt", type=positive_int, default=1, help="seeds per prompt")
    sp.add_argument("--aspects", nargs="+", default=list(ASPECTS), choices=list(ASPECTS), help="questions asked")
    sp.add_argument("--votes-per-pair", type=positive_int, default=3, help="answers to aim for per pair (scheduling)")
    sp.add_argument("--name", help="title shown to raters (default: the folder's name)")
    sp.add_argument("--guidance", type=float, default=3.0, help="default guidance of model systems")
    sp.add_argument("--sampler", default="ddim", help="default sampler of model systems")
    sp.add_argument("--steps", type=int, default=50, help="default sampler steps of model systems")
    sp.add_argument("--seed", type=int, default=0, help="seeds of the images (shared by all model systems)")
    sp.add_argument("--batch-size", type=positive_int, default=16, help="images per forward when generating")
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    sp = sub.add_parser("serve", help="serve the study's page to raters")
    sp.add_argument("study", help="the study folder")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback needs --expose)")
    sp.add_argument("--port", type=int, default=8765, help="port (0: any free port, printed at start)")
    sp.add_argument("--expose", action="store_true", help="allow a non-loopback --host; raters then need the token")
    sp.add_argument("--token", help="rater token required on every request (default with --expose: a random one)")
    sp.add_argument("--max-raters", type=positive_int, help="refuse new rater names past this many")
    sp.add_argument("--timeout", type=float, default=60.0,
                    help="seconds a connection may take to send a request or take an answer (then it is closed)")
    sp = sub.add_parser("results", help="win rates with 95%% CIs, ranking, agreement, CSV and plot")
    sp.add_argument("study", help="the study folder")
    sp.add_argument("--out", help="output folder (default: STUDY/results)")
    sp.add_argument("--bootstrap", type=positive_int, default=200,
                    help="bootstrap resamples of the ranking's intervals")
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p.parse_args(argv)


COMMANDS = {"create": cmd_create, "serve": cmd_serve, "results": cmd_results}


def main(argv=None):
    args = parse_args(argv)
    quiet = getattr(args, "json", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        result = COMMANDS[args.command](args)
    except (ValueError, OSError, json.JSONDecodeError, KeyError) as e:  # StudyError is a ValueError
        raise SystemExit(f"error: {e}") from None
    if quiet:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
