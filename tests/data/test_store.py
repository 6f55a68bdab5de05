"""The preprocess-once store: round trip, invalidation, resuming, bad files, the CLI."""

from __future__ import annotations

import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest

from byol3d.cli import main
from byol3d.data.discovery import find_frames
from byol3d.data.store import JOURNAL, MANIFEST, open_store, source_key
from byol3d.data.store_writer import write_store
from byol3d.data.synthetic_frames import write_endoscopy_dataset
from byol3d.errors import DataError
from byol3d.transforms.ct import ct_preprocess
from byol3d.transforms.frames import frame_preprocess

ROI = (8, 8, 8)
F16_STEP = 2.0**-11  # float16's spacing just below 1: rounding errors are at most half of it


def _volume(path, seed, shape=(14, 12, 10), spacing=(1.5, 1.0, 2.0)):
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, shape).astype(np.int16)
    array[:2] = -1000  # some air for the foreground crop
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return str(path)


@pytest.fixture
def volumes(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    return [_volume(folder / f"v{i}.nii.gz", seed=i) for i in range(4)]


def _pre(**kwargs):
    return ct_preprocess(roi_size=ROI, pixdim=(2.0, 2.0, 2.0), **kwargs)


class Counting:
    """A preprocessing that counts (and can fail on) the files it reads."""

    def __init__(self, preprocess, fail_at=None):
        self.preprocess, self.config, self.fail_at, self.read = preprocess, preprocess.config, fail_at, []  # fmt: skip

    def __call__(self, data):
        if self.fail_at is not None and len(self.read) == self.fail_at:
            raise KeyboardInterrupt  # the run is killed here
        self.read.append(data["image"])
        return self.preprocess(data)


def _array_times(store):
    return {e["source"]: os.stat(store.folder / e["file"]).st_mtime_ns for e in store.entries}


def test_store_round_trip_equals_the_preprocessing_within_float16(volumes, tmp_path):
    pre = _pre()
    report = write_store(volumes, pre, tmp_path / "store", progress=False)
    assert (report.written, report.kept, report.bad) == (4, 0, [])
    store = open_store(tmp_path / "store")
    assert len(store) == 4
    for path in volumes:
        i = store.index(path)
        arr, meta = store.array(i), store.meta(i)
        ref = pre({"image": path})["image"]
        assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and not arr.flags.writeable
        assert arr.shape == tuple(ref.shape) and meta["shape"] == list(ref.shape)
        np.testing.assert_allclose(arr.astype(np.float32), ref.numpy(), rtol=0, atol=F16_STEP / 2)
        assert meta["source"] == source_key(path)
        assert meta["spacing"] == pytest.approx([2.0, 2.0, 2.0])
        np.testing.assert_allclose(meta["affine"], ref.affine.numpy(), atol=1e-6)
        values = ref.numpy().astype(np.float64)
        assert meta["stats"]["mean"] == pytest.approx(values.mean(), rel=1e-6)
        assert meta["stats"]["std"] == pytest.approx(values.std(), rel=1e-6)
        assert (meta["stats"]["min"], meta["stats"]["max"]) == (values.min(), values.max())
    # start-up reads one manifest: sources, sizes, mtimes, the preprocessing and its hash
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert manifest["preprocess"]["pixdim"] == [2.0, 2.0, 2.0] and len(manifest["preprocess_hash"]) == 16  # fmt: skip
    assert {e["size"] for e in manifest["entries"]} == {os.path.getsize(p) for p in volumes}


def test_a_process_pool_writes_the_same_arrays(volumes, tmp_path):
    write_store(volumes, _pre(), tmp_path / "one", progress=False)
    report = write_store(volumes, _pre(), tmp_path / "pool", workers=2, progress=False)
    assert report.written == 4
    one, pool = open_store(tmp_path / "one"), open_store(tmp_path / "pool")
    for path in volumes:
        np.testing.assert_array_equal(one.array(one.index(path)), pool.array(pool.index(path)))


def test_a_touched_source_rebuilds_only_itself(volumes, tmp_path):
    first = write_store(volumes, _pre(), tmp_path / "store", progress=False).store
    before = _array_times(first)
    again = write_store(volumes, Counting(_pre()), tmp_path / "store", progress=False)
    assert (again.written, again.kept) == (0, 4)
    st = os.stat(volumes[2])
    os.utime(volumes[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    counting = Counting(_pre())
    report = write_store(volumes, counting, tmp_path / "store", progress=False)
    assert (report.written, report.kept) == (1, 3) and counting.read == [source_key(volumes[2])]
    after = _array_times(report.store)
    assert [s for s in before if before[s] != after[s]] == [source_key(volumes[2])]


def test_a_changed_preprocessing_setting_rebuilds_everything(volumes, tmp_path, caplog):
    write_store(volumes, _pre(), tmp_path / "store", progress=False)
    caplog.set_level(logging.INFO, logger="byol3d")
    report = write_store(volumes, _pre(hu_window=(-900.0, 900.0)), tmp_path / "store", progress=False)  # fmt: skip
    assert (report.written, report.kept) == (4, 0)
    assert "hu_window: [-1000.0, 1000.0] -> [-900.0, 900.0]" in report.reason
    assert open_store(tmp_path / "store").preprocess["hu_window"] == [-900.0, 900.0]


def test_an_interrupted_write_keeps_its_finished_volumes(volumes, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        write_store(volumes, Counting(_pre(), fail_at=2), tmp_path / "store", progress=False)
    with pytest.raises(DataError, match="interrupted"):
        open_store(tmp_path / "store")
    with open(tmp_path / "store" / JOURNAL, "a") as f:
        f.write('{"source": "/cut sh')  # a line the kill cut short
    counting = Counting(_pre())
    report = write_store(volumes, counting, tmp_path / "store", progress=False)
    assert (report.written, report.kept) == (2, 2)
    assert counting.read == [source_key(v) for v in volumes[2:]]
    assert not (tmp_path / "store" / JOURNAL).exists() and len(open_store(tmp_path / "store")) == 4


def test_a_bad_file_is_listed_once_and_not_read_again(volumes, tmp_path, caplog):
    bad = tmp_path / "ct" / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    files = [*volumes, str(bad)]
    with pytest.raises(DataError, match="broken.nii.gz"):
        write_store(files, _pre(), tmp_path / "strict", progress=False)
    caplog.set_level(logging.INFO, logger="byol3d")
    report = write_store(files, _pre(), tmp_path / "store", on_bad_file="skip", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.nii.gz" in warnings[0]
    assert [s for s, _ in report.bad] == [source_key(bad)] and report.written == 4
    caplog.clear()
    counting = Counting(_pre())
    again = write_store(files, counting, tmp_path / "store", on_bad_file="skip", progress=False)
    assert counting.read == [] and [s for s, _ in again.bad] == [source_key(bad)]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert open_store(tmp_path / "store").bad[0]["source"] == source_key(bad)
    with pytest.raises(DataError, match="broken.nii.gz"):  # known bad, error mode: named again
        write_store(files, counting, tmp_path / "store", progress=False)


def test_a_deleted_source_leaves_the_store_and_hash_catches_same_size_rewrites(tmp_path):
    (tmp_path / "nii").mkdir()
    files = [_volume(tmp_path / "nii" / f"v{i}.nii", seed=i) for i in range(3)]  # uncompressed
    first = write_store(files, _pre(), tmp_path / "store", hash_sources=True, progress=False)
    gone_file = first.store.folder / first.store.entries[first.store.index(files[0])]["file"]
    os.remove(files[0])
    st = os.stat(files[1])
    _volume(files[1], seed=99)  # other voxels, the same size; the mtime set back
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(files[1]) == st.st_size
    plain = write_store(files[1:], _pre(), tmp_path / "store", progress=False)
    assert not gone_file.exists() and len(plain.store) == 2 and plain.written == 0
    hashed = write_store(files[1:], _pre(), tmp_path / "store", hash_sources=True, progress=False)  # fmt: skip
    assert (hashed.written, hashed.kept) == (1, 1)


def test_multi_channel_subjects_are_one_entry_rebuilt_when_any_channel_changes(tmp_path):
    subjects = []
    for s in range(2):
        folder = tmp_path / f"sub{s}"
        folder.mkdir()
        subjects.append([_volume(folder / f"{c}.nii.gz", seed=10 * s + c) for c in range(2)])
    pre = _pre(in_channels=2)
    store = write_store(subjects, pre, tmp_path / "store", progress=False).store
    for subject in subjects:
        arr = store.array(store.index(subject))
        ref = pre({"image": subject})["image"].numpy()
        assert arr.shape == ref.shape and arr.shape[0] == 2
        np.testing.assert_allclose(arr.astype(np.float32), ref, rtol=0, atol=F16_STEP / 2)
    st = os.stat(subjects[1][1])
    os.utime(subjects[1][1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    report = write_store(subjects, pre, tmp_path / "store", progress=False)
    assert (report.written, report.kept) == (1, 1)


def test_frames_are_stored_as_uint8_exactly(tmp_path):
    write_endoscopy_dataset(tmp_path / "frames", n=3, videos=1, size=(40, 32))
    files = find_frames(tmp_path / "frames" / "images")
    pre = frame_preprocess()
    store = write_store(files, pre, tmp_path / "store", progress=False).store
    for path in files:
        arr = store.array(store.index(path))
        assert arr.dtype == np.uint8
        np.testing.assert_array_equal(arr, pre({"image": path})["image"].numpy())


def test_preprocess_command_writes_then_keeps(volumes, tmp_path, capsys):
    args = ["preprocess", "configs/demo_ct.yaml", f"data.root={tmp_path / 'ct'}",
            f"output_dir={tmp_path / 'run'}", "transforms.roi_size=[32,32,32]", "--quiet"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"store {tmp_path / 'run' / 'store'}: 4 volumes (4 written, 0 kept)" in out
    assert "data.cache=store" in out
    assert main([*args, "--workers", "2"]) == 0
    assert "4 volumes (0 written, 4 kept)" in capsys.readouterr().out
    assert main([*args, "--workers", "-1"]) == 2
    assert capsys.readouterr().err.startswith("byol3d: error: invalid workers -1")


class Recording(np.ndarray):
    """An array that records the shape of every region read from it by indexing."""

    reads: list = []

    def __getitem__(self, index):
        out = super().__getitem__(index)
        Recording.reads.append(np.shape(out))
        return out


def test_store_views_read_only_their_boxes_and_match_the_uncached_views(volumes, tmp_path, monkeypatch):  # fmt: skip
    from byol3d.data.datasets import build_dataset
    from byol3d.data.store import Store
    from byol3d.transforms.volume_views import view_transforms

    pre = _pre()
    write_store(volumes, pre, tmp_path / "store", progress=False)
    plain_views, store_views = view_transforms(roi_size=(4, 4, 4)), view_transforms(roi_size=(4, 4, 4))  # fmt: skip
    plain = build_dataset(volumes, pre, plain_views, cache="none")
    stored = build_dataset(volumes, pre, store_views, cache="store", cache_dir=tmp_path / "store")
    assert isinstance(stored.data[0]["image"], np.memmap)  # mapped, nothing read yet
    assert stored.cache_bytes == sum(2 * int(np.prod(pre({"image": v})["image"].shape)) for v in volumes)  # fmt: skip
    real_array = Store.array
    monkeypatch.setattr(Store, "array", lambda self, i: real_array(self, i).view(Recording))
    plain_views.set_random_state(seed=3)
    store_views.set_random_state(seed=3)
    for i in range(len(volumes)):
        Recording.reads = []
        a, b = plain[i], stored[i]
        boxes = [tuple(int(e - s) for s, e in b[f"view{k}_box"]) for k in (1, 2)]
        assert Recording.reads == [(1, *boxes[0]), (1, *boxes[1])]  # the two boxes, nothing more
        for k in (1, 2):  # the same random draws as without the store, on float16 values
            np.testing.assert_array_equal(a[f"view{k}_box"], b[f"view{k}_box"])
            np.testing.assert_allclose(b[f"view{k}"], a[f"view{k}"], atol=5e-3)


def test_a_store_of_other_preprocessing_or_other_files_is_refused(volumes, tmp_path):
    from byol3d.data.datasets import build_dataset
    from byol3d.transforms.volume_views import view_transforms

    write_store(volumes[:2], _pre(), tmp_path / "store", progress=False)
    views = view_transforms(roi_size=(4, 4, 4))
    with pytest.raises(DataError, match="v2.nii.gz is not in the store"):
        build_dataset(volumes, _pre(), views, cache="store", cache_dir=tmp_path / "store")
    with pytest.raises(DataError, match="other preprocessing settings"):
        build_dataset(volumes[:2], _pre(crop_foreground=False), views, cache="store",
                      cache_dir=tmp_path / "store")  # fmt: skip
    with pytest.raises(DataError, match="no store in"):
        build_dataset(volumes, _pre(), views, cache="store", cache_dir=tmp_path / "nothing")


def test_a_failed_array_write_is_one_error_naming_the_store_file(volumes, tmp_path, monkeypatch):
    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(DataError, match=r"cannot write the store file .*arrays/.*\.npy: .*No space left"):  # fmt: skip
        write_store(volumes, _pre(), tmp_path / "store", progress=False)
    assert not list((tmp_path / "store" / "arrays").glob("*.tmp"))  # nothing half-written left
