"""Does an unaligned thumbnail check find the copies `bench/copy_audit.py` aligns? A split drawn
from scratch would need the aligned check over every pair (about an hour on the 2-core host);
this measures the cheap alternative on the default's test split, so that the choice is a number.

    PYTHONPATH=. python bench/copy_shortcut.py    # reads the model's copy_pairs_test.tsv and the audit's cache

For each test image: the best z-normalised correlation with any training image under the four
flips the split's own check knows (none, mirror, upside down, half turn), on 64 px head crops
pooled to 32 or 16 px (plain, histogram-equalised, equalised and blurred). Per threshold: the share
of the copies the split's own check misses (listed, not marked: 201 on the default) with at least
one listed partner passing (recall), the share of other test images (no copy marked or listed;
LGG apart) whose best match passes, and the share of LGG test slices whose best match among other
patients' training slices passes (certainly not copies).
Runtime: seconds with the audit's cache, 3-4 min without it.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header  # noqa: E402
from bench.copy_audit import audit_files, crops64, dihedral, pool, znorm  # noqa: E402
from core import data as D  # noqa: E402
from core.data import patient_id, read_copy_pairs  # noqa: E402
from core.evaluation import copies_trained_on, read_copy_list  # noqa: E402
from core.inference import default_weights, load_card  # noqa: E402
from core.ood import read_split_file, source_roots  # noqa: E402

THRESHOLDS = (0.90, 0.92, 0.94, 0.95, 0.96, 0.97)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="model directory (default: weights/DEFAULT)")
    p.add_argument("--copies", help="the audit's pairs (default: the model's copy_pairs_test.tsv, "
                                    "bench/copy_audit.py --pairs-out)")
    p.add_argument("--cache", help="the audit's cache folder (default as bench/copy_audit.py)")
    args = p.parse_args(argv)
    header("cpu")
    wdir = Path(args.weights or default_weights())
    record = read_split_file(wdir / "split.json")
    src, split_of, rel, paths, cache_dir = audit_files(record, source_roots(load_card(wdir), None), "test", args.cache)
    crops, eq = crops64(paths, 2, cache_dir)
    pairs_file = args.copies or wdir / "copy_pairs_test.tsv"
    listed = read_copy_list(pairs_file, record)
    partners = defaultdict(list)   # an image may have several copies (up to 9)
    for a, b in read_copy_pairs(pairs_file):
        partners[a].append(b)
    # the split's hash check (eval.json's marks now hold the lists' too; since session 43 the check
    # itself can read core/known_copies.tsv, which holds these copies: left out, as when this was measured)
    card = load_card(wdir)
    marked = copies_trained_on(D.samples_from_record(record, source_roots(card, None)), card.get("sources") or [],
                               known=False)
    tr, te = np.nonzero(split_of == "train")[0], np.nonzero(split_of == "test")[0]
    col = {(src[i], rel[i]): a for a, i in enumerate(tr)}
    pid = np.array([patient_id(r) or "" for r in rel])
    key = [(src[i], rel[i]) for i in te]
    is_copy = np.array([k in listed and k not in marked for k in key])   # the ones the own check misses
    other = np.array([k not in listed and k not in marked and k[0] != "lgg" for k in key])
    lgg = np.nonzero(src[te] == "lgg")[0]
    print(f"{len(te)} test images against {len(tr)} training images; {is_copy.sum()} listed copies the split's own check does not mark, "
          f"{other.sum()} other non-LGG test images, {len(lgg)} LGG slices")
    feats = {"eq32": pool(eq, 2), "eqblur32": ndimage.gaussian_filter(pool(eq, 2), (0, 1, 1)),
             "eq16": pool(eq, 4), "plain32": pool(crops, 2)}
    print(f"{'feature':9s} {'threshold':>9s} {'copies found':>12s} {'others passing':>14s} {'LGG other patients':>18s}")
    for name, f in feats.items():
        B = znorm(f[tr])
        best = np.full((len(te), len(tr)), -np.inf, np.float32)
        for k in (0, 1, 4, 5):   # the split's own transforms: none, mirror, upside down, half turn
            best = np.maximum(best, znorm(dihedral(f[te], k)) @ B.T)
        found = np.array([max(best[a, col[p]] for p in partners[k]) for a, k in enumerate(key) if is_copy[a]])
        top = best.max(1)
        cross = np.array([best[a][pid[tr] != pid[te[a]]].max() for a in lgg])
        for t in THRESHOLDS:
            print(f"{name:9s} {t:9.2f} {np.mean(found >= t):12.1%} {np.mean(top[other] >= t):14.1%} "
                  f"{np.mean(cross >= t):18.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
