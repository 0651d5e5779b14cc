"""Dataset discovery, near-duplicate grouping and the grouped split, on small generated images."""
import json
import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance

import core.data as D
import core.engine as E


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    """Keep the phash/image caches of these tests out of the user's cache."""
    cache = tmp_path / "_cache" / "phash.json"
    monkeypatch.setattr(D, "HASH_CACHE", cache)
    monkeypatch.setattr(E, "HASH_CACHE", cache)
    return cache


# ----------------------------------------------------------------------------- generators
def pattern(seed: int, size: int = 96) -> np.ndarray:
    """A smooth random grey pattern: distinct seeds give unrelated perceptual hashes."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((size, size), Image.BICUBIC))


def save(path, arr, quality=95, contrast=1.0, brightness=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    if contrast != 1.0:
        img = ImageEnhance.Contrast(img).enhance(contrast)
    if brightness != 1.0:
        img = ImageEnhance.Brightness(img).enhance(brightness)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=quality)
    else:
        img.save(path)
    return path


def make_family_dataset(root, classes=("glioma", "meningioma", "pituitary", "notumor"),
                        per_class=6, seed0=0):
    """Each 'family' is one pattern saved three times: original, low-quality re-save, and a
    contrast/brightness change. Returns {relative path: family id}."""
    fam = {}
    for ci, c in enumerate(classes):
        for k in range(per_class):
            fid = f"{c}{k}"
            arr = pattern(seed0 + 100 * ci + k)
            save(root / c / f"{fid}_a.jpg", arr, quality=95)
            save(root / c / f"{fid}_b.jpg", arr, quality=35)
            save(root / c / f"{fid}_c.png", arr, contrast=0.75, brightness=1.1)
            for v in "abc":
                fam[f"{c}/{fid}_{v}." + ("png" if v == "c" else "jpg")] = fid
    return fam


def grouped_split(root, seed=0, source=None):
    samples = D.discover(root, source).samples
    D.assign_groups(samples)
    D.split_by_group(samples, seed=seed)
    return samples


# ----------------------------------------------------------------------------- layouts
def test_flat_layout_with_aliases_hidden_and_non_images(tmp_path):
    root = tmp_path / "ds"
    save(root / "glioma_tumor" / "a.jpg", pattern(1))
    save(root / "Brain_Menin" / "b.png", pattern(2))
    save(root / "no_tumor" / "c.jpg", pattern(3))
    save(root / "pituitary_tumor" / "sub" / "d.jpg", pattern(4))   # nested below a class
    save(root / "yes" / "e.jpg", pattern(5))
    save(root / "Astrocytoma" / "f.jpg", pattern(6))
    (root / "glioma_tumor" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "glioma_tumor" / "._a.jpg").write_bytes(b"AppleDouble")
    (root / "no_tumor" / "notes.txt").write_text("not an image")
    save(root / "no_tumor" / ".thumbs" / "x.jpg", pattern(7))      # inside a hidden folder
    save(root / ".hidden_class" / "y.jpg", pattern(8))              # hidden class folder: ignored
    save(root / "masks" / "m.png", pattern(9))                      # mask folder: not a class

    scan = D.discover(root, "mine")
    got = {s.rel: (s.label, s.original, s.source, s.preset_split) for s in scan.samples}
    assert got == {
        "glioma_tumor/a.jpg": ("glioma", "glioma_tumor", "mine", None),
        "Brain_Menin/b.png": ("meningioma", "Brain_Menin", "mine", None),
        "no_tumor/c.jpg": ("notumor", "no_tumor", "mine", None),
        "pituitary_tumor/sub/d.jpg": ("pituitary", "pituitary_tumor", "mine", None),
        "yes/e.jpg": ("tumor", "yes", "mine", None),
        "Astrocytoma/f.jpg": ("astrocytoma", "Astrocytoma", "mine", None),
    }
    for s in scan.samples:
        assert s.path == str((root / s.rel).resolve())
    skipped = dict(scan.skipped)
    assert skipped["glioma_tumor/.DS_Store"] == "hidden file"
    assert skipped["glioma_tumor/._a.jpg"] == "hidden file"
    assert skipped["no_tumor/.thumbs/x.jpg"] == "hidden file"
    assert skipped["no_tumor/notes.txt"] == "not an image file"
    assert skipped[".hidden_class/"] == "hidden folder"   # reported once, not walked
    assert skipped["masks/"] == "a folder of masks: not read as scans"
    assert len(scan.skipped) == 6


def test_training_testing_layout_marks_testing_as_test(tmp_path):
    root = tmp_path / "kaggle"
    save(root / "Training" / "glioma_tumor" / "g1.jpg", pattern(1))
    save(root / "Training" / "no_tumor" / "n1.jpg", pattern(2))
    save(root / "Testing" / "glioma_tumor" / "g2.jpg", pattern(3))
    save(root / "Testing" / "no_tumor" / "n2.jpg", pattern(4))
    scan = D.discover(root)
    got = {s.rel: (s.label, s.preset_split) for s in scan.samples}
    assert got == {"Training/glioma_tumor/g1.jpg": ("glioma", None),
                   "Training/no_tumor/n1.jpg": ("notumor", None),
                   "Testing/glioma_tumor/g2.jpg": ("glioma", "test"),
                   "Testing/no_tumor/n2.jpg": ("notumor", "test")}
    assert {s.source for s in scan.samples} == {"kaggle"}


@pytest.mark.parametrize("train_dir, test_dir", [("Training ", "Testing "), ("training_set", "test_set"),
                                                 ("Train-Data", "Testing")])
def test_split_folders_spelled_otherwise_are_splits_not_classes(tmp_path, train_dir, test_dir):
    """'Training /' or 'training_set/' became classes named training and testing (session 37 review)."""
    root = tmp_path / "kaggle"
    save(root / train_dir / "glioma" / "g1.jpg", pattern(1))
    save(root / train_dir / "no_tumor" / "n1.jpg", pattern(2))
    save(root / test_dir / "glioma" / "g2.jpg", pattern(3))
    scan = D.discover(root)
    assert {(s.label, s.preset_split) for s in scan.samples} == {("glioma", None), ("notumor", None),
                                                                ("glioma", "test")}
    assert D.split_of("data") is None and D.split_of("Validation") == "val" and D.split_of("glioma") is None


def test_a_mask_beside_its_scan_is_not_a_scan(tmp_path):
    save(tmp_path / "d" / "glioma" / "TCGA_CS_1_1.tif", pattern(1))
    save(tmp_path / "d" / "glioma" / "TCGA_CS_1_1_mask.tif", pattern(2))
    save(tmp_path / "d" / "notumor" / "lone_mask.tif", pattern(3))   # no scan beside it: a scan
    scan = D.discover(tmp_path / "d")
    assert sorted(s.rel for s in scan.samples) == ["glioma/TCGA_CS_1_1.tif", "notumor/lone_mask.tif"]
    assert dict(scan.skipped)["glioma/TCGA_CS_1_1_mask.tif"].startswith("a tumour mask beside its scan")


def test_a_wrapper_folder_named_like_a_class_does_not_label_its_contents(tmp_path):
    """An archive unpacked as "Brain Tumor/Training/glioma/..." labelled every image 'tumor'
    (normal scans included) and read Training as test data."""
    root = tmp_path / "download"
    save(root / "Brain Tumor" / "Training" / "glioma" / "g1.jpg", pattern(1))
    save(root / "Brain Tumor" / "Testing" / "glioma" / "g2.jpg", pattern(2))
    save(root / "Brain Tumor" / "Testing" / "notumor" / "n1.jpg", pattern(3))
    (root / "README.txt").write_text("from a download page")
    got = {s.rel: (s.label, s.preset_split) for s in D.discover(root).samples}
    assert got == {"Brain Tumor/Training/glioma/g1.jpg": ("glioma", None),
                   "Brain Tumor/Testing/glioma/g2.jpg": ("glioma", "test"),
                   "Brain Tumor/Testing/notumor/n1.jpg": ("notumor", "test")}
    nested = tmp_path / "nested"
    save(nested / "brain-tumor" / "glioma_tumor" / "a.jpg", pattern(4))
    save(nested / "brain-tumor" / "no_tumor" / "b.jpg", pattern(5))
    assert {s.label for s in D.discover(nested).samples} == {"glioma", "notumor"}
    twice = tmp_path / "twice"   # wrappers nest: "archive/Brain Tumor/Training/..."
    save(twice / "archive" / "Brain Tumor" / "Training" / "glioma" / "a.jpg", pattern(8))
    save(twice / "archive" / "Brain Tumor" / "Training" / "pituitary" / "b.jpg", pattern(9))
    scan = D.discover(twice)
    assert {s.label for s in scan.samples} == {"glioma", "pituitary"}
    assert scan.wrapper == "archive/Brain Tumor/" and scan.inner(scan.samples[0].rel).startswith("Training/")
    one_class = tmp_path / "one"   # a class folder holding patients' folders stays one class
    save(one_class / "yes" / "patient1" / "a.jpg", pattern(6))
    save(one_class / "yes" / "patient2" / "b.jpg", pattern(7))
    assert {s.label for s in D.discover(one_class).samples} == {"tumor"}


def test_jpegs_without_a_usual_suffix_are_read(tmp_path):
    root = tmp_path / "ds"
    for name in ("a.jfif", "b.jpe", "c_no_suffix", "d.bak"):
        save(root / "glioma" / "x.jpg", pattern(len(name)))
        (root / "glioma" / "x.jpg").rename(root / "glioma" / name)
    (root / "glioma" / "notes").write_text("plain text, no image")
    (root / "glioma" / "BMI_notes.txt").write_text("BMI 24, no image either")   # "BM" alone is no bitmap
    Image.new("L", (32, 32), 90).save(root / "glioma" / "e_bitmap", "BMP")
    scan = D.discover(root)
    assert sorted(s.rel for s in scan.samples) == ["glioma/a.jfif", "glioma/b.jpe", "glioma/c_no_suffix",
                                                   "glioma/d.bak", "glioma/e_bitmap"]
    assert dict(scan.skipped) == {"glioma/notes": "not an image file", "glioma/BMI_notes.txt": "not an image file"}


def test_unreadable_images_are_skipped_only_when_checked(tmp_path):
    root = tmp_path / "ds"
    save(root / "glioma" / "good.jpg", pattern(1))
    (root / "glioma" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "notumor").mkdir()
    (root / "notumor" / "empty.png").write_bytes(b"")
    save(root / "notumor" / "good.png", pattern(2))

    loose = D.discover(root)
    assert len(loose.samples) == 4 and loose.skipped == []
    checked = D.discover(root, check_readable=True)
    assert sorted(s.rel for s in checked.samples) == ["glioma/good.jpg", "notumor/good.png"]
    reasons = dict(checked.skipped)
    assert set(reasons) == {"glioma/broken.jpg", "notumor/empty.png"}
    assert all(isinstance(r, str) and r for r in reasons.values())


def test_no_images_or_no_directory_is_an_error(tmp_path):
    (tmp_path / "empty" / "glioma").mkdir(parents=True)
    (tmp_path / "empty" / "glioma" / "readme.txt").write_text("x")
    with pytest.raises(ValueError):
        D.discover(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        D.discover(tmp_path / "missing")


# ----------------------------------------------------------------------------- grouping and split
def test_near_duplicate_pairs_by_hamming_distance():
    h = np.array([0b0, 0b111, 0b1111111, 2**64 - 1], dtype=np.uint64)
    assert D.near_duplicate_pairs(h, 3) == [(0, 1)]
    assert D.near_duplicate_pairs(h, 4) == [(0, 1), (1, 2)]
    assert D.near_duplicate_pairs(h, 7) == [(0, 1), (0, 2), (1, 2)]


def test_groups_follow_near_duplicate_families(tmp_path):
    root = tmp_path / "ds"
    fam = make_family_dataset(root)
    samples = D.discover(root).samples
    D.assign_groups(samples)
    groups_of_family = {}
    for s in samples:
        groups_of_family.setdefault(fam[s.rel], set()).add(s.group)
    # Every family in exactly one group, and no two families share a group.
    assert all(len(g) == 1 for g in groups_of_family.values()), groups_of_family
    assert len({next(iter(g)) for g in groups_of_family.values()}) == len(groups_of_family) == 24


def test_grouped_split_has_no_cross_split_near_duplicates(tmp_path):
    root = tmp_path / "ds"
    fam = make_family_dataset(root)
    samples = grouped_split(root, seed=0)
    assert {s.split for s in samples} == {"train", "val", "test"}
    split_of_family = {}
    for s in samples:
        split_of_family.setdefault(fam[s.rel], set()).add(s.split)
    assert all(len(v) == 1 for v in split_of_family.values()), split_of_family
    assert D.cross_split_duplicates(samples) == []
    # The check itself can fail: a per-image random split leaks near duplicates.
    rng = random.Random(0)
    for s in samples:
        s.split = rng.choice(["train", "val", "test"])
    leaks = D.cross_split_duplicates(samples)
    assert leaks
    a_split, a_rel, b_split, b_rel = leaks[0]
    assert a_split != b_split and a_rel.startswith("ds/") and b_rel.startswith("ds/")


def test_split_is_seeded_and_reproducible(tmp_path):
    root = tmp_path / "ds"
    make_family_dataset(root)
    a = {s.rel: s.split for s in grouped_split(root, seed=0)}
    b = {s.rel: s.split for s in grouped_split(root, seed=0)}
    c = {s.rel: s.split for s in grouped_split(root, seed=1)}
    assert a == b
    assert a != c


def test_split_sizes_roughly_follow_fractions(tmp_path):
    root = tmp_path / "ds"
    make_family_dataset(root, per_class=10)  # 40 groups, 120 images
    samples = grouped_split(root, seed=0)
    n = len(samples)
    frac = {k: sum(s.split == k for s in samples) / n for k in ("train", "val", "test")}
    assert 0.5 <= frac["train"] <= 0.85
    assert 0.05 <= frac["val"] <= 0.3 and 0.05 <= frac["test"] <= 0.3


def test_split_record_round_trip(tmp_path):
    root = tmp_path / "ds"
    make_family_dataset(root)
    samples = grouped_split(root, seed=3, source="bench")
    rec = json.loads(json.dumps(D.split_record(samples)))
    assert set(rec) == {"bench"}
    assert sum(len(v) for v in rec["bench"].values()) == len(samples)
    assert all(v == sorted(v) for v in rec["bench"].values())
    fresh = D.discover(root, "bench").samples
    assert all(s.split == "" for s in fresh)
    D.apply_split_record(fresh, rec)
    assert {s.rel: s.split for s in fresh} == {s.rel: s.split for s in samples}
    # Files the record does not know get no split rather than a wrong one.
    save(root / "glioma" / "new.jpg", pattern(999))
    fresh = D.discover(root, "bench").samples
    D.apply_split_record(fresh, rec)
    assert [s.split for s in fresh if s.rel == "glioma/new.jpg"] == [""]


def kaggle_layout(root, train_seed: int, test_seed: int, n_train: int = 12, n_test: int = 4):
    """glioma/notumor under Training/ and Testing/, every image its own pattern."""
    for ci, c in enumerate(("glioma", "notumor")):
        for k in range(n_train):
            save(root / "Training" / c / f"tr{k}.jpg", pattern(train_seed + 50 * ci + k))
        for k in range(n_test):
            save(root / "Testing" / c / f"te{k}.jpg", pattern(test_seed + 50 * ci + k))
    return root


def test_testing_folder_stays_test_and_pulls_its_duplicates(tmp_path):
    root = kaggle_layout(tmp_path / "kaggle", 1000, 2000)
    # A Training image that is a re-saved copy of a Testing image must not stay in training.
    save(root / "Training" / "glioma" / "copy_of_te1.jpg", pattern(2001), quality=40)
    samples = grouped_split(root, seed=0)
    by_rel = {s.rel: s for s in samples}
    assert all(s.split == "test" for s in samples if s.preset_split == "test")
    assert by_rel["Training/glioma/copy_of_te1.jpg"].split == "test"
    assert by_rel["Training/glioma/copy_of_te1.jpg"].group == by_rel["Testing/glioma/te1.jpg"].group
    # No other Training image goes to test: the shipped test split is the test split.
    others = [s for s in samples if s.preset_split is None and s.rel != "Training/glioma/copy_of_te1.jpg"]
    assert {s.split for s in others} == {"train", "val"}
    assert D.cross_split_duplicates(samples) == []


def test_patient_slices_share_a_group_and_patients_never_merge(tmp_path):
    root = tmp_path / "lgg"
    for k in range(3):
        save(root / "glioma" / f"TCGA_CS_4941_{k + 1:03d}.jpg", pattern(10 + k))
    # Patient B's first slice looks like patient A's second (similar FLAIR slices).
    save(root / "notumor" / "TCGA_DU_5851_001.jpg", pattern(11), quality=50)
    save(root / "notumor" / "TCGA_DU_5851_002.jpg", pattern(20))
    # A file without a patient id that duplicates A's third slice joins A's group.
    save(root / "glioma" / "loose.jpg", pattern(12), contrast=0.8)
    samples = D.discover(root).samples
    D.assign_groups(samples)
    g = {s.rel.split("/")[1]: s.group for s in samples}
    a = {g[f"TCGA_CS_4941_{k:03d}.jpg"] for k in (1, 2, 3)}
    b = {g["TCGA_DU_5851_001.jpg"], g["TCGA_DU_5851_002.jpg"]}
    assert len(a) == 1 and len(b) == 1 and a != b
    assert g["loose.jpg"] in a


def textured(arr: np.ndarray, amp: float = 60.0) -> np.ndarray:
    """The pattern under a coarse checkerboard of noise: its phash stays near the pattern's
    while its pixels no longer correlate (a loose hash match, not a copy)."""
    noise = np.kron(np.random.default_rng(7).choice([-1.0, 1.0], (24, 24)), np.ones((4, 4))) * amp
    return np.clip(arr + noise, 0, 255).astype(np.uint8)


def test_loose_hash_match_does_not_tie_an_image_to_a_patient(tmp_path):
    """A phash within 6 bits of a patient's slice is not enough for an image of another
    collection, or another patient's slice, to count as its copy: the pixels must match too. Otherwise such links chain
    unrelated scans to patients, whose groups then refuse their real copies."""
    root = tmp_path / "mixed"
    for k in range(3):
        save(root / "glioma" / f"TCGA_CS_4941_{k + 1:03d}.png", pattern(10 + k))
    save(root / "glioma" / "textured.png", textured(pattern(11)))
    save(root / "glioma" / "resaved.jpg", pattern(12), quality=40)  # a true copy still joins
    for k in range(6):
        save(root / "notumor" / f"n{k}.png", pattern(300 + k))
    samples = D.discover(root).samples
    by = {s.rel.split("/")[1]: i for i, s in enumerate(samples)}
    h = D.phashes([s.path for s in samples])
    slice2, loose = by["TCGA_CS_4941_002.png"], by["textured.png"]
    assert int(np.bitwise_count(h[slice2] ^ h[loose])) <= 6  # the hash alone would join them
    pairs = set(D.copy_pairs([s.path for s in samples]))
    assert (min(slice2, loose), max(slice2, loose)) not in pairs
    slice3 = by["TCGA_CS_4941_003.png"]
    assert (min(slice3, by["resaved.jpg"]), max(slice3, by["resaved.jpg"])) in pairs
    D.assign_groups(samples)
    g = {s.rel.split("/")[1]: s.group for s in samples}
    assert g["resaved.jpg"] == g["TCGA_CS_4941_002.png"] != g["textured.png"]


def test_loose_hash_match_between_two_patients_is_not_a_copy(tmp_path):
    """copies_in_training must not mark a slice because another patient's slice hashes alike."""
    root = tmp_path / "lgg"
    save(root / "glioma" / "TCGA_CS_4941_001.png", pattern(11))
    save(root / "glioma" / "TCGA_DU_5851_001.png", textured(pattern(11)))
    save(root / "glioma" / "TCGA_DU_5851_002.png", pattern(11), quality=40)  # a real copy
    samples = D.discover(root).samples
    h = D.phashes([s.path for s in samples])
    assert int(np.bitwise_count(h[0] ^ h[1])) <= 6
    for s in samples:
        s.split = "train" if "4941" in s.rel else "test"
    assert D.copies_in_training(samples) == {("lgg", "glioma/TCGA_DU_5851_002.png")}


def test_mirrored_and_half_turned_copies_join_their_original(tmp_path):
    """The benchmark holds flipped copies of its own images, whose phash is unrelated to the
    original's: they are found by hashing the flips and checking the pixels."""
    root = tmp_path / "ds"
    for k in range(8):
        save(root / "glioma" / f"p{k}.jpg", pattern(500 + k))
    a = pattern(500)
    save(root / "notumor" / "mirror.png", np.ascontiguousarray(a[:, ::-1]))
    save(root / "notumor" / "turned.jpg", np.ascontiguousarray(a[::-1, ::-1]), quality=60)
    samples = D.discover(root).samples
    by = {s.rel: i for i, s in enumerate(samples)}
    h = D.phashes([s.path for s in samples])
    assert int(np.bitwise_count(h[by["glioma/p0.jpg"]] ^ h[by["notumor/mirror.png"]])) > 6  # the hash alone misses it
    D.assign_groups(samples)
    g = {s.rel: s.group for s in samples}
    assert g["notumor/mirror.png"] == g["notumor/turned.jpg"] == g["glioma/p0.jpg"]
    assert len({g[f"glioma/p{k}.jpg"] for k in range(8)}) == 8
    D.assign_groups(samples, flips=False)
    assert samples[by["notumor/mirror.png"]].group != samples[by["glioma/p0.jpg"]].group
    for s in samples:
        s.split = "test" if s.rel.startswith("notumor") else "train"
    assert D.cross_split_duplicates(samples, flips=False) == []
    leaks = D.cross_split_duplicates(samples)
    assert {(x[1], x[3]) for x in leaks} == {("ds/glioma/p0.jpg", "ds/notumor/mirror.png"),
                                          ("ds/glioma/p0.jpg", "ds/notumor/turned.jpg")}


def test_split_works_with_fewer_groups_than_folds(tmp_path):
    root = tmp_path / "small"
    make_family_dataset(root, classes=("glioma", "notumor"), per_class=4)  # 8 groups
    samples = grouped_split(root)
    assert all(s.split in ("train", "val", "test") for s in samples)
    assert "train" in {s.split for s in samples}
    assert D.cross_split_duplicates(samples) == []


def test_phash_cache_is_used(tmp_path, private_hash_cache):
    p = save(tmp_path / "x.jpg", pattern(1))
    h1 = D.phashes([str(p)])
    assert private_hash_cache.exists()
    cached = json.loads(private_hash_cache.read_text())
    assert len(cached) == 1 and list(cached.values())[0].split(",")[0] == f"{int(h1[0]):016x}"
    assert D.phashes([str(p)])[0] == h1[0]


def test_data_fingerprint_changes_with_files(tmp_path):
    root = tmp_path / "ds"
    save(root / "glioma" / "a.jpg", pattern(1))
    save(root / "notumor" / "b.jpg", pattern(2))
    f1 = D.data_fingerprint(D.discover(root).samples)
    assert f1 == D.data_fingerprint(list(reversed(D.discover(root).samples)))
    save(root / "notumor" / "c.jpg", pattern(3))
    assert D.data_fingerprint(D.discover(root).samples) != f1


def test_a_file_replaced_under_its_name_is_new_data_for_the_fingerprint_and_the_image_cache(tmp_path):
    import os
    import core.engine as E
    from core.preprocess import DEFAULT_SPEC
    root = tmp_path / "ds"
    for cls, seed in (("glioma", 1), ("notumor", 2)):
        (root / cls).mkdir(parents=True)
        Image.fromarray(pattern(seed)).save(root / cls / "a.bmp")
    samples = D.discover(root).samples
    fp, cache = D.data_fingerprint(samples), E.cache_path("images", samples, DEFAULT_SPEC, ".npy")
    f = root / "glioma" / "a.bmp"
    size = f.stat().st_size
    Image.fromarray(pattern(7)).save(f)  # other pixels, same name and byte size
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert f.stat().st_size == size
    assert D.data_fingerprint(samples) != fp  # was equal: path, size and label only
    assert E.cache_path("images", samples, DEFAULT_SPEC, ".npy") != cache  # was the old pixels' cache


def test_the_gate_finds_the_classifiers_image_cache(tmp_path):
    # fit-ood reads train.py's prepared images instead of decoding every file again; it kept its
    # own copy of the cache key, which had to change in step with engine's
    from core.ood import TrainingCache
    from core.preprocess import DEFAULT_SPEC
    root = tmp_path / "ds"
    for cls, seed in (("glioma", 1), ("notumor", 2), ("glioma", 3)):
        save(root / cls / f"{seed}.png", pattern(seed))
    spec = {**DEFAULT_SPEC, "size": 32}
    samples = D.discover(D.resolve_root(str(root)), "src").samples
    assert TrainingCache.find([{"path": str(root), "name": "src"}], spec) is None
    E.cache_images(samples, spec, workers=1)
    found = TrainingCache.find([{"path": str(root), "name": "src"}], spec)
    assert found is not None and sorted(found.index) == sorted(s.path for s in samples)


def test_mark_copies_flags_test_records_whose_copy_was_trained_on(tmp_path):
    """`python -m core mark-copies`: eval.json's test records gain copy_in_training."""
    from core.cli import main
    root = tmp_path / "ds"
    for k in range(4):
        save(root / "glioma" / f"p{k}.jpg", pattern(700 + k))
    save(root / "glioma" / "mirror.png", np.ascontiguousarray(pattern(700)[:, ::-1]))
    w = tmp_path / "w"
    w.mkdir()
    (w / "card.json").write_text(json.dumps({"sources": [{"name": "ds", "path": str(root)}]}))
    split = {"train": ["glioma/p0.jpg", "glioma/p1.jpg"], "test": ["glioma/mirror.png", "glioma/p2.jpg"],
             "val": ["glioma/p3.jpg"]}
    (w / "split.json").write_text(json.dumps({"method": "test", "files": {"ds": split}}))
    recs = [{"file": f, "source": "ds", "label": "glioma"} for f in split["test"]]
    (w / "eval.json").write_text(json.dumps({"predictions": recs}))
    assert main(["mark-copies", "--weights", str(w)]) == 0
    ev = json.loads((w / "eval.json").read_text())
    assert {r["file"]: r["copy_in_training"] for r in ev["predictions"]} == {"glioma/mirror.png": True,
                                                                          "glioma/p2.jpg": False}
    assert ev["copies_in_training"]["per_source"] == {"ds": {"copy_in_training": 1, "n": 2}}


# ----------------------------------------------------------------------------- several sources
def test_one_patient_copied_into_two_sources_is_one_group(tmp_path):
    for src in ("lgg", "lgg_copy"):
        for k in range(3):
            save(tmp_path / src / "glioma" / f"TCGA_CS_4942_{k + 1:03d}.jpg", pattern(40 + k))
    samples = D.discover(tmp_path / "lgg").samples + D.discover(tmp_path / "lgg_copy").samples
    D.assign_groups(samples)
    assert len({s.group for s in samples}) == 1


def test_a_source_without_testing_gets_its_own_test_share(tmp_path):
    kaggle, flat = kaggle_layout(tmp_path / "kaggle", 3000, 4000), tmp_path / "br35h"
    for k in range(30):
        save(flat / ("yes" if k % 2 else "no") / f"{k}.jpg", pattern(5000 + k))
    samples = D.discover(kaggle).samples + D.discover(flat).samples
    D.assign_groups(samples)
    D.split_by_group(samples, seed=0)
    splits = {src: {s.split for s in samples if s.source == src} for src in ("kaggle", "br35h")}
    assert splits["br35h"] == {"train", "val", "test"}
    # the shipped Testing/ stays the kaggle source's only test set
    assert {s.rel.split("/")[0] for s in samples if s.source == "kaggle" and s.split == "test"} == {"Testing"}


def shipped_split_dataset(root, held: str, seed: int):
    """Training/ with 10 images per class and ``held`` (Validation/, Testing/) with 3, all unrelated."""
    for ci, c in enumerate(("glioma", "notumor")):
        for k in range(10):
            save(root / "Training" / c / f"tr{k}.jpg", pattern(seed + 50 * ci + k))
        for k in range(3):
            save(root / held / c / f"h{k}.jpg", pattern(seed + 1000 + 50 * ci + k))


def test_a_shipped_validation_folder_is_validation_and_stray_folders_are_reported(tmp_path):
    root = tmp_path / "ds"
    shipped_split_dataset(root, "Validation", 6000)
    save(root / "yes" / "lost.jpg", pattern(7999))
    scan = D.discover(root)
    assert any(rel == "yes/" and "beside the Training/Testing" in why for rel, why in scan.skipped)
    D.assign_groups(scan.samples)
    D.split_by_group(scan.samples, seed=0)
    assert all(s.split == "val" for s in scan.samples if s.rel.startswith("Validation/"))
    assert D.preset_split_text(scan.samples) == "the val split of ds is the dataset's own Validation/ folder (6 images)"


def test_the_split_method_says_a_shipped_testing_folder_made_the_test_split(tmp_path):
    """The card read 'the test and validation folds drawn from seed 0' of a test split that was the
    dataset's own Testing/ folder plus its near copies moved from Training/."""
    root = tmp_path / "kaggle"
    shipped_split_dataset(root, "Testing", 8000)
    save(root / "Training" / "glioma" / "copy.jpg", pattern(9000), quality=80)   # a copy of Testing/glioma/h0
    scan = D.discover(root)
    D.assign_groups(scan.samples)
    D.split_by_group(scan.samples, seed=0)
    assert D.preset_split_text(scan.samples) == ("the test split of kaggle is the dataset's own Testing/ folder "
                                                 "(6 images, with 1 of its other images, near copies of them, moved in)")
    assert D.preset_split_text([s for s in scan.samples if not s.preset_split]) is None


@pytest.mark.parametrize("entry, why", [({"path": "x", "wieght": 0.0}, "unknown key(s) wieght"),
                                        ({"path": "x", "weight": "0.5"}, "weight must be a number"),
                                        ({"path": "x", "label_map": ["a"]}, "label_map must map")])
def test_a_source_table_with_a_typo_or_a_wrong_value_is_refused(entry, why):
    with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
        D.parse_sources([entry])


def test_a_root_is_named_after_its_folder_even_as_dot(tmp_path, monkeypatch):
    (tmp_path / "br35h").mkdir()
    monkeypatch.chdir(tmp_path / "br35h")
    assert D.parse_sources(["."])[0]["name"] == "br35h"
    assert D.portable_root(".") == str(tmp_path / "br35h")        # recorded absolute: not the repo's '.'


def _samples(spec: list[tuple[str, str, str | None, str]]) -> list:
    """Samples from (source, label, preset_split, group) rows."""
    return [D.Sample(f"/x/{i}", f"{lab}/{i}.jpg", lab, lab, src, pre, grp)
            for i, (src, lab, pre, grp) in enumerate(spec)]


def test_a_group_spanning_a_tested_and_an_untested_source_stays_in_one_split():
    """Source A ships Testing/, source B does not; B holds copies of A's training images. The test
    share was decided per sample's source, so a group's B member went to test or val while its A
    member trained."""
    rows = []
    for k in range(40):
        for lab in ("glioma", "notumor"):
            g = f"{lab}{k}"
            rows.append(("A", lab, "test" if k < 8 else None, g))
            if k >= 8:
                rows.append(("B", lab, None, g))                 # a copy of A's training image
            rows.append(("B", lab, None, f"b-{lab}{k}"))         # B's own images
    for seed in range(5):
        samples = _samples(rows)
        D.split_by_group(samples, seed=seed)
        by_group: dict = {}
        for s in samples:
            by_group.setdefault(s.group, set()).add(s.split)
        assert all(len(v) == 1 for v in by_group.values()), seed
        assert any(s.split == "test" and s.source == "B" for s in samples)   # B still gets a test share


def test_a_class_of_one_image_always_trains():
    rows = [("ds", lab, None, f"{lab}{k}") for lab in ("glioma", "notumor") for k in range(30)]
    rows.append(("ds", "meningioma", None, "m0"))
    for seed in range(10):
        samples = _samples(rows)
        D.split_by_group(samples, seed=seed)
        assert next(s.split for s in samples if s.label == "meningioma") == "train", seed


def test_the_rare_rule_counts_only_groups_left_to_split():
    """One meningioma group in Training/ and two in Testing/ counted as 3 groups, so the class's
    only training group could go to val (6 seeds of 40)."""
    rows = [("ds", lab, None, f"{lab}{k}") for lab in ("glioma", "notumor") for k in range(30)]
    rows += [("ds", lab, "test", f"t-{lab}{k}") for lab in ("glioma", "notumor") for k in range(6)]
    rows += [("ds", "meningioma", None, "m0"), ("ds", "meningioma", "test", "mt1"), ("ds", "meningioma", "test", "mt2")]
    for seed in range(40):
        samples = _samples(rows)
        D.split_by_group(samples, seed=seed)
        assert next(s.split for s in samples if s.group == "m0") == "train", seed


# ----------------------------------------------------------------------------- odd layouts (review, session 20)
def test_a_wrapper_around_class_folders_names_no_class(tmp_path):
    """'MyData/glioma/' labelled every image 'mydata'; 'Training/Training/<class>' labelled them
    'training'."""
    for k in range(2):
        save(tmp_path / "a" / "MyData" / "glioma" / f"{k}.png", pattern(k))
        save(tmp_path / "a" / "MyData" / "astrocytoma" / f"{k}.png", pattern(10 + k))
        for split in ("Training", "Testing"):
            save(tmp_path / "b" / split / split / "notumor" / f"{split}{k}.png", pattern(20 + k))
    assert {s.label for s in D.discover(tmp_path / "a").samples} == {"mydata"}  # one unknown name: patients?
    assert "pass the folder 'MyData' itself" in D.one_folder_note(D.discover(tmp_path / "a"))
    (tmp_path / "a" / "MyData" / "astrocytoma").rename(tmp_path / "a2")
    assert {s.label for s in D.discover(tmp_path / "a").samples} == {"glioma"}
    b = D.discover(tmp_path / "b").samples
    assert {(s.label, s.preset_split) for s in b} == {("notumor", None), ("notumor", "test")}
    save(tmp_path / "c" / "yes" / "patient1" / "0.png", pattern(30))  # a class with patient folders stays one
    assert {s.label for s in D.discover(tmp_path / "c").samples} == {"tumor"}


def test_masks_loops_and_empty_folders_inside_class_folders_are_reported(tmp_path):
    import os
    save(tmp_path / "glioma" / "0.png", pattern(1))
    save(tmp_path / "glioma" / "masks" / "0_mask.png", pattern(2))
    (tmp_path / "meningioma").mkdir()
    os.symlink("b.png", tmp_path / "glioma" / "a.png")
    os.symlink("a.png", tmp_path / "glioma" / "b.png")
    os.symlink(".", tmp_path / "loop")
    scan = D.discover(tmp_path)
    assert [s.rel for s in scan.samples] == ["glioma/0.png"]
    why = dict(scan.skipped)
    assert why["glioma/masks/"].startswith("a folder of masks")
    assert why["glioma/a.png"] == why["glioma/b.png"] == "a loop of links: not read"
    assert why["meningioma/"] == "an empty class folder"
    assert why["loop/"].startswith("a link to this folder")


def test_no_class_folders_says_what_was_set_aside(tmp_path):
    for k in range(3):
        save(tmp_path / f"img{k}.jpg", pattern(k))
    with pytest.raises(ValueError, match=r"set aside: 3 not inside a class folder \(e.g. img0.jpg\)"):
        D.discover(tmp_path)


def test_one_folder_of_unknown_subfolders_gets_a_note(tmp_path):
    for k in range(2):
        save(tmp_path / "archive" / "cats" / f"{k}.png", pattern(k))
        save(tmp_path / "archive" / "dogs" / f"{k}.png", pattern(5 + k))
    assert "pass the folder 'archive' itself" in D.one_folder_note(D.discover(tmp_path))
    assert D.one_folder_note(D.discover(tmp_path / "archive")) is None


def test_patient_folders_named_like_classes_stay_in_their_class(tmp_path):
    """'astrocytoma/{normal_01, p2}' had become notumor and p2; a stray file in the outer level
    of 'Training/Training/' was dropped silently; a Training-only layout got the one-folder note."""
    save(tmp_path / "a" / "astrocytoma" / "normal_01" / "1.png", pattern(1))
    save(tmp_path / "a" / "astrocytoma" / "p2" / "1.png", pattern(2))
    save(tmp_path / "a" / "glioma" / "1.png", pattern(3))
    for k in (1, 2):
        save(tmp_path / "b" / "Training" / "astrocytoma" / f"no_{k}" / "1.png", pattern(10 + k))
    assert {s.label for s in D.discover(tmp_path / "a").samples} == {"astrocytoma", "glioma"}
    assert {s.label for s in D.discover(tmp_path / "b").samples} == {"astrocytoma"}
    save(tmp_path / "c" / "Training" / "Training" / "glioma" / "1.png", pattern(20))
    save(tmp_path / "c" / "Training" / "stray.png", pattern(21))
    save(tmp_path / "c" / "Testing" / "Testing" / "glioma" / "2.png", pattern(22))
    assert "Training/stray.png" in dict(D.discover(tmp_path / "c").skipped)
    save(tmp_path / "d" / "Training" / "glioma" / "1.png", pattern(30))
    save(tmp_path / "d" / "Training" / "notumor" / "1.png", pattern(31))
    assert D.one_folder_note(D.discover(tmp_path / "d")) is None


def test_a_folder_whose_name_holds_an_equals_sign_is_a_source(tmp_path):
    """`--data /data/run=3` was read as the folder /data/run with weight 3 (or refused)."""
    for name in ("run=3", "run=x"):
        (tmp_path / name).mkdir()
        (d,) = D.parse_sources([str(tmp_path / name)])
        assert (d["path"], d["weight"], d["name"]) == (str(tmp_path / name), 1.0, name)
    (d,) = D.parse_sources([f"{tmp_path / 'run=x'}=0.5"])   # and weighted: after the last '='
    assert (d["path"], d["weight"]) == (str(tmp_path / "run=x"), 0.5)
    with pytest.raises(ValueError, match="must be a number"):
        D.parse_sources([f"{tmp_path / 'run=x'}=y"])


def test_files_written_whole_are_readable_as_any_file_the_run_writes(tmp_path):
    """safetensors creates its files 0600: weights a trainer wrote failed to load for another user."""
    import stat
    import torch
    from safetensors.torch import save_file
    D.save_whole(tmp_path / "m.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    (tmp_path / "plain.txt").write_text("x")
    mode = stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~D._umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "plain.txt"]


def test_audit_names_groups_whose_labels_disagree(tmp_path, capsys):
    """One scan saved under three labels is one group (split as one); the audit says its labels
    disagree. A coarse 'tumor' beside a tumour type is no disagreement."""
    from core import data as D
    from core.cli import main
    rng = np.random.default_rng(0)
    base = Image.fromarray((rng.random((6, 6)) * 200 + 40).astype(np.uint8)).resize((64, 64), Image.BICUBIC)
    for k, c in enumerate(("glioma", "notumor", "meningioma")):
        (tmp_path / c).mkdir()
        base.save(tmp_path / c / f"same_{k}.png")
        for j in range(3):
            r = np.random.default_rng(100 * k + j)
            Image.fromarray((r.random((6, 6)) * 200 + 40).astype(np.uint8)).resize(
                (64, 64), Image.BICUBIC).save(tmp_path / c / f"other_{j}.png")
    assert main(["audit", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "groups whose labels disagree: 1," in out and "1 meningioma" in out and "1 notumor" in out
    samples = [D.Sample(path="", rel=f"{k}", label=lab, original=lab, group="g") for k, lab in
               enumerate(("glioma", "tumor"))]
    assert D.mixed_label_groups(samples) == []


def test_class_folders_beside_testing_without_training_are_the_training_part(tmp_path):
    for part, n in (("", 3), ("Testing/", 2)):
        for c in ("glioma", "notumor"):
            (tmp_path / part / c).mkdir(parents=True)
            for j in range(n):
                Image.new("L", (32, 32), 40 + 30 * j).save(tmp_path / part / c / f"{j}.png")
    scan = D.discover(tmp_path)
    seen = sorted((s.rel, s.preset_split) for s in scan.samples)
    assert ("glioma/0.png", None) in seen and ("Testing/notumor/1.png", "test") in seen
    assert len(seen) == 10 and not scan.skipped
    (tmp_path / "Training" / "glioma").mkdir(parents=True)   # with a Training/ folder they belong to no split
    Image.new("L", (32, 32), 99).save(tmp_path / "Training" / "glioma" / "t.png")
    scan = D.discover(tmp_path)
    assert sorted(s.rel for s in scan.samples) == ["Testing/glioma/0.png", "Testing/glioma/1.png",
                                                   "Testing/notumor/0.png", "Testing/notumor/1.png",
                                                   "Training/glioma/t.png"]
    assert {r for r, _ in scan.skipped} == {"glioma/", "notumor/"}


def test_masks_beside_scans_and_training_leftovers_are_no_evaluation_errors(tmp_path, random_weights):
    """Kaggle LGG's ~3.9k X_mask files were each an error line of `evaluate`; so were a
    training_set/ folder's leftovers, which a Training/ folder's never were (session 37 review)."""
    from core.evaluation import evaluate_dir
    from core.inference import Predictor
    save(tmp_path / "d" / "glioma" / "TCGA_CS_1_1.png", pattern(1))
    save(tmp_path / "d" / "glioma" / "TCGA_CS_1_1_mask.png", pattern(2))
    save(tmp_path / "d" / "no_tumor" / "n.png", pattern(3))
    ev = evaluate_dir(Predictor(random_weights), tmp_path / "d")
    assert ev["n"] == 2 and not ev["errors"]
    save(tmp_path / "k" / "training_set" / "glioma" / "g.png", pattern(4))
    (tmp_path / "k" / "training_set" / "glioma" / "notes.txt").write_text("x")
    save(tmp_path / "k" / "Testing" / "glioma" / "t.png", pattern(5))
    ev = evaluate_dir(Predictor(random_weights), tmp_path / "k")
    assert ev["n"] == 1 and not ev["errors"]


def test_nas_and_system_metadata_folders_are_neither_classes_nor_scans(tmp_path):
    """A Synology NAS keeps a thumbnail of every image in @eaDir/<image>/: it became a class
    'eadir', and the thumbnails inside a class folder were read as that class's scans."""
    img = Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    for cls in ("glioma", "notumor"):
        (tmp_path / cls).mkdir()
        for k in range(3):
            img.save(tmp_path / cls / f"{k}.jpg")
    for thumbs in (tmp_path / "@eaDir" / "0.jpg", tmp_path / "glioma" / "@eaDir" / "0.jpg",
                   tmp_path / "System Volume Information"):
        thumbs.mkdir(parents=True)
        img.save(thumbs / "SYNOPHOTO_THUMB_XL.jpg")
    scan = D.discover(tmp_path)
    assert sorted({s.label for s in scan.samples}) == ["glioma", "notumor"] and len(scan.samples) == 6
    skipped = dict(scan.skipped)
    assert skipped["@eaDir/"] == skipped["glioma/@eaDir/"] == "archive or system metadata"
    from core.archive import _is_junk
    assert _is_junk("scans/@eaDir/a.jpg/SYNOPHOTO_THUMB_XL.jpg") and not _is_junk("scans/a.jpg")


def test_a_tumour_folder_holding_typed_folders_says_the_types_are_dropped(tmp_path):
    root = tmp_path / "ds"
    for k, c in enumerate(("Glioma", "Meningioma")):
        save(root / "Brain Tumor" / c / f"{k}.jpg", pattern(9500 + k))
    save(root / "Normal" / "n.jpg", pattern(9600))
    scan = D.discover(root)
    assert {s.label for s in scan.samples} == {"tumor", "notumor"}
    note = D.typed_inside_coarse_note(scan)
    assert note.startswith("'Brain Tumor' holds glioma, meningioma folders") and "move those folders up" in note
    save(root / "Brain Tumor" / "loose.jpg", pattern(9700))   # typed ones still there: still said
    assert D.typed_inside_coarse_note(D.discover(root)) == note
    plain = tmp_path / "plain"
    save(plain / "yes" / "a" / "1.jpg", pattern(9800))    # a folder that names no type
    save(plain / "no" / "2.jpg", pattern(9801))
    assert D.typed_inside_coarse_note(D.discover(plain)) is None
