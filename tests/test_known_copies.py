"""Copies of one slice that the hash checks miss, listed by content (core/known_copies.tsv): a
fresh split keeps each listed pair on one side, the audit reports a pair across, a run marks a
test image whose listed copy trains, and the shipped list matches the shared data."""
from collections import Counter
from pathlib import Path

import pytest

import core.data as D
from test_data import grouped_split, pattern, save

SHARED = (Path(__file__).resolve().parents[1].parent / "shared" / "data").resolve()   # discover() resolves too
USER_HASH_CACHE = D.HASH_CACHE   # before the fixture below swaps it
ROOTS = {"benchmark": SHARED / "brain-tumor-mri" / "Training", "br35h": SHARED / "br35h",
         "lgg": SHARED / "lgg-flair", "brisc": SHARED / "brisc"}


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "HASH_CACHE", tmp_path / "_cache" / "phash.json")


def unrelated_dataset(root: Path, n: int = 24) -> list[Path]:
    """n unrelated images per class: no hash or thumbnail check joins any two."""
    out = []
    for ci, c in enumerate(("glioma", "notumor")):
        for k in range(n):
            f = root / c / f"{c}{k}.png"
            save(f, pattern(1000 + 100 * ci + k))
            out.append(f)
    return out


def write_list(path: Path, pairs: list[tuple[Path, Path]]) -> Path:
    rows = ["\t".join(D.KNOWN_COPIES_COLUMNS)]
    rows += ["\t".join(("s", a.name, "s", b.name, "0.9", "0", D.content_key(a), D.content_key(b))) for a, b in pairs]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_listed_copies_share_a_group_and_a_side_of_every_split(tmp_path, monkeypatch):
    files = unrelated_dataset(tmp_path / "ds")
    a, b, c = files[0], files[30], files[5]           # a glioma twice, and a copy filed as notumor
    monkeypatch.setattr(D, "KNOWN_COPIES_FILE", write_list(tmp_path / "known.tsv", [(a, b), (b, c)]))
    samples = grouped_split(tmp_path / "ds")
    group = {Path(s.path).name: s.group for s in samples}
    assert group[a.name] == group[b.name] == group[c.name]
    assert len(set(group.values())) == len(files) - 2
    for seed in range(6):
        samples = grouped_split(tmp_path / "ds", seed=seed)
        side = {Path(s.path).name: s.split for s in samples}
        assert side[a.name] == side[b.name] == side[c.name]
    # without the list (known=False, or another list) they are three groups
    samples = D.discover(tmp_path / "ds").samples
    D.assign_groups(samples, known=False)
    assert len({s.group for s in samples}) == len(files)


def test_a_listed_pair_across_a_split_is_a_leak_and_a_copy_in_training(tmp_path, monkeypatch):
    files = unrelated_dataset(tmp_path / "ds")
    a, b = files[2], files[40]
    samples = D.discover(tmp_path / "ds").samples
    for s in samples:
        s.split = {a.name: "test", b.name: "train"}.get(Path(s.path).name, "val")
    assert D.cross_split_duplicates(samples) == []
    assert D.copies_in_training(samples) == set()
    monkeypatch.setattr(D, "KNOWN_COPIES_FILE", write_list(tmp_path / "known.tsv", [(b, a)]))
    [leak] = D.cross_split_duplicates(samples)
    assert {leak[0], leak[2]} == {"test", "train"}
    assert D.copies_in_training(samples) == {(s.source, s.rel) for s in samples if s.path == str(a)}


def test_listed_copies_are_found_by_content_under_any_name(tmp_path, monkeypatch):
    files = unrelated_dataset(tmp_path / "ds", n=4)
    monkeypatch.setattr(D, "KNOWN_COPIES_FILE", write_list(tmp_path / "known.tsv", [(files[0], files[5])]))
    renamed = tmp_path / "elsewhere" / "x.png"
    renamed.parent.mkdir()
    renamed.write_bytes(files[5].read_bytes())
    paths = [str(files[1]), str(renamed), str(files[0]), str(files[5]), str(tmp_path / "gone.png")]
    assert D.known_copy_pairs(paths) == [(1, 2), (2, 3)]
    # a list that is not there joins nothing
    monkeypatch.setattr(D, "KNOWN_COPIES_FILE", tmp_path / "none.tsv")
    assert D.known_copy_pairs(paths) == []


def test_a_list_without_content_keys_is_an_error_not_a_silent_no_op(tmp_path, monkeypatch):
    files = unrelated_dataset(tmp_path / "ds", n=2)
    bad = tmp_path / "bad.tsv"
    bad.write_text("source\tfile\tcopy_source\tcopy_file\nds\ta.png\tds\tb.png\n")
    monkeypatch.setattr(D, "KNOWN_COPIES_FILE", bad)
    with pytest.raises(ValueError, match="not a known-copies list"):
        D.known_copy_pairs([str(f) for f in files])
    short = write_list(tmp_path / "short.tsv", [(files[0], files[1])])
    short.write_text(short.read_text() + "s\tx.png\ts\ty.png\t0.9\t0\tabc\n")
    monkeypatch.setattr(D, "KNOWN_COPIES_FILE", short)
    with pytest.raises(ValueError, match="line 3 lacks a content key"):
        D.known_copy_pairs([str(f) for f in files])


def test_the_known_copies_list_is_a_copy_list_train_py_reads(tmp_path):
    pairs = D.read_copy_pairs(D.KNOWN_COPIES_FILE)
    assert len(pairs) > 100
    assert all(a != b for a, b in pairs)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared (tests/test_environment.py fails without it)")
def test_the_shipped_list_matches_the_shared_files():
    """Every listed file is in ../shared under its recorded name and content: a stale list would
    join nothing and the split would leak again without a word."""
    lines = D.KNOWN_COPIES_FILE.read_text().splitlines()
    assert tuple(lines[0].split("\t")) == D.KNOWN_COPIES_COLUMNS
    rows = [r.split("\t") for r in lines[1:]]
    named = {(r[0], r[1]): r[6] for r in rows} | {(r[2], r[3]): r[7] for r in rows}
    wrong = [k for k, key in named.items() if D.content_key(ROOTS[k[0]] / k[1]) != key]
    assert not wrong, f"{len(wrong)} listed files differ in ../shared (first: {wrong[0]})"
    paths = [str(ROOTS[s] / f) for s, f in named]
    assert len(D.known_copy_pairs(paths)) >= len(rows)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared (tests/test_environment.py fails without it)")
def test_a_fresh_split_of_the_shared_data_keeps_listed_copies_together(monkeypatch):
    """Grouped as train.py groups a fresh split (hash checks, patients and the list), no listed pair
    crosses it: a pair the patient rule refused through a hash group would. And no group grows so
    large that a split fraction could not be met (the largest without a patient: 712 of 11,097
    images, 420 without the list). About a minute with a cold hash cache."""
    monkeypatch.setattr(D, "HASH_CACHE", USER_HASH_CACHE)
    samples = [s for src, root in ROOTS.items() for s in D.discover(root, src).samples]
    D.assign_groups(samples)
    D.split_by_group(samples, seed=3)
    where = {(s.source, s.rel): s.split for s in samples}
    rows = [r.split("\t") for r in D.KNOWN_COPIES_FILE.read_text().splitlines()[1:]]
    across = [r for r in rows if where[r[0], r[1]] != where[r[2], r[3]]]
    assert not across, f"{len(across)} listed pairs cross the split (first: {across[0][:4]})"
    sizes = Counter(s.group for s in samples if D.patient_id(s.path) is None)
    assert max(sizes.values()) < 0.1 * len(samples)
