"""Tests for polytope_lens.data: every spec form against facts about the real data sets, and the bad inputs."""

import importlib.util
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from polytope_lens.data import DATA_SPEC_FORMS, DataSource, list_data, load_data
from polytope_lens.data import images as images_mod
from polytope_lens.data import text as text_mod
from polytope_lens.data.text import split_passages
from polytope_lens.errors import InvalidInputError, MissingDependencyError


def test_import_needs_no_optional_packages():
    """Importing the data and models packages pulls in none of the optional heavy packages."""
    code = ("import sys, polytope_lens.data, polytope_lens.models; "
            "bad = [m for m in ('transformers', 'sklearn', 'skimage', 'transformer_lens', 'PIL', 'rdata') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------- text
def test_split_passages_lengths_and_whitespace():
    """Passages are ~200 words, whitespace-normalised, and keep every word in order."""
    words = [f"w{i}" for i in range(1000)]
    text = ". ".join(" ".join(words[i:i + 10]) for i in range(0, 1000, 10)) + "."
    text = text.replace(" w5 ", "\n\n  w5\t")
    passages = split_passages(text)
    assert all("\n" not in p and "  " not in p for p in passages)
    assert " ".join(passages).replace(".", "").split() == words
    assert [len(p.split()) for p in passages] == [200] * 5


def test_split_passages_cuts_runaway_sentence():
    """A 1000-word sentence without a full stop is cut hard into pieces of at most 400 words."""
    passages = split_passages(" ".join(["x"] * 1000))
    assert sum(len(p.split()) for p in passages) == 1000
    assert max(len(p.split()) for p in passages) <= 400


def test_pydoc_passages():
    """pydoc gives whitespace-normalised ~200-word passages from CPython's topics, labelled by topic."""
    from pydoc_data.topics import topics

    src = load_data("pydoc")
    assert src.modality == "text" and src.spec == "pydoc"
    assert src.label_names == sorted(topics)
    assert set(np.unique(src.labels)) == set(range(len(topics)))
    lengths = np.array([len(p.split()) for p in src.items])
    assert 150 <= np.median(lengths) <= 260
    assert all("\n" not in p for p in src.items)
    assert sum(lengths) == sum(len(t.split()) for t in topics.values())
    assert len(load_data("pydoc", limit=7)) == 7
    json.dumps(src.provenance)


def test_austen_emma():
    """Emma's text opens with its famous first sentence and has label 'emma'."""
    if text_mod.find_austen() is None:
        pytest.skip("r-cran-janeaustenr is not extracted here (see AUSTEN_INSTALL)")
    src = load_data("austen:emma", limit=5)
    assert len(src) == 5 and src.spec == "austen:emma"
    assert "Emma Woodhouse, handsome, clever, and rich" in " ".join(src.items)
    assert {src.label_names[i] for i in src.labels} == {"emma"}
    full = load_data("austen")
    assert set(np.unique(full.labels)) == set(range(6))
    assert 3000 < len(full) < 4000  # 3.95M characters, ~700k words, ~200 words each
    json.dumps(full.provenance)


def test_austen_unknown_novel():
    """An unknown novel name is rejected with the six valid names."""
    with pytest.raises(InvalidInputError, match=r"'ulysses'.*emma.*sensesensibility"):
        load_data("austen:ulysses")


def test_austen_missing(tmp_path, monkeypatch):
    """Without the extracted Debian package, the error gives the apt-get download and dpkg -x commands."""
    monkeypatch.setenv("POLYTOPE_LENS_DATA", str(tmp_path))
    monkeypatch.setattr(text_mod, "AUSTEN_SYSTEM_DIRS", (tmp_path / "R",))
    with pytest.raises(MissingDependencyError, match=r"apt-get download r-cran-janeaustenr.*dpkg -x"):
        load_data("austen")
    assert ("austen", False) in [(n, ok) for n, ok, _ in list_data()]


def test_text_file(tmp_path):
    """A UTF-8 file becomes passages; a bare .txt path works the same."""
    path = tmp_path / "doc.txt"
    path.write_text("Héllo wörld.  Second\nsentence here.\n", encoding="utf-8")
    src = load_data(f"text:{path}")
    assert src.items == ["Héllo wörld. Second sentence here."]
    assert load_data(str(path)).items == src.items
    assert src.provenance["file"] == str(path.resolve())


def test_text_file_empty_and_bad(tmp_path):
    """Empty or whitespace-only files, missing files and non-UTF-8 files are rejected, naming the file."""
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\t ")
    with pytest.raises(InvalidInputError, match="empty.txt.*no words"):
        load_data(f"text:{empty}")
    with pytest.raises(InvalidInputError, match="no such file.*nope.txt"):
        load_data(f"text:{tmp_path / 'nope.txt'}")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InvalidInputError, match="not valid UTF-8"):
        load_data(f"text:{latin}")


# -------------------------------------------------------------------------------------------------- images
def test_skimage_photos():
    """The bundled photos load as RGB float32 (3, H, W) in [0, 1]; chelsea is 300x451 in scikit-image."""
    src = load_data("skimage")
    assert src.modality == "image"
    assert src.label_names[:6] == ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right"]
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert ("grace_hopper" in src.label_names) == has_mpl  # matplotlib's photo, when matplotlib is installed
    chelsea = src.items[src.label_names.index("chelsea")]
    assert chelsea.shape == (3, 300, 451) and chelsea.dtype == np.float32
    assert all(0.0 <= x.min() and x.max() <= 1.0 and x.shape[0] == 3 for x in src.items)
    assert src.items[0].shape == (3, 512, 512)  # astronaut
    assert load_data("skimage", limit=2).label_names == ["astronaut", "chelsea"]
    json.dumps(src.provenance)


def test_image_dir(tmp_path):
    """jpg/png files in class sub-folders load as RGB with labels from the folder names."""
    from PIL import Image

    (tmp_path / "dog").mkdir()
    (tmp_path / "cat").mkdir()
    Image.new("L", (10, 6), 255).save(tmp_path / "cat" / "a.png")
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(tmp_path / "dog" / "b.PNG")
    Image.new("RGB", (5, 5), (0, 0, 255)).save(tmp_path / "dog" / "c.jpg")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    src = load_data(f"images:{tmp_path}")
    assert src.label_names == ["cat", "dog"]
    assert list(src.labels) == [0, 1, 1]
    assert src.items[0].shape == (3, 6, 10) and np.allclose(src.items[0], 1.0)
    assert np.allclose(src.items[1][:, 0, 0], [1.0, 0.0, 0.0])
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (3, 3)).save(flat / "x.png")
    assert load_data(f"images:{flat}").labels is None


def test_image_dir_bad(tmp_path):
    """A missing folder or one without images is rejected."""
    with pytest.raises(InvalidInputError, match="no such folder"):
        load_data(f"images:{tmp_path / 'missing'}")
    with pytest.raises(InvalidInputError, match="holds no"):
        load_data(f"images:{tmp_path}")


def test_digits():
    """sklearn digits: 1797 images (N, 1, 8, 8) in [0, 1] with labels 0-9."""
    src = load_data("digits")
    assert src.items.shape == (1797, 1, 8, 8) and src.items.dtype == np.float32
    assert src.items.min() == 0.0 and src.items.max() == 1.0
    assert src.label_names == [str(d) for d in range(10)]
    assert np.bincount(src.labels).min() >= 174


def test_digits_limit_is_stratified_and_seeded():
    """limit=50 gives 5 of each digit; the same seed gives the same rows, another seed other rows."""
    a = load_data("digits", limit=50, seed=1)
    assert np.bincount(a.labels).tolist() == [5] * 10
    b = load_data("digits", limit=50, seed=1)
    c = load_data("digits", limit=50, seed=2)
    assert np.array_equal(a.items, b.items)
    assert not np.array_equal(a.items, c.items)
    assert np.bincount(load_data("digits", limit=23).labels).max() == 3


def test_fashion_mnist():
    """The official test split has 10000 images, 1000 per class; a limit gives a balanced sample."""
    if images_mod.find_fashion_mnist() is None:
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    src = load_data("fashion-mnist")
    assert src.spec == "fashion-mnist:test"
    assert src.items.shape == (10000, 1, 28, 28) and src.items.dtype == np.float32
    assert np.bincount(src.labels).tolist() == [1000] * 10
    assert src.label_names[0] == "T-shirt/top" and src.label_names[9] == "Ankle boot"
    assert 0.0 <= src.items.min() and src.items.max() == 1.0
    train = load_data("fashion-mnist:train", limit=100)
    assert np.bincount(train.labels).tolist() == [10] * 10
    with pytest.raises(InvalidInputError, match="'val'.*train, test"):
        load_data("fashion-mnist:val")


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    """Without the Debian package the error says apt-get install dataset-fashion-mnist."""
    monkeypatch.setattr(images_mod, "FASHION_DIRS", [tmp_path])
    monkeypatch.setenv("POLYTOPE_LENS_DATA", str(tmp_path))
    monkeypatch.setattr(images_mod.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist")
    assert ("fashion-mnist", False) in [(n, ok) for n, ok, _ in list_data()]


# -------------------------------------------------------------------------------------------------- arrays
def test_npy_roundtrip(tmp_path):
    """A .npy array loads unchanged, by spec or bare path, and limit keeps the first rows."""
    x = np.arange(24, dtype=np.float64).reshape(6, 4)
    np.save(tmp_path / "x.npy", x)
    src = load_data(f"npy:{tmp_path / 'x.npy'}")
    assert src.modality == "array" and np.array_equal(src.items, x)
    assert np.array_equal(load_data(str(tmp_path / "x.npy"), limit=2).items, x[:2])


def test_npz_keys_and_labels(tmp_path):
    """npz: the only data array or a named key is used; 'labels' becomes the labels."""
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((3, 2)), labels=np.array([0, 1, 0]))
    src = load_data(f"npz:{path}")
    assert src.spec == f"npz:{path}:x" and list(src.labels) == [0, 1, 0]
    assert load_data(str(path)).items.shape == (3, 2)
    multi = tmp_path / "m.npz"
    np.savez(multi, a=np.zeros((2, 2)), b=np.ones((4, 1)))
    assert load_data(f"npz:{multi}:b").items.shape == (4, 1)
    with pytest.raises(InvalidInputError, match="holds arrays a, b"):
        load_data(f"npz:{multi}")
    with pytest.raises(InvalidInputError, match="no array 'c'"):
        load_data(f"npz:{multi}:c")


def test_nan_array_rejected(tmp_path):
    """An array holding NaN is rejected with the position of the first NaN."""
    x = np.zeros((3, 2))
    x[1, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(InvalidInputError, match=r"1 NaN value.*\(1, 1\)"):
        load_data(f"npy:{tmp_path / 'nan.npy'}")
    np.savez(tmp_path / "inf.npz", x=np.array([[np.inf]]))
    with pytest.raises(InvalidInputError, match="infinite"):
        load_data(str(tmp_path / "inf.npz"))


def test_bad_array_files(tmp_path):
    """Object arrays, empty arrays and missing files are rejected."""
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInputError, match="without pickle"):
        load_data(f"npy:{tmp_path / 'obj.npy'}")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    with pytest.raises(InvalidInputError, match=r"shape \(0, 3\)"):
        load_data(f"npy:{tmp_path / 'empty.npy'}")
    with pytest.raises(InvalidInputError, match="no such file"):
        load_data(f"npy:{tmp_path / 'missing.npy'}")


# ---------------------------------------------------------------------------------------- spec and container
@pytest.mark.parametrize("spec", ["mnist", "cifar10:train", "data.csv", ""])
def test_unknown_spec(spec):
    """Unknown specs are rejected with the list of valid forms."""
    with pytest.raises(InvalidInputError, match="fashion-mnist"):
        load_data(spec)


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_bad_limit(limit):
    """limit must be a positive int."""
    with pytest.raises(InvalidInputError, match="'limit'"):
        load_data("pydoc", limit=limit)


def test_subset_records_provenance():
    """subset keeps labels aligned, works on lists and arrays, and notes the rows in provenance."""
    src = load_data("digits", limit=20)
    sub = src.subset([3, 0, -1])
    assert np.array_equal(sub.items, src.items[[3, 0, 19]])
    assert np.array_equal(sub.labels, src.labels[[3, 0, 19]])
    assert sub.provenance["subsets"][-1] == {"from_items": 20, "n_items": 3, "rows": [3, 0, 19]}
    assert "subsets" not in src.provenance
    text = load_data("pydoc", limit=5).subset(slice(1, 3))
    assert len(text) == 2 and isinstance(text.items, list)
    with pytest.raises(InvalidInputError, match="out of range"):
        src.subset([20])
    json.dumps(sub.provenance)


def test_datasource_checks():
    """A DataSource rejects an unknown modality and a label count that differs from the item count."""
    with pytest.raises(InvalidInputError, match="'audio'"):
        DataSource("x", "audio", [1])
    with pytest.raises(InvalidInputError, match="2 items but 1 labels"):
        DataSource("x", "array", np.zeros((2, 1)), np.array([0]))


def test_list_data():
    """list_data names every spec family and marks pydoc available."""
    rows = list_data()
    names = [name for name, _, _ in rows]
    assert names[0] == "pydoc" and rows[0][1] is True
    assert {"austen", "skimage", "digits", "fashion-mnist", "npy:PATH"} <= set(names)
    assert all(isinstance(reason, str) and reason for _, _, reason in rows)
    assert "pydoc" in DATA_SPEC_FORMS


# -------------------------------------------------------------------------- byte order, damaged and non-real arrays
def test_big_endian_arrays_load_as_the_native_arrays(tmp_path):
    """Arrays in non-native byte order (MATLAB, FITS, HDF5 exports) crashed every array command in torch
    ("byte order different from the native byte order"). Oracle: the same values in native order give the same items,
    labels and encoded model inputs."""
    from polytope_lens.models import load_model

    x = np.random.default_rng(0).normal(size=(6, 2))
    swapped = x.dtype.newbyteorder("S")
    np.save(tmp_path / "n.npy", x.astype(np.float32))
    np.save(tmp_path / "s.npy", x.astype(np.dtype(np.float32).newbyteorder("S")))
    np.savez(tmp_path / "n.npz", x=x, labels=np.arange(6))
    np.savez(tmp_path / "s.npz", x=x.astype(swapped), labels=np.arange(6).astype(np.dtype(np.int64).newbyteorder("S")))
    assert not np.load(tmp_path / "s.npy").dtype.isnative
    bundle = load_model("toy:2-8-3")
    for native, other in (("n.npy", "s.npy"), ("n.npz", "s.npz")):
        want, got = load_data(str(tmp_path / native)), load_data(str(tmp_path / other))
        assert got.items.dtype == want.items.dtype and got.items.dtype.isnative
        assert np.array_equal(got.items, want.items)
        assert got.labels is None if want.labels is None else np.array_equal(got.labels, want.labels)
        assert np.array_equal(bundle.encode(got).tensors["input"], bundle.encode(want).tensors["input"])
    # a DataSource made by hand reaches the model the same way
    api = bundle.encode(DataSource("swapped", "array", x.astype(swapped)))
    assert np.array_equal(api.tensors["input"], bundle.encode(DataSource("native", "array", x)).tensors["input"])


def _npz_damage(tmp_path):
    """name -> damaged .npz file (and the member the damage hits)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ok.npz", x=rng.random((5, 2)))
    b = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(b[:-30])
    flipped = bytearray(b)
    flipped[150] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    np.savez_compressed(tmp_path / "okz.npz", x=rng.random((50, 2)))
    flipped = bytearray((tmp_path / "okz.npz").read_bytes())
    flipped[120] ^= 0xFF
    (tmp_path / "zlib.npz").write_bytes(bytes(flipped))
    np.save(tmp_path / "ok.npy", rng.random((50, 2)))
    (tmp_path / "short.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:-30])
    np.savez(tmp_path / "obj.npz", x=np.array([1, "a"], dtype=object))
    np.savez(tmp_path / "objlab.npz", x=rng.random((2, 2)), labels=np.array([1, "a"], dtype=object))


@pytest.mark.parametrize("name, message", [
    ("trunc", "Cannot read '{p}': File is not a zip file; the file is damaged or cut short."),
    ("crc", "Cannot read array 'x' of '{p}': Bad CRC-32 for file 'x.npy'; the file is damaged or cut short."),
    ("zlib", "Cannot read array 'x' of '{p}': Error -3 while decompressing data: invalid "),
    ("short", "Cannot read '{p}': Failed to read all data for array. Expected (50, 2) = 100 elements, could only "
              "read 96 elements. (file seems not fully written?); the file is damaged or cut short."),
    ("obj", "Cannot read array 'x' of '{p}' without pickle (Object arrays cannot be loaded when allow_pickle=False); "
            "save a numeric array."),
    ("objlab", "Cannot read array 'labels' of '{p}' without pickle (Object arrays cannot be loaded when "
               "allow_pickle=False); save a numeric array."),
])
def test_damaged_npz_is_one_line(tmp_path, name, message):
    """A truncated archive, a flipped byte (CRC or deflate error) and an object member printed a traceback
    (BadZipFile, zlib.error, ValueError from the member read); a truncated .npy was said to need pickle. Oracle: the
    exact one-line message."""
    _npz_damage(tmp_path)
    p = tmp_path / (f"{name}.npy" if name == "short" else f"{name}.npz")
    with pytest.raises(InvalidInputError) as info:
        load_data(str(p))
    text = str(info.value)
    assert "\n" not in text and text.startswith(message.format(p=p)), text


@pytest.mark.parametrize("array, dtype", [
    (np.array([[0, 1], [1, 0]], dtype=complex) + 0.5j, "complex128"),
    (np.array([["a", "b"], ["c", "d"]]), "<U1"),
    (np.array([[1, 2]], dtype="timedelta64[s]"), "timedelta64[s]"),
    (np.zeros(2, dtype=[("a", "f4"), ("b", "f4")]), "[('a', '<f4'), ('b', '<f4')]"),
])
def test_arrays_of_other_than_real_numbers_are_refused(tmp_path, array, dtype):
    """Complex arrays were cut to their real part (a NumPy warning, then counts of other points); strings, dates and
    records are no model input either. Oracle: the one-line message, for npy:, npz: and a DataSource by hand."""
    from polytope_lens.models import load_model

    np.save(tmp_path / "a.npy", array)
    np.savez(tmp_path / "a.npz", x=array)
    for spec, what in ((f"npy:{tmp_path / 'a.npy'}", f"Array in '{tmp_path / 'a.npy'}'"),
                       (f"npz:{tmp_path / 'a.npz'}", f"Array 'x' in '{tmp_path / 'a.npz'}'")):
        with pytest.raises(InvalidInputError) as info:
            load_data(spec)
        assert str(info.value) == f"{what} must hold real numbers; it holds {dtype}."
    with pytest.raises(InvalidInputError) as info:
        load_model("toy:2-8-3").encode(DataSource("mine", "array", array))
    assert str(info.value) == f"Data 'mine' must hold real numbers; it holds {dtype}."
