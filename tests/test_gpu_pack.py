"""bench/prepare_gpu_data.py: what travels to a GPU machine, and the configs it trains there."""
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import prepare_gpu_data as P  # noqa: E402
import train  # noqa: E402
from core import training as TR  # noqa: E402
from core.data import Sample  # noqa: E402


def _sample(source, rel):
    return Sample(path=f"/x/{source}/{rel}", rel=rel, label="glioma", original="glioma", source=source)


def test_travelling_keeps_train_and_val_and_every_nth_test_file():
    record = {"a": {"train": ["t1.jpg"], "val": ["v1.jpg"], "test": [f"x{k}.jpg" for k in range(10)]},
              "b": {"train": ["t1.jpg"], "val": [], "test": []}}
    samples = [_sample("a", "t1.jpg"), _sample("a", "v1.jpg"), _sample("b", "t1.jpg"),
               _sample("b", "v1.jpg"),  # not in the record: stays here
               *[_sample("a", f"x{k}.jpg") for k in range(10)]]
    go = P.travelling(samples, record, test_every=4)
    assert go[:4] == [True, True, True, False]
    assert [s.rel for s, g in zip(samples[4:], go[4:]) if g] == ["x0.jpg", "x4.jpg", "x8.jpg"]


@pytest.mark.parametrize("config", ["experiments/resnet18_192_gpu.toml", "experiments/resnet18_192_gpu_ema.toml"])
def test_device_config_trains_with_the_options_the_finish_checks(config, tmp_path, monkeypatch):
    """The device's config differs from the original only in where it reads and writes and in
    the crop (its images are cropped already): every option --finish-from compares is the same,
    or the finish here would refuse the run."""
    text = (ROOT / config).read_text()
    orig = tomllib.loads(text)
    roots = {d["path"]: str(tmp_path / "data" / d["name"]) for d in orig["data"]}
    for r in roots.values():  # train.py's parser wants each data root to exist
        Path(r).mkdir(parents=True)
    dev_text = P.device_config(text, Path(config).stem, roots)
    dev = tomllib.loads(dev_text)
    assert [d["path"] for d in dev["data"]] == [roots[d["path"]] for d in orig["data"]]
    assert [d["name"] for d in dev["data"]] == [d["name"] for d in orig["data"]]
    assert dev["crop"] == "none" and dev["split_from"] == "gpu/split"
    assert dev["out"] == f"gpu/out/{Path(config).stem}"
    changed = {k for k in orig.keys() | dev.keys() if orig.get(k) != dev.get(k)}
    assert changed <= {"data", "out", "split_from", "crop", "workers", "threads", "no_progress"}
    monkeypatch.chdir(ROOT)  # the configs' relative paths; the device's split is packed beside it
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "split.json").write_text((ROOT / orig["split_from"] / "split.json").read_text())
    (tmp_path / "dev.toml").write_text(dev_text.replace('"gpu/split"', f'"{tmp_path / "split"}"'))
    a = train.parse_args(["--config", str(ROOT / config)])
    b = train.parse_args(["--config", str(tmp_path / "dev.toml")])
    assert {k: getattr(a, k) for k in TR.TRAINED_WITH} == {k: getattr(b, k) for k in TR.TRAINED_WITH}


def test_device_config_keeps_its_settings_top_level_with_data_tables():
    """A config written with [[data]] tables: the device's settings must not fall into the last table."""
    import tomllib
    text = ('# a comment\narch = "resnet18"\nimg = 192\n\n[[data]]\npath = "../shared/data/br35h"\n'
            'name = "br35h"\nweight = 1.0\n')
    dev = tomllib.loads(P.device_config(text, "x", {"../shared/data/br35h": "gpu/data/br35h"}))
    assert dev["crop"] == "none" and dev["out"] == "gpu/out/x" and dev["split_from"] == "gpu/split"
    assert dev["data"] == [{"path": "gpu/data/br35h", "name": "br35h", "weight": 1.0}]


def test_the_pack_travels_as_one_archive_that_gpu_run_unpacks(tmp_path, monkeypatch):
    """The device tool refused ~10,000 small files as over 64 MiB; one archive of them went. What
    bench/gpu_run.sh unpacks there must be the folder, under its own name, byte for byte."""
    import subprocess
    import tarfile
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpu" / "data" / "lgg" / "masks").mkdir(parents=True)
    (tmp_path / "gpu" / "data" / "lgg" / "a.webp").write_bytes(b"\x00webp")
    (tmp_path / "gpu" / "data" / "lgg" / "masks" / "a.png").write_bytes(b"png")
    (tmp_path / "gpu" / "run.toml").write_text('name = "x"\n')
    tgz = P.pack(Path("gpu"))
    assert tgz == Path("gpupack/gpu.tgz")
    with tarfile.open(tgz) as t:
        assert {"gpu/run.toml", "gpu/data/lgg/a.webp", "gpu/data/lgg/masks/a.png"} <= set(t.getnames())
    there = tmp_path / "there"
    there.mkdir()
    (there / "gpupack").mkdir()
    (there / "gpupack" / "gpu.tgz").write_bytes(tgz.read_bytes())
    # the first lines of gpu_run.sh that unpack it (the rest needs a GPU machine)
    script = (ROOT / "bench" / "gpu_run.sh").read_text()
    unpack = next(line for line in script.splitlines() if "gpupack/gpu.tgz" in line and "tar" in line)
    subprocess.run(["bash", "-c", unpack], cwd=there, check=True)
    assert (there / "gpu" / "data" / "lgg" / "a.webp").read_bytes() == b"\x00webp"
    assert not (there / "gpupack").exists()  # unpacked, then removed: no second copy on its disk


def test_a_config_that_drops_copies_travels_with_its_lists(tmp_path, monkeypatch):
    """experiments/resnet18_192_gpu_ema120_nocopies.toml named lists under weights/, which does not
    travel: the device's check run stopped on a missing file (and with it every config of the call).
    Its lists are packed, same bytes, so the options --finish-from compares (their digests among
    them) are the same there and here."""
    config = "experiments/resnet18_192_gpu_ema120_nocopies.toml"
    text = (ROOT / config).read_text()
    orig = tomllib.loads(text)
    assert orig["drop_copies"]
    roots = {d["path"]: str(tmp_path / "data" / d["name"]) for d in orig["data"]}
    for r in roots.values():
        Path(r).mkdir(parents=True)
    monkeypatch.chdir(ROOT)
    lists = P.pack_lists(orig, tmp_path / "gpu")
    assert set(lists) == set(orig["drop_copies"]) and all(Path(v).is_file() for v in lists.values())
    dev_text = P.device_config(text, Path(config).stem, roots, lists)
    dev = tomllib.loads(dev_text)
    assert dev["drop_copies"] == [lists[f] for f in orig["drop_copies"]]
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "split.json").write_text((ROOT / orig["split_from"] / "split.json").read_text())
    (tmp_path / "dev.toml").write_text(dev_text.replace('"gpu/split"', f'"{tmp_path / "split"}"'))
    a = train.parse_args(["--config", str(ROOT / config)])
    b = train.parse_args(["--config", str(tmp_path / "dev.toml")])
    assert a.drop_copies_sha256 and len(a.drop_copies_sha256) == len(orig["drop_copies"])
    assert {k: getattr(a, k) for k in TR.TRAINED_WITH} == {k: getattr(b, k) for k in TR.TRAINED_WITH}


def test_a_copy_whose_partner_was_not_packed_is_still_dropped():
    """Only every 8th test file travels: a training copy of an unpacked test image trained there
    and not here (118 of the 339 then), and the finish refused the run. The recorded split's roles
    decide for partners the data lacks."""
    from core.data import listed_training_copies
    train_a = Sample(path="/x/a", rel="a.jpg", label="glioma", original="glioma", source="s", split="train")
    pairs = [(("s", "gone_test.jpg"), ("s", "a.jpg"))]
    assert listed_training_copies([train_a], pairs) == []
    assert listed_training_copies([train_a], pairs, {("s", "gone_test.jpg"): "test"}) == [train_a]
    assert listed_training_copies([train_a], pairs, {("s", "gone_test.jpg"): "train"}) == []


def test_two_configs_lists_of_one_name_are_packed_apart(tmp_path):
    """Packed as '<position>_<name>', weights/A/x.tsv and weights/B/x.tsv landed on one file: one
    config trained on the GPU with the other's list."""
    head = "test_source\ttest_file\ttrain_source\ttrain_file\n"
    for d, row in (("A", "s\ta.png\ts\tb.png\n"), ("B", "s\tc.png\ts\td.png\n")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.tsv").write_text(head + row)
    a = P.pack_lists({"drop_copies": [str(tmp_path / "A" / "x.tsv")]}, tmp_path / "gpu")
    b = P.pack_lists({"drop_copies": str(tmp_path / "B" / "x.tsv")}, tmp_path / "gpu")
    (pa,), (pb,) = a.values(), b.values()
    assert pa != pb and Path(pa).read_text() == (tmp_path / "A" / "x.tsv").read_text()
    assert Path(pb).read_text() == (tmp_path / "B" / "x.tsv").read_text()
