"""Pack the shared sources and train.py configs for a GPU machine (the device tool: 64 MiB a call).

Each image is decoded, head-cropped and resized exactly as training prepares it
(`core.engine.cache_images` with the configs' input size), then stored as an 8-bit WebP (quality 90:
about 1.2 grey levels of 255 from the served image, `--check`; on 200 packed images 0.6 the size
of a JPEG of about the same error) under its own relative path, so
that the recorded split still names it; LGG tumour masks go through the same frame
(`core.engine.cache_lesions`) as PNGs. Only the training and validation files of the recorded
split travel, with every Nth test file so that the run there can finish.

For each --config, gpu/<name>.toml is the same config pointed at the packed images, with
`crop = "none"` (they are already cropped), the recorded split copied into gpu/split and its
output in gpu/out/<name>. `bash bench/gpu_run.sh` trains them there side by side; here,
`train.py --config CONFIG --finish-from DIR` calibrates, evaluates and writes the card on the
original files with the head crop, as they are served (docs/gpu.md).

    python bench/prepare_gpu_data.py --config experiments/resnet18_192_gpu.toml \\
        --config experiments/resnet18_192_gpu_ema.toml
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tarfile
import tomllib
import types
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header  # noqa: E402
from core import data as D, engine as E, training as TR  # noqa: E402
from core.preprocess import DEFAULT_SPEC  # noqa: E402

BUDGET_MIB = 56  # of the 64 MiB a call carries: the repository and the wheels need the rest


def travelling(samples: list[D.Sample], record: dict, test_every: int) -> list[bool]:
    """Which samples go: the record's training and validation files, and every Nth test file."""
    where = D.split_roles(record)
    tests = sorted((s.source, s.rel) for s in samples if where.get((s.source, s.rel)) == "test")
    kept_tests = set(tests[::test_every])
    return [where.get((s.source, s.rel)) in ("train", "val") or (s.source, s.rel) in kept_tests
            for s in samples]


def device_config(text: str, name: str, roots: dict[str, str], lists: dict[str, str] | None = None) -> str:
    """A config's TOML pointed at the packed images: each data path replaced by its packed root,
    each drop_copies list by its packed copy (``lists``: weights/ does not travel), the split,
    output, crop, workers and threads set for the GPU machine (two runs share its cores)."""
    for path, packed in {**roots, **(lists or {})}.items():
        text = text.replace(f'"{path}"', f'"{packed}"')
    text = re.sub(r'(?m)^(out|split_from|crop|workers|threads|no_progress|init)\s*=.*\n', "", text)
    settings = (f'out = "gpu/out/{name}"\nsplit_from = "gpu/split"\ncrop = "none"\n'
                f'workers = 8\nthreads = 4\nno_progress = true\n')
    # before the first key: top-level keys after a [[data]] table would belong to that table
    lines = text.splitlines(keepends=True)
    first = next((i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#")), len(lines))
    return "".join(lines[:first]) + settings + "".join(lines[first:])


def packed_difference(samples, images, go, root_of: dict, spec: dict, n: int) -> str:
    """How far the images train.py reads there (the packed files, `crop = "none"`) are from the
    ones served here (the originals, head crop), over n packed images drawn with seed 0."""
    from core.preprocess import prepare
    from core.reader import read_scan
    packed = [i for i, g in enumerate(go) if g]
    picks = np.random.default_rng(0).permutation(packed)[:n]
    diffs = [np.abs((prepare(read_scan(root_of[samples[i].source] / samples[i].rel).pixels,
                             {**spec, "crop": "none"}) * 255).round() - images[i, 0]).mean() for i in picks]
    return (f"packed vs served, {len(picks)} images: mean {np.mean(diffs):.3f}, 99th percentile "
            f"{np.percentile(diffs, 99):.3f}, largest {np.max(diffs):.3f} grey levels of 255")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", required=True, help="train.py TOML, repeatable")
    p.add_argument("--quality", type=int, default=90, help="WebP quality")
    p.add_argument("--test-every", type=int, default=8)
    p.add_argument("--out", default="gpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="then read N packed images back as the GPU run does (crop none) and print how far "
                        "they are from the images served here, in grey levels of 255")
    a = p.parse_args()
    header("cpu")
    cfgs = {Path(c).stem: tomllib.loads(Path(c).read_text()) for c in a.config}
    first = next(iter(cfgs.values()))
    if any(c.get("img") != first.get("img") or c.get("data") != first.get("data")
           or c.get("split_from") != first.get("split_from") for c in cfgs.values()):
        p.error("the configs must share img, data and split_from (one packed copy serves them all)")
    if not first.get("split_from"):
        p.error("the configs need a split_from: the split must be the one the card will be finished on")
    for c in cfgs.values():   # before minutes of caching: a missing or damaged list stops the pack now
        for f in config_lists(c):
            try:
                D.read_copy_pairs(f)
            except ValueError as e:
                p.error(f"drop_copies: {e}")
    spec = {**DEFAULT_SPEC, "size": first["img"], "crop": "head"}
    sources = D.parse_sources(first["data"])
    samples, skipped = TR.load_samples(sources, types.SimpleNamespace(limit=0, seed=0, binary=False))
    images = E.cache_images(samples, spec, workers=a.workers).numpy()
    masks, known = (t.numpy() for t in E.cache_lesions(samples, spec, workers=a.workers))
    record = json.loads((Path(first["split_from"]) / "split.json").read_text())
    go = travelling(samples, record["files"], a.test_every)
    out = Path(a.out)
    for old in ("data", "split", "out", "lists"):
        shutil.rmtree(out / old, ignore_errors=True)
    roots = {s["path"]: f"{out}/data/{s['name']}" for s in sources}
    root_of = {s["name"]: Path(roots[s["path"]]) for s in sources}
    total = 0
    for s, img, m, k, g in zip(samples, images, masks, known, go):
        if not g:
            continue
        dest = root_of[s.source] / s.rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(dest, "WEBP", quality=a.quality, method=6)  # keeps the name the split knows
        total += dest.stat().st_size
        if k:  # where core.saliency.mask_path_for looks: <root>/masks/<stem>.png
            mdest = root_of[s.source] / "masks" / f"{Path(s.rel).stem}.png"
            mdest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((m[0] > 0).astype(np.uint8) * 255).save(mdest, optimize=True)
            total += mdest.stat().st_size
    (out / "split").mkdir(parents=True)
    shutil.copy(Path(first["split_from"]) / "split.json", out / "split" / "split.json")
    for c in a.config:
        (out / f"{Path(c).stem}.toml").write_text(device_config(Path(c).read_text(), Path(c).stem, roots,
                                                                pack_lists(cfgs[Path(c).stem], out)))
    if a.check:
        print(packed_difference(samples, images, go, root_of, spec, a.check))
    tgz = pack(out)
    mib = tgz.stat().st_size / 2**20
    print(f"{sum(go)} of {len(samples)} images ({len(skipped)} unreadable) packed in {out}/data "
          f"({total / 2**20:.1f} MiB) and travel as {tgz}: {mib:.1f} MiB"
          + (f" -- over the {BUDGET_MIB} MiB a call can carry beside the code: lower --quality"
             if mib > BUDGET_MIB else ""))
    return 0 if mib <= BUDGET_MIB else 1


def pack_lists(cfg: dict, out: Path) -> dict[str, str]:
    """Copy a config's drop_copies lists into ``out``/lists/ (weights/ does not travel); {the path as
    the config writes it: the copy's}. The GPU run drops each listed copy whose partner the recorded
    split puts in validation or test, packed or not (`core.data.listed_training_copies` with the
    split's roles): the same training images as here, which `train.py --finish-from` checks."""
    found = {}
    for f in config_lists(cfg):
        data = D.resolve_root(f).read_bytes()
        # named by content: two configs' lists of one name (weights/A/x.tsv, weights/B/x.tsv) stay apart
        dest = out / "lists" / f"{hashlib.sha256(data).hexdigest()[:12]}_{Path(f).name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        found[f] = str(dest)
    return found


def config_lists(cfg: dict) -> list[str]:
    lists = cfg.get("drop_copies") or []
    return [lists] if isinstance(lists, str) else list(lists)


def pack(out: Path) -> Path:
    """One gzipped tar of `out` in gpupack/ (git-ignored), which the call carries and
    bench/gpu_run.sh unpacks. The device tool counts ~10,000 small files as more than their bytes
    (52.5 MiB of images plus the code and wheels was refused as over 64 MiB; as one archive it went)."""
    dest = Path("gpupack") / "gpu.tgz"
    dest.parent.mkdir(exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    return dest


if __name__ == "__main__":
    sys.exit(main())
