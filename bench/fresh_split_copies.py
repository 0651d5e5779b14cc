"""Does a fresh split keep the copies `core/known_copies.tsv` lists on one side? Draws the split
train.py would draw from scratch over the files of a model's recorded split, with and without
the list (`core.data.assign_groups(known=...)`), and counts the listed pairs that cross it, the
validation and test images with a listed copy in training, the groups and the largest one
without a patient, and the groups whose labels disagree; also the listed pairs across the
recorded split itself, and how many of the test/val audits' aligned copies (`copy_pairs_*.tsv`
beside the weights) the list alone joins.

    PYTHONPATH=. python bench/fresh_split_copies.py                 # the default's files, seed 0 (~2 min)
    PYTHONPATH=. python bench/fresh_split_copies.py --seed 3
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header  # noqa: E402
from core import data as D  # noqa: E402
from core.inference import default_weights, load_card  # noqa: E402
from core.ood import read_split_file, source_roots  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="model directory whose split's files are used (default: weights/DEFAULT)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    header("cpu")
    wdir = Path(args.weights or default_weights())
    record = read_split_file(wdir / "split.json")
    role = D.split_roles(record)
    pairs = D.read_copy_pairs(D.KNOWN_COPIES_FILE)
    print(f"{D.KNOWN_COPIES_FILE}: {len(pairs)} pairs; by sources: "
          + ", ".join(f"{a}-{b} {n}" for (a, b), n in sorted(Counter(tuple(sorted((x[0], y[0]))) for x, y in pairs).items())))
    print("recorded split of", wdir, "- listed pairs by parts:",
          dict(Counter("-".join(sorted((role[a], role[b]))) for a, b in pairs if a in role and b in role)))
    keys = sorted(role)
    at = {k: i for i, k in enumerate(keys)}
    comp = D._union_find(len(keys), [(at[a], at[b]) for a, b in pairs if a in at and b in at])
    for split in ("test", "val"):
        f = wdir / f"copy_pairs_{split}.tsv"
        if not f.exists():
            continue
        hp = [line.split("\t")[4] for line in f.read_text().splitlines()[1:]]
        aligned = [q for q, h in zip(D.read_copy_pairs(f), hp) if h != "hash"]
        joined = {q[0] for q in aligned if comp[at[q[0]]] == comp[at[q[1]]]}
        print(f"{f.name}: {len({q[0] for q in aligned})} {split} images with an aligned copy, "
              f"{len(joined)} joined to it by the list alone")
    samples = [s for src, root in source_roots(load_card(wdir), None).items()
               for s in D.discover(root, src).samples if (s.source, s.rel) in role]
    print(f"fresh split of {len(samples)} files, seed {args.seed}:")
    for known in (False, True):
        D.assign_groups(samples, known=known)
        D.split_by_group(samples, seed=args.seed)
        where = {(s.source, s.rel): s.split for s in samples}
        across = [q for q in pairs if where.get(q[0], "") != where.get(q[1], "") and q[0] in where and q[1] in where]
        leaked = {x for a, b in across for x, y in ((a, b), (b, a)) if where[x] in ("test", "val") and where[y] == "train"}
        groups = Counter(s.group for s in samples)
        loose = Counter(s.group for s in samples if D.patient_id(s.path) is None)
        mixed = D.mixed_label_groups(samples)
        print(f"  {'with' if known else 'without'} the list: {len(groups)} groups, largest without a patient "
              f"{max(loose.values())}; listed pairs across {len(across)}; validation/test images with a listed "
              f"copy in training {len(leaked)} ({dict(sorted(Counter(f'{x[0]} {where[x]}' for x in leaked).items()))}); "
              f"groups whose labels disagree {len(mixed)} ({sum(sum(c.values()) for c in mixed)} images)")
        print("    test images per source:", dict(sorted(Counter(s.source for s in samples if s.split == "test").items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
