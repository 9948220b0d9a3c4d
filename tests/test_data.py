"""Data pipeline: toy set, shard writer round trips, exact / resampled epochs over ranks × workers, exact
mid-epoch restore, and the bad-sample fixture (every good sample out, every bad one counted, nothing raises)."""

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataConfig, DataError, Loader, toy_sample
from data.images import decode_image
from data.write_shards import main as write_shards
from data.write_shards import write_toy

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def read_all(cfg, batch_size=1, **kw):
    """Every sample of epoch 0 (and the loader), reading until every stream of the rank has moved past epoch 0."""
    loader = Loader(cfg, batch_size=batch_size, **kw)
    out = []
    for batch in loader:
        out += [(k, c, e) for k, c, e in zip(batch.keys, batch.captions, batch.epochs)]
        if loader.positions and loader.epoch >= 1:
            break
    return [o for o in out if o[2] == 0], loader


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "shards"
    manifest = write_toy(out, count=96, resolution=16, seed=3, max_samples=12)
    return out, manifest


# --- toy data and writer -------------------------------------------------------------------------------------------

def test_toy_is_deterministic_and_captions_vary():
    a, cap_a, meta = toy_sample(7, seed=1, resolution=24)
    b, cap_b, _ = toy_sample(7, seed=1, resolution=24)
    assert cap_a == cap_b and np.array_equal(np.asarray(a), np.asarray(b)) and a.size == (24, 24)
    assert toy_sample(7, seed=2)[1] != cap_a or not np.array_equal(np.asarray(toy_sample(7, seed=2)[0]), a)
    captions = [toy_sample(i, 0)[1] for i in range(200)]
    assert len(set(captions)) > 100
    for attr in ("shape", "colour", "size", "position", "background"):  # every attribute varies on its own
        assert len({toy_sample(i, 0)[2][attr] for i in range(200)}) > 1
    assert meta["colour"] in cap_a and meta["shape"] in cap_a and meta["background"] in cap_a


def test_toy_shards_same_seed_same_content(tmp_path, toy_shards):
    out, manifest = toy_shards
    again = write_toy(tmp_path / "again", count=96, resolution=16, seed=3, max_samples=12)
    assert manifest["samples"] == again["samples"] == 96 and manifest["num_shards"] == 8
    cfg = lambda d: DataConfig(shards=str(d), num_workers=0, shuffle_buffer=0, resolution=16)  # noqa: E731
    a, b = Loader(cfg(out), 96), Loader(cfg(tmp_path / "again"), 96)
    ba, bb = next(iter(a)), next(iter(b))
    assert ba.keys == bb.keys and ba.captions == bb.captions and torch.equal(ba.images, bb.images)


def test_writer_round_trip_folder_csv_tsv_jsonl(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    expected = {}
    for i in range(5):
        img, caption, _ = toy_sample(i, 0, 20)
        ext = ".png" if i % 2 else ".jpg"
        img.save(src / f"im{i}{ext}")
        (src / f"im{i}.txt").write_text(caption)
        expected[f"im{i}{ext}"] = caption
    toy_sample(9, 0, 20)[0].save(src / "nocaption.png")  # no .txt: skipped and counted
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "broken.txt").write_text("a broken file")

    rows = [(name, cap) for name, cap in expected.items()]
    (tmp_path / "t.csv").write_text("image,caption\n" + "".join(f"src/{n},\"{c}\"\n" for n, c in rows))
    (tmp_path / "t.tsv").write_text("image\tcaption\n" + "".join(f"src/{n}\t{c}\n" for n, c in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"image": f"src/{n}", "caption": c}) + "\n" for n, c in rows))

    runs = {"folder": ["folder", str(src)], "csv": ["table", str(tmp_path / "t.csv")],
            "tsv": ["table", str(tmp_path / "t.tsv")], "jsonl": ["table", str(tmp_path / "t.jsonl"), "--format", "jpg"]}
    for name, argv in runs.items():
        out = tmp_path / f"out_{name}"
        manifest = write_shards(argv + ["--out", str(out), "--max-samples", "2"])
        assert manifest["samples"] == 5 and manifest["num_shards"] == 3, name
        assert json.loads((out / "manifest.json").read_text())["shards_pattern"] == manifest["shards_pattern"]
        if name == "folder":
            assert manifest["skipped"] == {"missing_caption": 1, "not_an_image": 1}
        got, _ = read_all(DataConfig(shards=manifest["shards_pattern"], num_workers=0, resolution=16))
        assert sorted(c for _, c, _ in got) == sorted(expected.values()), name
    # passed through unchanged: the first shard of the folder run holds the original bytes
    with tarfile.open(tmp_path / "out_folder" / "00000.tar") as tar:
        names = tar.getnames()
        first_img = next(n for n in names if n.endswith((".jpg", ".png")))
        data = tar.extractfile(first_img).read()
        meta = json.loads(tar.extractfile(first_img.rsplit(".", 1)[0] + ".json").read())
    assert data == open(meta["source"], "rb").read()


def test_writer_cuts_shards_by_bytes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        toy_sample(i, 0, 32)[0].save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"caption {i}")
    one = len((src / "0.png").read_bytes())
    manifest = write_shards(["folder", str(src), "--out", str(tmp_path / "out"), "--max-samples", "0",
                             "--max-bytes", str(int(2.5 * one))])
    assert manifest["samples"] == 6 and manifest["num_shards"] >= 3
    assert all(s["samples"] <= 3 for s in manifest["shards"])


def test_pipe_url_shards_and_filters(tmp_path):
    """A `pipe:` spec is read like a local file; min_size, max_aspect and drop_empty_captions skip and count."""
    path = tmp_path / "f.tar"
    with tarfile.open(path, "w") as tar:
        for key, size, caption in [("ok", (40, 30), "fine"), ("small", (8, 8), "too small"),
                                   ("wide", (90, 20), "too wide"), ("blank", (40, 40), "")]:
            _add(tar, f"{key}.png", _png(Image.new("RGB", size, "red")))
            _add(tar, f"{key}.txt", caption.encode())
    cfg = DataConfig(shards=f"pipe:cat {path}", num_workers=0, resolution=8, min_size=16, max_aspect=2.0,
                     drop_empty_captions=True)
    got, loader = read_all(cfg)
    assert [k for k, _, _ in got] == ["ok"]
    # once per epoch read (reading on to see epoch 0 end passes them again)
    assert set(loader.skipped) == {"too_small", "bad_aspect", "empty_caption"} and len(set(loader.skipped.values())) == 1
    kept, _ = read_all(DataConfig(shards=f"pipe:cat {path}", num_workers=0, resolution=8))
    assert len(kept) == 4  # without the filters every sample is kept ("" is the unconditional caption)


def test_writer_refuses_to_mix_with_existing_shards(tmp_path):
    write_toy(tmp_path, count=4)
    with pytest.raises(FileExistsError):
        write_toy(tmp_path, count=4)


# --- batches -------------------------------------------------------------------------------------------------------

def test_batches_shape_dtype_range(toy_shards):
    out, _ = toy_shards
    loader = Loader(DataConfig(shards=str(out), num_workers=0, resolution=12, crop="random", flip=True), 5)
    batch = next(iter(loader))
    assert batch.images.shape == (5, 3, 12, 12) and batch.images.dtype == torch.uint8
    x = batch.pixels()
    assert x.shape == (5, 3, 12, 12) and x.dtype == torch.float32
    assert x.is_contiguous()  # not the workers' channels-last view: the model picks its own layout
    assert x.min() >= -1 and x.max() <= 1 and x.min() < 0 < x.max()
    assert torch.allclose((x + 1) * 127.5, batch.images.float(), atol=1e-4)
    assert all(isinstance(c, str) and c for c in batch.captions) and len(batch.keys) == 5
    assert batch.sizes.tolist() == [[16, 16]] * 5


def test_caption_from_json_field(tmp_path):
    path = tmp_path / "j.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.png", _png(Image.new("RGB", (8, 8), "red")))
        _add(tar, "a.json", json.dumps({"caption": "from json"}).encode())
    got, _ = read_all(DataConfig(shards=str(path), num_workers=0, resolution=8))
    assert [c for _, c, _ in got] == ["from json"]


# --- exact and resampled epochs over ranks and workers -------------------------------------------------------------

def test_exact_epoch_two_ranks_two_workers_cover_every_sample_once(toy_shards):
    out, manifest = toy_shards
    cfg = DataConfig(shards=str(out), num_workers=2, shuffle_buffer=10, resolution=8)
    seen = []
    per_rank = []
    for rank in range(2):
        got, _ = read_all(cfg, batch_size=4, rank=rank, world_size=2)
        per_rank.append({k for k, _, _ in got})
        seen += [k for k, _, _ in got]
    assert len(seen) == manifest["samples"] == len(set(seen))  # every sample once, no repeats
    assert not per_rank[0] & per_rank[1]  # ranks read disjoint parts


def test_exact_epoch_reshuffles_each_epoch(toy_shards):
    out, _ = toy_shards
    loader = Loader(DataConfig(shards=str(out), num_workers=0, shuffle_buffer=20, resolution=8), 8)
    order = {0: [], 1: []}
    for batch in loader:
        for k, e in zip(batch.keys, batch.epochs):
            if e in order:
                order[e].append(k)
        if loader.epoch >= 2:
            break
    assert sorted(order[0]) == sorted(order[1]) and order[0] != order[1]


def test_too_few_shards_for_exact_mode_is_a_clear_error(toy_shards):
    out, _ = toy_shards
    with pytest.raises(ValueError, match="needs at least data.streams = 16 shards"):
        Loader(DataConfig(shards=str(out), num_workers=8), 8, rank=0, world_size=2)


def test_resampled_epoch_length(toy_shards):
    out, _ = toy_shards
    cfg = DataConfig(shards=str(out), mode="resampled", epoch_samples=40, num_workers=2, resolution=8)
    for rank in range(2):
        loader = Loader(cfg, batch_size=4, rank=rank, world_size=2)
        epochs = Counter()
        for i, batch in enumerate(loader):
            epochs.update(batch.epochs)
            if i == 15:
                break
        assert epochs[0] == epochs[1] == 20  # 40 per epoch over 2 ranks


@pytest.mark.parametrize("workers,stop", [(0, 5), (2, 7)])
def test_restore_mid_epoch_continues_exactly(toy_shards, workers, stop):
    out, _ = toy_shards
    cfg = DataConfig(shards=str(out), num_workers=workers, shuffle_buffer=16, resolution=8, crop="random", flip=True)
    straight = Loader(cfg, 4)
    it = iter(straight)
    reference = [next(it) for _ in range(30)]
    first = Loader(cfg, 4)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    it = iter(Loader(cfg, 4, state=state))
    tail = [next(it) for _ in range(30 - stop)]
    for a, b in zip(reference, head + tail):
        assert a.keys == b.keys and torch.equal(a.images, b.images)
    seen = [k for b in head + tail for k, e in zip(b.keys, b.epochs) if e == 0]
    assert len(seen) == len(set(seen)) == 96  # the interrupted epoch is neither replayed nor cut short
    assert [b.index for b in head + tail] == [list(range(4 * i, 4 * i + 4)) for i in range(30)]


# --- elastic: the same global batches on any number of processes ---------------------------------------------------

def global_batches(cfg, world: int, batch: int, accum: int, steps: int, states=None):
    """The first ``steps`` global batches as W ranks see them, put together in rank order: per step, the keys,
    the images and the global indices. ``states``: a merged checkpoint position to start from."""
    loaders = [Loader(cfg, batch, rank=r, world_size=world, grad_accum=accum, state=states) for r in range(world)]
    its = [iter(ld) for ld in loaders]
    out = []
    for _ in range(steps):
        micro = [[next(it) for _ in range(accum)] for it in its]  # rank r's micro-batches of this step
        parts = [b for rank in micro for b in rank]
        out.append(([k for b in parts for k in b.keys], torch.cat([b.images for b in parts]),
                    [g for b in parts for g in b.index], [e for b in parts for e in b.epochs]))
    return out, loaders


def test_global_batches_do_not_depend_on_processes_workers_or_accumulation(toy_shards):
    """4 canonical streams, a global batch of 8: 1 process × 8, 2 × 4 with 2 workers, 4 × 2, 1 × 4 × 2 micro-steps
    all read the same samples in the same order, each with the same global index."""
    out, _ = toy_shards
    cfg = lambda w: DataConfig(shards=str(out), num_workers=w, shuffle_buffer=8, resolution=8, streams=4)  # noqa: E731
    reference, _ = global_batches(cfg(0), 1, 8, 1, 14)
    for world, batch, accum, workers in [(2, 4, 1, 2), (4, 2, 1, 1), (1, 4, 2, 2)]:
        got, _ = global_batches(cfg(workers), world, batch, accum, 14)
        for (ka, xa, ia, _), (kb, xb, ib, _) in zip(reference, got):
            assert ka == kb and torch.equal(xa, xb) and ia == ib, (world, batch, accum, workers)
    assert [g for _, _, i, _ in reference for g in i] == list(range(14 * 8))
    epoch0 = [k for keys, _, _, epochs in reference for k, e in zip(keys, epochs) if e == 0]
    assert len(epoch0) == len(set(epoch0)) == 96  # each sample once in the epoch


@pytest.mark.parametrize("before,after", [((2, 4, 1, 2), (1, 8, 1, 0)), ((1, 4, 2, 0), (4, 2, 1, 1))])
def test_resume_on_another_number_of_processes_continues_the_same_sequence(toy_shards, before, after):
    """Stopped after 5 steps on one layout, resumed on another with the same global batch: the global batches go on
    exactly as an uninterrupted run's, and every sample of the interrupted epoch is read once across the change."""
    out, _ = toy_shards
    cfg = lambda w: DataConfig(shards=str(out), num_workers=w, shuffle_buffer=8, resolution=8, crop="random",  # noqa
                               flip=True, streams=4)
    reference, _ = global_batches(cfg(0), 1, 8, 1, 16)
    world, batch, accum, workers = before
    head, loaders = global_batches(cfg(workers), world, batch, accum, 5)
    state = json.loads(json.dumps(Loader.merge_states([ld.state_dict() for ld in loaders])))
    world, batch, accum, workers = after
    tail, _ = global_batches(cfg(workers), world, batch, accum, 11, states=state)
    for (ka, xa, ia, _), (kb, xb, ib, _) in zip(reference, head + tail):
        assert ka == kb and torch.equal(xa, xb) and ia == ib
    epoch0 = [k for keys, _, _, epochs in head + tail for k, e in zip(keys, epochs) if e == 0]
    assert len(epoch0) == len(set(epoch0)) == 96


def test_default_streams_are_kept_by_a_resume_on_other_processes(toy_shards):
    """data.streams = 0: the first start's processes × workers (2 × 2 here), saved with the position and kept when the
    run comes back on one process with one worker: the sequence goes on."""
    out, _ = toy_shards
    cfg = lambda w: DataConfig(shards=str(out), num_workers=w, shuffle_buffer=8, resolution=8)  # noqa: E731
    head, loaders = global_batches(cfg(2), 2, 4, 1, 3)
    assert loaders[0].layout.streams == 4 and loaders[0].num_workers == 2
    state = Loader.merge_states([ld.state_dict() for ld in loaders])
    tail, resumed = global_batches(cfg(1), 1, 8, 1, 3, states=state)
    assert resumed[0].layout.streams == 4  # not 1 × 1: the saved streams
    reference, _ = global_batches(cfg(2), 2, 4, 1, 6)
    assert [k for k, *_ in head + tail] == [k for k, *_ in reference]


def test_layouts_that_cannot_keep_the_sequence_are_clear_errors(toy_shards):
    out, _ = toy_shards
    cfg = DataConfig(shards=str(out), num_workers=0, streams=4, resolution=8)
    with pytest.raises(ValueError, match="global batch of 6 samples .* does not divide among the run's 4 data streams"):
        Loader(cfg, 6)
    with pytest.raises(ValueError, match="4 data streams do not divide among 3 processes"):
        Loader(cfg, 4, rank=0, world_size=3)
    loader = Loader(cfg, 8)
    next(iter(loader))
    with pytest.raises(ValueError, match="does not fit this run.*global_batch"):
        Loader(cfg, 8, rank=0, world_size=2, state=loader.state_dict())  # 16 per step now: another sequence
    with pytest.raises(ValueError, match="older version of the loader"):
        Loader(cfg, 8, state={"version": 1, "positions": {}})


def test_restore_refuses_a_different_layout(toy_shards):
    out, _ = toy_shards
    cfg = DataConfig(shards=str(out), num_workers=0, resolution=8)
    loader = Loader(cfg, 4)
    next(iter(loader))
    with pytest.raises(ValueError, match="does not fit"):
        Loader(cfg, 8, state=loader.state_dict())


# --- bad samples ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """Two shards: one holding every kind of odd or broken sample, one tar cut in the middle of a member."""
    d = tmp_path_factory.mktemp("bad")
    rgb = Image.new("RGB", (40, 30), (200, 30, 30))
    good = {  # key → (extension, bytes): all must come out, converted to RGB
        "good_rgb": ("jpg", _jpg(rgb)),
        "cmyk": ("jpg", _jpg(Image.new("CMYK", (20, 20), (0, 255, 255, 0)))),
        "palette_transparent": ("png", None),
        "gray": ("png", _png(Image.new("L", (20, 20), 100))),
        "one_pixel": ("png", _png(Image.new("RGB", (1, 1), (0, 0, 255)))),
        "sixteen_bit": ("png", _png(Image.fromarray(np.full((20, 20), 32768, np.uint16)))),
        "rgba": ("png", _png(Image.new("RGBA", (20, 20), (0, 255, 0, 128)))),
        "tiff": ("tif", _encode(rgb, "TIFF")),  # any format Pillow reads is an image, not a missing one
        "gif": ("gif", _encode(rgb, "GIF")),
    }
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 10, 20))
    pal.info["transparency"] = 0
    good["palette_transparent"] = ("png", _png(pal))
    full = _jpg(Image.effect_noise((64, 64), 60).convert("RGB"))
    bad = {  # key → (members, reason)
        "truncated_jpeg": ({"jpg": full[: len(full) // 2], "txt": b"cut"}, "corrupt_image"),
        "not_image": ({"jpg": b"<html>404 not found</html>", "txt": b"x"}, "not_an_image"),
        "no_caption": ({"png": _png(rgb)}, "missing_caption"),
        "latin1_caption": ({"png": _png(rgb), "txt": "caf\xe9 cr\xe8me".encode("latin-1")}, "bad_caption_encoding"),
        "empty_file": ({"jpg": b"", "txt": b"empty"}, "empty_image"),
    }
    with tarfile.open(d / "00000.tar", "w") as tar:
        for key, (ext, data) in good.items():
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.txt", f"caption of {key}".encode())
        for key, (members, _) in bad.items():
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        _add(tar, "before_cut.png", _png(rgb))
        _add(tar, "before_cut.txt", b"read before the cut")
        _add(tar, "at_cut.png", _png(Image.effect_noise((64, 64), 60).convert("RGB")))
        _add(tar, "at_cut.txt", b"lost")
    raw = whole.getvalue()
    cut = raw.index(b"at_cut.png") + 512 + 200  # 200 bytes into the member's data
    (d / "00001.tar").write_bytes(raw[:cut])
    expected_good = set(good) | {"before_cut"}
    expected_skipped = Counter(reason for _, reason in bad.values()) + Counter(truncated_tar=1)
    return d, expected_good, expected_skipped


def test_bad_samples_skipped_and_counted_good_ones_converted(bad_shards):
    d, expected_good, expected_skipped = bad_shards
    got, loader = read_all(DataConfig(shards=str(d / "{00000..00001}.tar"), num_workers=0, resolution=16,
                                      shuffle_buffer=0))
    assert {k for k, _, _ in got} == expected_good
    # Counts are of skips as they happen; reading on into epoch 1 (to see epoch 0 end) may meet the cut tar again.
    skipped = Counter(loader.skipped)
    assert skipped["truncated_tar"] in (1, 2)
    skipped["truncated_tar"] = 1
    assert skipped == expected_skipped


def test_odd_modes_convert_correctly(bad_shards):
    sixteen = decode_image(_png(Image.fromarray(np.full((4, 4), 32768, np.uint16))))
    assert sixteen.mode == "RGB" and abs(np.asarray(sixteen).astype(int) - 128).max() <= 1  # rescaled, not clipped
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    arr = np.asarray(decode_image(_png(pal)))
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[0, 1].tolist() == [255, 0, 0]  # transparent → white
    arr = np.asarray(decode_image(_png(pal), alpha="drop"))  # transparency dropped, as pytorch-fid reads a folder
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[0, 1].tolist() == [255, 0, 0]
    rgba = _png(Image.new("RGBA", (2, 2), (0, 200, 0, 64)))
    assert np.asarray(decode_image(rgba))[0, 0].tolist() == [191, 241, 191]  # on white: 255 + (c − 255)·64/255
    assert np.asarray(decode_image(rgba, alpha="drop"))[0, 0].tolist() == [0, 200, 0]
    cmyk = np.asarray(decode_image(_jpg(Image.new("CMYK", (8, 8), (0, 255, 255, 0)))))
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60  # CMYK red stays red


def test_inspect_json_reports_samples_and_skips(bad_shards):
    d, expected_good, expected_skipped = bad_shards
    res = subprocess.run([sys.executable, "-m", "data.inspect", str(d / "{00000..00001}.tar"), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["samples"] == len(expected_good) and Counter(report["skipped"]) == expected_skipped
    assert report["image_width"]["min"] == 1 and report["caption_words"]["max"] >= 3


def test_too_many_broken_samples_stop_with_a_clear_error(tmp_path):
    with tarfile.open(tmp_path / "junk.tar", "w") as tar:
        for i in range(150):
            _add(tar, f"{i:04d}.jpg", b"junk" if i % 2 else _png(Image.new("RGB", (4, 4))))
            _add(tar, f"{i:04d}.txt", b"c")
    with pytest.raises(DataError, match="max_bad_fraction"):
        read_all(DataConfig(shards=str(tmp_path / "junk.tar"), num_workers=0, resolution=4, max_bad_fraction=0.3))
    got, loader = read_all(DataConfig(shards=str(tmp_path / "junk.tar"), num_workers=0, resolution=4,
                                      max_bad_fraction=0.6))
    assert len(got) == 75 and 75 <= loader.skipped["not_an_image"] <= 76  # (+1: epoch 1 begun)


def test_nothing_readable_and_no_match_are_clear_errors(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(DataError, match="no sample could be read"):
        read_all(DataConfig(shards=str(tmp_path / "a.tar"), num_workers=0))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        Loader(DataConfig(shards=str(tmp_path / "missing_{000..003}.tar")), 4)
