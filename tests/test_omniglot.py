"""Tests for optimizees.omniglot: the zip/PNG reader, its cache, the splits, the episode sampler,
the conv net and the batched task."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from l2o.tasks import META, TRAIN, Task, TaskFamily
from optimizees import omniglot, omniglot_files
from optimizees.data import DataError
from optimizees.omniglot import (
    META_TRAIN_CHARACTERS,
    OMNIGLOT_FILES,
    ConvNet,
    OmniglotData,
    OmniglotFamily,
    OmniglotTask,
    decode_png,
    episode_accuracy,
    grouped_logits,
    load_omniglot,
    read_omniglot_zip,
    split_characters,
    vmap_logits,
)
from tests.conformance import check_task

# From shared/data/README.md.
NUM_BACKGROUND, NUM_EVALUATION, DRAWINGS = 964, 659, 20


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    """Each test sees only the disk cache it sets up, not decoded arrays of earlier tests."""
    omniglot._clear_cache()
    yield
    omniglot._clear_cache()


# --------------------------------------------------------------------------------------------
# Writing small PNGs and zips


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def png_bytes(levels: np.ndarray, depth: int = 1, filters: list[int] | None = None) -> bytes:
    """Encode ``levels`` (values in 0 .. 2**depth - 1) as a grayscale PNG with the given row filters."""
    height, width = levels.shape
    per_byte = 8 // depth
    stride = (width * depth + 7) // 8
    padded = np.zeros((height, stride * per_byte), dtype=np.uint8)
    padded[:, :width] = levels
    shifts = np.arange(8 - depth, -1, -depth)
    rows = (padded.reshape(height, stride, per_byte).astype(np.int64) << shifts).sum(-1).astype(np.uint8)
    bpp = max(1, depth // 8)
    filters = filters or [0] * height
    raw = bytearray()
    prev = [0] * stride
    for y in range(height):
        line = [int(v) for v in rows[y]]
        out = []
        for x in range(stride):
            left = line[x - bpp] if x >= bpp else 0
            upleft = prev[x - bpp] if x >= bpp else 0
            pred = [0, left, prev[x], (left + prev[x]) >> 1, _paeth(left, prev[x], upleft)][filters[y]]
            out.append((line[x] - pred) & 0xFF)
        raw += bytes([filters[y]] + out)
        prev = line

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tIME", b"\x07\xdf\x0a\x15\0\0\0")
            + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))


def glyph(seed: int, size: int = 105) -> np.ndarray:
    """A random 1-bit drawing: 1 (white paper) with a few 0 (ink) blocks."""
    rng = np.random.default_rng(seed)
    img = np.ones((size, size), dtype=np.uint8)
    h, w = max(1, size // 5), max(1, size // 13)
    for _ in range(4):
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        img[y:y + h, x:x + w] = 0
    return img


def write_zip(path: Path, characters: dict[str, int], drawings: int = 4, *, extras: bool = True,
              size: int = 105) -> Path:
    """An Omniglot-style zip: ``characters`` maps alphabet -> number of characters."""
    root = path.stem
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{root}/", b"")
        seed = 0
        for alphabet, n in characters.items():
            for c in range(1, n + 1):
                for d in range(1, drawings + 1):
                    z.writestr(f"{root}/{alphabet}/character{c:02d}/{seed:04d}_{d:02d}.png",
                               png_bytes(glyph(seed * 100 + d, size)))
                seed += 1
            if extras:
                z.writestr(f"{root}/{alphabet}/.DS_Store", b"junk")
                z.writestr(f"__MACOSX/{root}/{alphabet}/._character01", b"junk")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trust(monkeypatch: pytest.MonkeyPatch, *paths: Path) -> None:
    """Make ``verify=True`` accept these (small, fake) zips."""
    for p in paths:
        monkeypatch.setitem(omniglot.OMNIGLOT_SHA256, p.name, sha256(p))


# --------------------------------------------------------------------------------------------
# PNG decoding


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_decode_png_round_trips_every_filter(depth: int) -> None:
    rng = np.random.default_rng(depth)
    levels = rng.integers(0, 1 << depth, size=(11, 13), dtype=np.uint8)  # width not a multiple of 8
    filters = [int(f) for f in rng.permutation(np.arange(11) % 5)]
    decoded = decode_png(png_bytes(levels, depth, filters))
    expected = (levels.astype(np.int64) * 255 // ((1 << depth) - 1)).astype(np.uint8)
    np.testing.assert_array_equal(decoded, expected)
    pil = pytest.importorskip("PIL.Image")
    np.testing.assert_array_equal(decoded, np.array(pil.open(io.BytesIO(png_bytes(levels, depth, filters))).convert("L")))


def test_decode_png_errors_say_what_is_wrong() -> None:
    good = png_bytes(glyph(0, 16))
    with pytest.raises(DataError, match="signature"):
        decode_png(b"GIF89a" + good[6:])
    damaged = bytearray(good)
    damaged[-20] ^= 0xFF  # inside the IDAT payload
    with pytest.raises(DataError, match="CRC"):
        decode_png(bytes(damaged))
    with pytest.raises(DataError, match="truncated"):
        decode_png(good[:40])
    rgb = bytearray(good)
    rgb[25] = 2  # colour type: truecolour
    rgb[29:33] = struct.pack(">I", zlib.crc32(bytes(rgb[12:29])))
    with pytest.raises(DataError, match="colour type 2"):
        decode_png(bytes(rgb))


# --------------------------------------------------------------------------------------------
# Reading zips: good, missing, corrupted, wrong checksum; the cache


def test_reads_a_zip_in_sorted_order_with_ink_as_255(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "images_background.zip", {"Beta": 2, "Alpha": 3}, drawings=4)
    data = read_omniglot_zip(path, verify=False, cache_dir=tmp_path / "cache")
    assert data.images.shape == (5, 4, 28, 28) and data.images.dtype == torch.uint8
    assert data.characters == (
        "images_background/Alpha/character01", "images_background/Alpha/character02",
        "images_background/Alpha/character03", "images_background/Beta/character01",
        "images_background/Beta/character02",
    )
    # Alpha/character01 was written third (seed 2), drawing 01: glyph(2 * 100 + 1); ink is 255
    # where the PNG is black, box-filtered to 28x28
    ink = 255.0 * (1.0 - torch.from_numpy(glyph(201)).double())
    expected = F.interpolate(ink[None, None], size=(28, 28), mode="area")[0, 0].round()
    torch.testing.assert_close(data.images[0, 0].double(), expected, rtol=0, atol=1)
    assert data.images.float().mean() > 0 and int(data.images.max()) == 255
    # fresh tensors: modifying them does not change the next read
    data.images.zero_()
    assert read_omniglot_zip(path, verify=False, cache_dir=tmp_path / "cache").images.max() == 255


def test_verify_accepts_known_checksums_and_rejects_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_zip(tmp_path / "images_background.zip", {"A": 2})
    with pytest.raises(DataError) as err:
        read_omniglot_zip(path, cache_dir=False)
    message = str(err.value)
    assert str(path) in message and "checksum mismatch" in message
    assert omniglot.OMNIGLOT_SHA256["images_background.zip"] in message  # what was expected
    assert sha256(path) in message  # what was found
    assert "verify=False" in message and "brendenlake/omniglot" in message  # how to get it
    trust(monkeypatch, path)
    assert read_omniglot_zip(path, cache_dir=False).images.shape == (2, 4, 28, 28)
    # the upstream zip's md5 is accepted too
    monkeypatch.setitem(omniglot.OMNIGLOT_SHA256, path.name, "0" * 64)
    monkeypatch.setitem(omniglot.OMNIGLOT_UPSTREAM_MD5, path.name, hashlib.md5(path.read_bytes()).hexdigest())
    read_omniglot_zip(path, cache_dir=False)
    other = write_zip(tmp_path / "my_alphabets.zip", {"A": 1})
    with pytest.raises(DataError, match="no known checksum.*my_alphabets.zip"):
        read_omniglot_zip(other, cache_dir=False)


def test_missing_files_are_named_with_where_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="images_evaluation.zip: Omniglot file not found.*brendenlake"):
        read_omniglot_zip(tmp_path / "images_evaluation.zip")
    write_zip(tmp_path / "omniglot" / "images_background.zip", {"A": 1})
    with pytest.raises(DataError) as err:
        load_omniglot(tmp_path)
    message = str(err.value)
    assert "missing images_evaluation.zip" in message and str(tmp_path / "omniglot") in message
    assert "missing images_background.zip, images_evaluation.zip" in message  # tmp_path itself
    assert "brendenlake/omniglot" in message
    monkeypatch.delenv("L2O_DATA", raising=False)
    with pytest.raises(DataError, match="L2O_DATA"):
        load_omniglot()


def test_damaged_zips_are_refused_by_name(tmp_path: Path) -> None:
    good = write_zip(tmp_path / "good" / "images_background.zip", {"A": 2})
    truncated = tmp_path / "truncated" / "images_background.zip"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{truncated}: not a readable zip file"):
        read_omniglot_zip(truncated, verify=False, cache_dir=False)
    # a well-formed zip holding a damaged PNG
    bad_png = tmp_path / "bad" / "images_background.zip"
    bad_png.parent.mkdir()
    with zipfile.ZipFile(bad_png, "w") as z:
        z.writestr("images_background/A/character01/0001_01.png", png_bytes(glyph(1))[:-30])
    with pytest.raises(DataError, match="damaged entry images_background/A/character01/0001_01.png"):
        read_omniglot_zip(bad_png, verify=False, cache_dir=False)
    # a flipped byte inside an entry's compressed data (the zip's CRC or the inflater catches it)
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = [i for i in z.infolist() if i.filename.endswith(".png")][-1]
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[data_start + info.compress_size // 2] ^= 0xFF
    flipped = tmp_path / "flipped" / "images_background.zip"
    flipped.parent.mkdir()
    flipped.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{flipped}: damaged entry {info.filename}"):
        read_omniglot_zip(flipped, verify=False, cache_dir=False)
    # no images in the expected layout; different drawing counts
    empty = tmp_path / "empty" / "images_background.zip"
    empty.parent.mkdir()
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("readme.txt", b"hello")
    with pytest.raises(DataError, match="no images found"):
        read_omniglot_zip(empty, verify=False, cache_dir=False)
    uneven = write_zip(tmp_path / "uneven" / "images_background.zip", {"A": 2})
    with zipfile.ZipFile(uneven, "a") as z:
        z.writestr("images_background/A/character01/9999_99.png", png_bytes(glyph(5)))
    with pytest.raises(DataError, match="different numbers of drawings"):
        read_omniglot_zip(uneven, verify=False, cache_dir=False)


def test_disk_cache_is_keyed_by_checksum_and_rebuilt_when_unusable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_zip(tmp_path / "images_evaluation.zip", {"A": 3})
    cache = tmp_path / "cache"
    first = read_omniglot_zip(path, verify=False, cache_dir=cache)
    files = list(cache.iterdir())
    assert [f.name for f in files] == [f"omniglot-images_evaluation-{sha256(path)[:16]}-28px-v1.npz"]

    omniglot._clear_cache()
    decode = omniglot_files._decode_zip
    monkeypatch.setattr(omniglot_files, "_decode_zip", lambda *a: pytest.fail("decoded although cached"))
    second = read_omniglot_zip(path, verify=False, cache_dir=cache)
    assert torch.equal(first.images, second.images) and first.characters == second.characters

    omniglot._clear_cache()
    files[0].write_bytes(b"not a npz file")
    calls = []
    monkeypatch.setattr(omniglot_files, "_decode_zip", lambda *a: calls.append(1) or decode(*a))
    third = read_omniglot_zip(path, verify=False, cache_dir=cache)
    assert calls and torch.equal(third.images, first.images)
    assert np.load(files[0])["images"].shape == (3, 4, 28, 28)  # rewritten

    # another zip under the same name gets its own entry; cache_dir=False writes nothing
    write_zip(path, {"A": 2, "B": 1}, drawings=5)
    assert read_omniglot_zip(path, verify=False, cache_dir=cache).images.shape == (3, 5, 28, 28)
    assert len(list(cache.iterdir())) == 2
    omniglot._clear_cache()
    read_omniglot_zip(path, verify=False, cache_dir=False, image_size=20)
    assert len(list(cache.iterdir())) == 2 and not list(cache.glob("*.tmp"))
    # the default location follows $L2O_CACHE
    monkeypatch.setenv("L2O_CACHE", str(tmp_path / "env-cache"))
    read_omniglot_zip(path, verify=False)
    assert len(list((tmp_path / "env-cache").glob("*.npz"))) == 1


def test_load_omniglot_concatenates_background_then_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bg = write_zip(tmp_path / "omniglot" / "images_background.zip", {"Zulu": 2})
    ev = write_zip(tmp_path / "omniglot" / "images_evaluation.zip", {"Alpha": 1})
    trust(monkeypatch, bg, ev)
    monkeypatch.setenv("L2O_DATA", str(tmp_path))
    data = load_omniglot(cache_dir=tmp_path / "cache")
    assert data.images.shape == (3, 4, 28, 28)
    assert data.characters[0].startswith("images_background/Zulu") and data.characters[2].startswith("images_evaluation/Alpha")


# --------------------------------------------------------------------------------------------
# Splits, classes, episodes (on synthetic data held in memory)


def synthetic_data(num_characters: int = 1300, drawings: int = 6, seed: int = 0) -> OmniglotData:
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, size=(num_characters, drawings, 28, 28), dtype=np.uint8))
    return OmniglotData(images, tuple(f"set/alphabet/character{i:04d}" for i in range(num_characters)))


def split_marked_data(num_characters: int = 1300) -> OmniglotData:
    """Constant images whose value is the split of their character: 1 train, 2 val, 3 test."""
    images = torch.empty(num_characters, 4, 28, 28, dtype=torch.uint8)
    for value, split in enumerate(("train", "val", "test"), start=1):
        r = split_characters(num_characters, split)
        images[r.start:r.stop] = value
    return OmniglotData(images, tuple(f"c{i}" for i in range(num_characters)))


def test_split_characters_is_a_deterministic_class_disjoint_partition() -> None:
    assert split_characters(1623, "train") == range(0, 1100)
    assert split_characters(1623, "val") == range(1100, 1200)
    assert split_characters(1623, "test") == range(1200, 1623)
    assert split_characters(1623, "train", val_characters=0) == range(0, META_TRAIN_CHARACTERS)
    assert split_characters(50, "train", val_characters=10) == range(0, 40)
    assert split_characters(50, "test", val_characters=10) == range(50, 50)
    with pytest.raises(ValueError, match="split"):
        split_characters(1623, "validation")
    with pytest.raises(ValueError, match="val_characters"):
        split_characters(1623, "train", val_characters=1200)


def test_sampler_never_mixes_meta_train_and_held_out_characters() -> None:
    data = split_marked_data()
    gen = torch.Generator().manual_seed(0)
    for value, split in enumerate(("train", "val", "test"), start=1):
        family = OmniglotFamily(data=data, split=split, shots=1, query_shots=3, meta_batch_size=40, channels=4)
        for _ in range(3):
            task = family.sample(gen)
            for batch in (task.support, task.query):
                assert torch.all(batch.inputs == value / 255.0), f"{split} episode holds another split's image"
    assert OmniglotFamily(data=data, split="test", query_shots=3, channels=4).num_classes == 100 * 4


def test_rotations_make_new_classes() -> None:
    data = synthetic_data(num_characters=30)
    family = OmniglotFamily(data=data, ways=5, shots=2, query_shots=3, meta_batch_size=64, channels=4,
                            val_characters=0)
    assert family.num_classes == 30 * 4
    task = family.sample(torch.Generator().manual_seed(1))
    info = task.info
    assert set(info.quarter_turns.unique().tolist()) == {0, 1, 2, 3}
    # the classes of an episode are distinct (character, rotation) pairs, and may share a character
    pairs = info.characters * 4 + info.quarter_turns
    assert all(len(set(row.tolist())) == 5 for row in pairs)
    assert any(len(set(row.tolist())) < 5 for row in info.characters)
    # every image is its character's drawing turned counter-clockwise by the class's rotation
    for b in range(4):
        for n in range(5):
            c, q = int(info.characters[b, n]), int(info.quarter_turns[b, n])
            drawn = torch.rot90(data.images[c, info.drawings[b, n]], q, dims=(-2, -1)).float() / 255
            torch.testing.assert_close(task.support.inputs[b, n * 2:(n + 1) * 2, 0], drawn[:2], rtol=0, atol=0)
            torch.testing.assert_close(task.query.inputs[b, n * 3:(n + 1) * 3, 0], drawn[2:], rtol=0, atol=0)
    only_upright = OmniglotFamily(data=data, rotations=(0,), query_shots=3, channels=4, val_characters=0)
    assert only_upright.num_classes == 30
    assert not only_upright.sample(torch.Generator().manual_seed(0)).info.quarter_turns.any()


def test_episode_shapes_labels_and_determinism() -> None:
    family = OmniglotFamily(data=synthetic_data(num_characters=40), ways=4, shots=2, query_shots=3,
                            meta_batch_size=16, channels=4, val_characters=0)
    task = family.sample(torch.Generator().manual_seed(0))
    assert isinstance(family, TaskFamily) and isinstance(task, Task) and task.num_tasks == 16
    assert task.support.inputs.shape == (16, 8, 1, 28, 28) and task.query.inputs.shape == (16, 12, 1, 28, 28)
    assert task.support.inputs.dtype == torch.float32 and task.support.labels.dtype == torch.int64
    assert 0 <= float(task.support.inputs.min()) and float(task.support.inputs.max()) <= 1
    for batch, per_class in ((task.support, 2), (task.query, 3)):
        assert torch.equal(batch.labels.sort(-1).values, torch.arange(4).repeat_interleave(per_class).expand(16, -1))
    # drawings of a class are distinct and never shared between support and query
    assert all(len(set(row.tolist())) == 5 for row in task.info.drawings.reshape(-1, 5))
    # the labelling is random per episode: label 0 is not always the same character
    assert len(set(task.info.characters[:, 0].tolist())) > 1
    assert task.sample_batch(TRAIN, torch.Generator()) is task.support
    assert task.sample_batch(META, torch.Generator()) is task.query
    with pytest.raises(ValueError, match="split"):
        task.sample_batch("test", torch.Generator())
    again = family.sample(torch.Generator().manual_seed(0))
    assert torch.equal(again.query.inputs, task.query.inputs) and torch.equal(again.info.characters, task.info.characters)
    assert family.sample(torch.Generator().manual_seed(0), num_tasks=3).num_tasks == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ways": 0}, "ways"),
        ({"shots": 0}, "shots"),
        ({"query_shots": -1}, "query_shots"),
        ({"meta_batch_size": 0}, "meta_batch_size"),
        ({"shots": 3, "query_shots": 4}, r"shots \+ query_shots must be <= 6"),
        ({"ways": 41, "rotations": (0,)}, "ways=41 exceeds the 40 classes"),
        ({"split": "validation"}, "split"),
        ({"split": "test"}, "ways=5 exceeds the 0 classes"),
        ({"rotations": (0, 45)}, "rotations"),
        ({"rotations": ()}, "rotations"),
        ({"val_characters": -1}, "val_characters"),
        ({"forward": "loop"}, "forward"),
        ({"dtype": torch.int64}, "dtype"),
        ({"channels": 0}, "channels"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    args = {"data": synthetic_data(num_characters=40, drawings=6), "query_shots": 3, "channels": 4,
            "val_characters": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        OmniglotFamily(**args)


# --------------------------------------------------------------------------------------------
# The network and the batched task


def small_task(dtype: torch.dtype = torch.float32, forward: str = "grouped", **kwargs) -> OmniglotTask:
    args = {"ways": 3, "shots": 2, "query_shots": 2, "meta_batch_size": 3, "channels": 6, "val_characters": 0} | kwargs
    family = OmniglotFamily(data=synthetic_data(num_characters=20), dtype=dtype, forward=forward, **args)
    return family.sample(torch.Generator().manual_seed(3))


def test_convnet_is_the_papers_network() -> None:
    net = ConvNet(5)
    shapes = {k: tuple(v.shape) for k, v in net.params().items()}
    assert shapes["blocks.0.conv.weight"] == (64, 1, 3, 3) and shapes["blocks.3.conv.weight"] == (64, 64, 3, 3)
    assert shapes["classifier.weight"] == (5, 64)  # 28 -> 14 -> 7 -> 3 -> 1
    assert len(shapes) == 4 * 4 + 2 and not list(net.buffers())  # no running statistics
    assert all(p is q for p, q in zip(net.params().values(), net.parameters()))  # live, for θ0
    x = torch.rand(7, 1, 28, 28)
    out = net(x)
    assert out.shape == (7, 5)
    net.eval()  # batch statistics in eval mode too
    torch.testing.assert_close(net(x), out)
    a = net.init_params(torch.Generator().manual_seed(0), batch_size=2)
    b = net.init_params(torch.Generator().manual_seed(0), batch_size=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.1.conv.weight"][0], a["blocks.1.conv.weight"][1])  # independent
    bound = (6 / (64 * 9 + 64 * 9)) ** 0.5
    assert float(a["blocks.1.conv.weight"].abs().max()) <= bound and torch.all(a["blocks.1.norm.weight"] == 1)
    with pytest.raises(ValueError, match="image_size"):
        ConvNet(5, image_size=8)


@pytest.mark.parametrize("forward", ["grouped", "vmap"])
def test_batched_loss_equals_a_loop_over_episodes(forward: str) -> None:
    task = small_task(torch.float64, forward)
    params = task.init(torch.Generator().manual_seed(0))
    params = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=v.dtype)
              for k, v in params.items()}  # non-trivial batch-norm weights and biases
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    for batch in (task.support, task.query):
        losses = task.loss(leaves, batch)
        assert losses.shape == (3,)
        loop = torch.stack([
            F.cross_entropy(functional_call(task.model, {k: v[b] for k, v in leaves.items()}, (batch.inputs[b],)),
                            batch.labels[b]) for b in range(3)
        ])
        torch.testing.assert_close(losses, loop, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        loop_grads = torch.autograd.grad(loop.sum(), list(leaves.values()))
        for g, h in zip(grads, loop_grads):
            torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grouped_logits(params, task.query.inputs),
                               vmap_logits(task.model, params, task.query.inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("forward", ["grouped", "vmap"])
def test_task_conforms(forward: str) -> None:
    check_task(small_task(torch.float64, forward))
    check_task(small_task(forward=forward))


def test_second_order_step_and_accuracy() -> None:
    task = small_task(torch.float64)
    theta0 = task.model.init_params(torch.Generator().manual_seed(0), dtype=torch.float64)
    theta0 = {k: v.requires_grad_() for k, v in theta0.items()}
    params = {k: v.expand(task.num_tasks, *v.shape) for k, v in theta0.items()}  # one θ0 for all episodes
    support = task.loss(params, task.support)
    grads = torch.autograd.grad(support.sum(), list(params.values()), create_graph=True)
    adapted = {k: v - 0.4 * g for (k, v), g in zip(params.items(), grads)}
    meta = task.loss(adapted, task.query).mean()
    meta_grads = torch.autograd.grad(meta, list(theta0.values()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in meta_grads)
    acc = task.accuracy(adapted)
    assert acc.shape == (task.num_tasks,) and not acc.requires_grad and bool(((acc >= 0) & (acc <= 1)).all())
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]]])
    torch.testing.assert_close(episode_accuracy(logits, torch.tensor([[0, 1, 1, 1]])), torch.tensor([0.75]))
    moved = task.to(dtype=torch.float32)
    assert moved.support.inputs.dtype == torch.float32 and moved.support.labels.dtype == torch.int64
    check_task(moved)


# --------------------------------------------------------------------------------------------
# The real data (shared/data/omniglot)


@pytest.fixture(scope="module")
def real_data(shared_data_dir: Path) -> OmniglotData:
    # The decoded arrays are cached under $L2O_CACHE (default ~/.cache/l2o): ~2-5 s the first time.
    return load_omniglot(shared_data_dir)


def test_real_data_layout_and_splits(real_data: OmniglotData, shared_data_dir: Path) -> None:
    assert real_data.images.shape == (NUM_BACKGROUND + NUM_EVALUATION, DRAWINGS, 28, 28)
    names = real_data.characters
    assert len(set(names)) == len(names) and names == tuple(sorted(names))
    assert sum(n.startswith("images_background/") for n in names) == NUM_BACKGROUND
    # every drawing has ink, and ink is the minority of pixels
    ink = real_data.images.float().mean((-1, -2))
    assert bool((ink > 0).all()) and float(ink.mean()) < 0.2 * 255
    split_names = {}
    for split in ("train", "val", "test"):
        family = OmniglotFamily(data=real_data, split=split, meta_batch_size=20, query_shots=5, channels=4)
        split_names[split] = set(family.characters)
        task = family.sample(torch.Generator().manual_seed(0))
        sampled = {family.characters[int(i)] for i in task.info.characters.flatten()}
        assert sampled <= split_names[split]
    assert [len(split_names[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert split_names["train"].isdisjoint(split_names["test"]) and split_names["val"].isdisjoint(split_names["test"])
    assert split_names["train"].isdisjoint(split_names["val"])
    assert set().union(*split_names.values()) == set(names)
    assert max(split_names["train"] | split_names["val"]) == "images_evaluation/Gurmukhi/character41"
    # the built-in PNG reader agrees with PIL on real files
    pil = pytest.importorskip("PIL.Image")
    with zipfile.ZipFile(shared_data_dir / "omniglot" / OMNIGLOT_FILES[1]) as z:
        entries = [i for i in z.infolist() if i.filename.endswith(".png")][::997]
        for info in entries:
            raw = z.read(info)
            np.testing.assert_array_equal(decode_png(raw), np.array(pil.open(io.BytesIO(raw)).convert("L")))


def test_real_data_smoke_adaptation(real_data: OmniglotData) -> None:
    family = OmniglotFamily(data=real_data, ways=5, shots=1, query_shots=5, meta_batch_size=4, channels=16)
    task = family.sample(torch.Generator().manual_seed(0))
    check_task(task)
    params = task.init(torch.Generator().manual_seed(0))
    before = task.loss(params, task.support)
    for _ in range(5):  # plain SGD on the support set, all episodes at once
        leaves = {k: v.requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(task.loss(leaves, task.support).sum(), list(leaves.values()))
        params = {k: (v - 0.4 * g).detach() for (k, v), g in zip(leaves.items(), grads)}
    after = task.loss(params, task.support)
    assert bool((after < 0.5 * before).all()), (before, after)
    assert float(task.accuracy(params, task.support).mean()) > 0.5  # chance: 0.2
