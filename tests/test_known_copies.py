"""Copies of one slice that the hash checks miss, listed by content (core/known_copies.tsv): a
fresh split keeps each listed pair on one side, the audit reports a pair across, a run marks a
test image whose listed copy trains, and the shipped list matches the shared data."""
import json
from collections import Counter
from pathlib import Path

import pytest

import core.data as D
from test_data import grouped_split, pattern, save

SHARED = (Path(__file__).resolve().parents[1].parent / "shared" / "data").resolve()   # discover() resolves too
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
def test_a_fresh_split_of_the_shared_data_keeps_listed_copies_together():
    """Grouped as train.py groups a fresh split (hash checks, patients and the list), no listed pair
    crosses it: a pair the patient rule refused through a hash group would. And no group grows so
    large that a split fraction could not be met (the largest without a patient: 712 of 11,097
    images, 420 without the list). About a minute: the hash cache is this test's own (cold)."""
    samples = [s for src, root in ROOTS.items() for s in D.discover(root, src).samples]
    D.assign_groups(samples)
    D.split_by_group(samples, seed=3)
    where = {(s.source, s.rel): s.split for s in samples}
    rows = [r.split("\t") for r in D.KNOWN_COPIES_FILE.read_text().splitlines()[1:]]
    across = [r for r in rows if where[r[0], r[1]] != where[r[2], r[3]]]
    assert not across, f"{len(across)} listed pairs cross the split (first: {across[0][:4]})"
    sizes = Counter(s.group for s in samples if D.patient_id(s.path) is None)
    assert max(sizes.values()) < 0.1 * len(samples)


# ----------------------------------------------------------------- train.py --join-copies
def test_join_copies_keeps_a_listed_pair_of_other_data_on_one_side(tmp_path):
    """Another dataset's list (as `bench/copy_audit.py --split all --data` writes it) joins its
    pairs in a fresh split: a pair the seed put across train and test lands on one side, and the
    card's split method names the list; on a recorded split it changes nothing, and says so."""
    from conftest import make_blob_dataset
    from test_review_v import _train
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_blob_dataset(data)
    common = ["--data", data, "--arch", "simple_cnn", "--img", 32, "--batch-size", 8, "--workers", 1,
              "--seed", 0, "--epochs", 1]
    samples = grouped_split(data, seed=0, source="data")   # the split train.py draws without a list
    part = {s.split: s for s in sorted(samples, key=lambda s: s.rel)}
    a, b = Path(part["test"].path), Path(part["train"].path)
    lst = write_list(tmp_path / "mine.tsv", [(a, b)])
    _train([*common, "--out", tmp_path / "joined", "--join-copies", lst], cache)
    rec = json.loads((tmp_path / "joined" / "split.json").read_text())["files"]["data"]
    side = {rel: part for part, rels in rec.items() for rel in rels}
    assert side[a.relative_to(data).as_posix()] == side[b.relative_to(data).as_posix()]
    card = json.loads((tmp_path / "joined" / "card.json").read_text())
    assert "mine.tsv" in card["split"]["method"]
    log = _train([*common, "--out", tmp_path / "again", "--split-from", tmp_path / "joined", "--join-copies", lst], cache)
    assert "--join-copies: the split is the one recorded in" in log


def test_the_all_pairs_audit_of_other_data_finds_a_reframed_mirrored_copy(tmp_path):
    """`bench/copy_audit.py --split all --data NAME=DIR` on data of one's own: a copy padded,
    mirrored, resized and re-saved as JPEG in another collection is found (no hash check joins it),
    no other pair is, and the list it writes groups the pair (train.py --join-copies reads it)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    def head(seed: int) -> np.ndarray:   # a smooth pattern with fine detail of its own, in an oval
        rng = np.random.default_rng(seed)
        fine = Image.fromarray((rng.random((80, 80)) * 255).astype(np.uint8)).resize((160, 160), Image.BICUBIC)
        a = pattern(seed, 160).astype(np.float32) * 0.6 + np.asarray(fine, np.float32) * 0.4
        yy, xx = np.mgrid[:160, :160]
        a[(yy - 80) ** 2 / 70 ** 2 + (xx - 80) ** 2 / 55 ** 2 > 1] = 0
        return a.astype(np.uint8)
    for k in range(6):
        save(tmp_path / "a" / "glioma" / f"g{k}.png", head(10 + k))
        save(tmp_path / "b" / "notumor" / f"n{k}.png", head(50 + k))
    (tmp_path / "a" / "glioma" / "broken.jpg").write_text("not an image")   # skipped, as train.py skips it
    copy = np.asarray(Image.fromarray(np.pad(head(12), 20)[:, ::-1]).resize((230, 230), Image.BILINEAR))
    save(tmp_path / "b" / "notumor" / "copy.jpg", copy, quality=90)
    out = tmp_path / "list.tsv"
    r = subprocess.run([sys.executable, "bench/copy_audit.py", "--split", "all", "--data", f"a={tmp_path / 'a'}",
                        "--data", f"b={tmp_path / 'b'}", "--pairs-out", out, "--cache", tmp_path / "cache",
                        "--workers", "1"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "skipped a/glioma/broken.jpg" in r.stdout
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    assert [(x[0], x[1], x[2], x[3]) for x in rows] == [("a", "glioma/g2.png", "b", "notumor/copy.jpg")]
    samples = [s for name in "ab" for s in D.discover(tmp_path / name, name).samples]
    D.assign_groups(samples, lists=[out])
    group = {s.rel: s.group for s in samples}
    assert group["glioma/g2.png"] == group["notumor/copy.jpg"]
    assert len(set(group.values())) == len(samples) - 1


def test_the_dataset_audit_reads_a_list_of_ones_own(tmp_path, capsys):
    from core.cli import main
    files = unrelated_dataset(tmp_path / "ds", n=8)
    lst = write_list(tmp_path / "mine.tsv", [(files[0], files[9])])
    assert main(["audit", str(tmp_path / "ds"), "--join-copies", str(lst)]) == 0
    out = capsys.readouterr().out
    assert "copies known_copies.tsv, mine.tsv list: 1 pairs among these files" in out
    assert f"{len(files) - 1} groups" in out
    assert "cross-split near duplicates, flipped and listed copies (grouped split, seed 0): 0" in out
    (tmp_path / "bad.tsv").write_text("not a list\n")
    assert main(["audit", str(tmp_path / "ds"), "--join-copies", str(tmp_path / "bad.tsv")]) == 2
    assert "not a known-copies list" in capsys.readouterr().err


def test_a_listed_pair_across_a_shipped_testing_folder_is_a_leak_in_the_audit(tmp_path, capsys):
    """A dataset's own Training/Testing split is kept as shipped: a pair a list names across it is
    reported as a leak (the grouping cannot move a shipped test file)."""
    from core.cli import main
    root = tmp_path / "ds"
    for k in range(6):
        save(root / "Training" / "glioma" / f"tr{k}.png", pattern(300 + k))
        save(root / "Testing" / "glioma" / f"te{k}.png", pattern(400 + k))
    lst = write_list(tmp_path / "mine.tsv", [(root / "Training" / "glioma" / "tr1.png", root / "Testing" / "glioma" / "te4.png")])
    assert main(["audit", str(root)]) == 0
    assert "flipped and listed copies (shipped split): 0" in capsys.readouterr().out
    assert main(["audit", str(root), "--join-copies", str(lst)]) == 0
    out = capsys.readouterr().out
    assert "flipped and listed copies (shipped split): 1" in out and "te4.png" in out


def test_an_edited_list_is_read_again_and_a_binary_one_is_named(tmp_path):
    files = unrelated_dataset(tmp_path / "ds", n=3)
    lst = write_list(tmp_path / "mine.tsv", [(files[0], files[1])])
    paths = [str(f) for f in files]
    assert D.known_copy_pairs(paths, [lst], shipped=False) == [(0, 1)]
    write_list(lst, [(files[0], files[1]), (files[3], files[4])])
    assert D.known_copy_pairs(paths, [lst], shipped=False) == [(0, 1), (3, 4)]
    lst.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="mine.tsv: not a known-copies list .not UTF-8 text."):
        D.known_copy_pairs(paths, [lst], shipped=False)


def test_a_configs_join_list_that_is_gone_is_no_error_on_a_recorded_split(tmp_path, capsys):
    import train
    cfg = tmp_path / "c.toml"
    (tmp_path / "d").mkdir()   # --out may not lie inside --data
    cfg.write_text(f'join_copies = ["{tmp_path / "gone.tsv"}"]\ndata = ["{tmp_path / "d"}"]\n'
                   f'split_from = "{Path(__file__).resolve().parents[1] / "weights" / "resnet18_192_gpu_ema120_s2"}"\n')
    args = train.parse_args(["--config", str(cfg), "--out", str(tmp_path / "out")])
    assert args.join_copies is None and "cannot be read" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # named on the command line, a missing list is still an error
        train.parse_args(["--config", str(cfg), "--out", str(tmp_path / "out"), "--join-copies", str(tmp_path / "gone.tsv")])


def test_a_configs_lists_stay_as_written_in_the_config_the_card_keeps(tmp_path):
    import train
    lst = write_list(tmp_path / "k.tsv", [])
    cfg = tmp_path / "c.toml"
    (tmp_path / "d").mkdir()   # --out may not lie inside --data
    cfg.write_text(f'join_copies = ["k.tsv"]\ndrop_copies = ["k.tsv"]\ndata = ["{tmp_path / "d"}"]\n')
    import os
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        args = train.parse_args(["--config", str(cfg), "--out", str(tmp_path / "out")])
    finally:
        os.chdir(here)
    assert args.config_values["join_copies"] == ["k.tsv"] and args.config_values["drop_copies"] == ["k.tsv"]
    assert args.join_copies == [str(lst.resolve())]


def test_the_audit_of_other_data_refuses_overlapping_roots(tmp_path):
    import subprocess
    import sys
    unrelated_dataset(tmp_path / "ds", n=2)
    r = subprocess.run([sys.executable, "bench/copy_audit.py", "--split", "all", "--data", f"a={tmp_path / 'ds'}",
                        "--data", f"b={tmp_path / 'ds'}", "--pairs-out", tmp_path / "x.tsv",
                        "--cache", tmp_path / "cache"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "roots overlap (a and b)" in r.stderr and "Traceback" not in r.stderr
