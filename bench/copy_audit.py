"""Unmarked copies: test (or val) images that have a real copy of the same slice in the training
split (mirrored, turned a quarter, re-contrasted, re-framed) that the project's own copy check
(`core.data.copy_pairs`: perceptual hashes under flips, then a 48 px thumbnail correlation) does
not mark. Their scores flatter the model; the summary says by how much, per source.

    PYTHONPATH=. python bench/copy_audit.py                                   # default model, test split
    PYTHONPATH=. python bench/copy_audit.py --out runs/unmarked_copies.tsv
    PYTHONPATH=. python bench/copy_audit.py --split val --out runs/unmarked_copies_val.tsv
    PYTHONPATH=. python bench/copy_audit.py --pairs-out runs/copy_pairs_test.tsv   # every copy, for train.py --drop-copies
    PYTHONPATH=. python bench/copy_audit.py --weights weights/resnet18_176 --workers 2
    PYTHONPATH=. python bench/copy_audit.py --split all --pairs-out core/known_copies.tsv \
        --merge weights/resnet18_192_gpu_ema120_s2/copy_pairs_test.tsv \
        --merge weights/resnet18_192_gpu_ema120_s2/copy_pairs_val.tsv     # the list fresh splits join (34 min)

Method (the 2026-12-06 audit, made one script):
 1. every image cropped to the head (`head_bbox`, rel_threshold 0.1), 64 px; also histogram-
    equalised (ranks), which undoes a contrast change.
 2. candidates: each test image against every training image, under the 8 dihedral transforms,
    on z-normalised 32 px (plain, equalised, equalised + blurred) and 16 px thumbnails; the 6 best
    training images per test image and feature are kept.
 3. each candidate aligned by an affine ECC fit at 64 px (plain and equalised), scored by the
    correlation of the blurred images; pairs >= 0.93 go on to 128 px (ECC at two scales, score
    the fine detail, difference of Gaussians), pairs whose 128 px fine-detail score is >= 0.70
    with a sane warp (singular values 0.75-1.33) go on to 256 px.
 4. 256 px: equalised images, ECC at three scales, score 'hp256' = correlation of the fine detail
    (Gaussian 1 px minus 4 px). Test images without a >= 0.76 match so far get their 3 best 64 px
    candidates (>= 0.85) aligned at 256 px as well (a copy re-framed enough to lose at 128 px).
 5. a test image's copy is its best hp256 partner; a copy at hp256 >= 0.763 (pairs checked by eye;
    LGG slices of other patients, the cross-patient control, never exceed 0.60).
 "Unmarked": test images not marked copy_in_training in the model's eval.json; val images (no
 eval.json records) not in a `core.data.copy_pairs` pair with a training image.

`--split all` (session 43) runs the same steps on every image of the split against every other,
whatever its part, leaving out pairs the project's own check already groups (`core.data.group_roots`
without the list): 11,097 images, 113,965 candidate pairs, 34 min on the 2-core host with an empty
cache. Its list, `core/known_copies.tsv`, gives each pair's content keys (SHA-256, 16 hex digits),
so that `core.data.assign_groups` joins the pairs in every fresh split under any layout or names.

Intermediate arrays are cached under $BT_CACHE (default ~/.cache/brain-tumour)/copy_audit/,
keyed by the split's files, so a rerun with another --out only redoes the summary.
Runtime (2026-12-06, 2-core Xeon shared with a test run, test split, empty cache): 11 min
(the 256 px alignments are two thirds of it); reproduces the audit's 201 test pairs row for row
(/tmp/leak_audit/unmarked_copies.tsv). Per-source columns: images, marked by the project,
unmarked copies, unmarked pairs at 0.60-0.763 (neighbouring slices, or copies too changed to
call), and, for test, accuracy (class; tumour or not for binary-labelled sources),
sensitivity and specificity with all records, without the marked copies, and without both.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import time
from collections import Counter, defaultdict
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")   # the workers parallelise; BLAS threads would fight them
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402
from scipy.stats import rankdata  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header, positive  # noqa: E402
from core import data as D  # noqa: E402
from core.inference import default_weights, load_card  # noqa: E402
from core.labels import is_tumour_label  # noqa: E402
from core.ood import read_split_file, source_roots  # noqa: E402
from core.preprocess import head_bbox  # noqa: E402
from core.reader import read_scan  # noqa: E402

cv2.setNumThreads(1)

THUMB = 64            # px of the candidate sweep's crops
TOP_K = 6             # training images kept per test image and feature
REFINE_MIN = 0.93     # 64 px aligned blur correlation that sends a pair to 128 px
HP128_MIN = 0.70      # 128 px fine-detail correlation (sane warp) that sends a pair to 256 px
FOUND = 0.76          # a test image with a 256 px match at least this good needs no second look
EXTRA_MIN = 0.85      # 64 px score of the second look's candidates
EXTRA_TOP = 3         # ... at most this many per test image
COPY = 0.763          # hp256 at or above which a pair is a copy (checked by eye)
COPY_NEIGHBOUR = 0.60  # below this: another slice or patient (the LGG cross-patient control)


# ---------------------------------------------------------------- images


def head_crop(path: str, side: int) -> np.ndarray:
    """The head (`head_bbox` at 0.1: keeps dark FLAIR heads whole), float, resized to side x side."""
    g = read_scan(path).pixels
    y0, y1, x0, x1 = head_bbox(g, rel_threshold=0.1)
    c = Image.fromarray(np.ascontiguousarray(g[y0:y1, x0:x1], dtype=np.float32), mode="F")
    return np.asarray(c.resize((side, side), Image.BILINEAR))


def equalise(c: np.ndarray) -> np.ndarray:
    """Ranks in (0, 1]: a re-contrasted copy (gamma, windowing) gets the same image back."""
    return (rankdata(c.ravel()).reshape(c.shape) / c.size).astype(np.float32)


def dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 dihedral transforms (k // 2 quarter turns, then a mirror when k is odd);
    works on one image (2-D) or a stack (3-D, turning the last two axes)."""
    a = np.rot90(a, k // 2, axes=(-2, -1))
    return np.ascontiguousarray(a[..., ::-1] if k % 2 else a)


def blur(x: np.ndarray, s: float) -> np.ndarray:
    return cv2.GaussianBlur(x.astype(np.float32), (0, 0), s)


def detail(x: np.ndarray) -> np.ndarray:
    """Fine detail (difference of Gaussians): what two neighbouring slices do not share."""
    return blur(x, 1.0) - blur(x, 4.0)


def unit(x: np.ndarray) -> np.ndarray:
    x = x.ravel().astype(np.float64)
    x = x - x.mean()
    return x / max(np.linalg.norm(x), 1e-9)


def ecc(a: np.ndarray, b: np.ndarray, sigmas, iters: int, eps: float) -> np.ndarray:
    """Affine warp taking ``a`` onto ``b``, fitted coarse to fine on blurred images; a scale that
    does not converge keeps the warp so far (identity at worst)."""
    W = np.eye(2, 3, dtype=np.float32)
    for s in sigmas:
        try:
            _, W = cv2.findTransformECC(blur(b, s), blur(a, s), W, cv2.MOTION_AFFINE,
                                        (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iters, eps), None, 1)
        except cv2.error:
            pass
    return W


def warp(a: np.ndarray, W: np.ndarray) -> np.ndarray:
    return cv2.warpAffine(a.astype(np.float32), W, a.shape[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def singular_values(W: np.ndarray) -> tuple[float, float]:
    sv = np.linalg.svd(W[:, :2], compute_uv=False)
    return float(sv[0]), float(sv[1])


# ---------------------------------------------------------------- stages (each runs in the workers)

_PATHS: list[str] = []     # set in each worker by _init (fork keeps them cheap)
_CROPS = _EQ = None


def _init(paths, crops=None, eq=None):
    global _PATHS, _CROPS, _EQ
    _PATHS, _CROPS, _EQ = paths, crops, eq
    cv2.setNumThreads(1)


def _crop64(i: int) -> np.ndarray:
    return head_crop(_PATHS[i], THUMB)


def _refine64(item):
    """Step 3 at 64 px: for each transform a coarse feature proposed, ECC on the plain and on the
    equalised crops; the pair's score is the best blurred correlation over both and all kinds."""
    (i, j), kinds = item
    best = None
    for k in sorted(kinds):
        rec = {"kind": k}
        for nm, a, b in (("p", dihedral(_CROPS[i], k), _CROPS[j]), ("e", dihedral(_EQ[i], k), _EQ[j])):
            W = ecc(a, b, (1.5,), 60, 1e-5)
            rec[nm] = float(unit(blur(warp(a, W), 1.0)) @ unit(blur(b, 1.0)))
        rec["score"] = max(rec["p"], rec["e"])
        if best is None or rec["score"] > best["score"]:
            best = rec
    return (i, j), best


def _hp128(chunk):
    """Step 3 at 128 px: fine-detail correlation (plain and equalised) with the warp's singular
    values; pairs come grouped by test image so each test image is read once."""
    out, crops = {}, {}

    def both(n):
        if n not in crops:
            c = head_crop(_PATHS[n], 128)
            crops[n] = (c, equalise(c))
        return crops[n]
    for (i, j), k in chunk:
        rec = {"kind": k}
        for nm, ix in (("p", 0), ("e", 1)):
            a, b = dihedral(both(i)[ix], k), both(j)[ix]
            W = ecc(a, b, (3.0, 1.5), 80, 1e-6)
            rec[nm] = (float(unit(detail(warp(a, W))) @ unit(detail(b))), singular_values(W))
        out[(i, j)] = rec
        crops.pop(j, None)   # training images rarely repeat within a test image's pairs
    return out


def _hp256(chunk):
    """Step 4: hp256 of each pair on equalised 256 px crops, ECC at three scales."""
    out, cache = {}, {}

    def eq256(n):
        if n not in cache:
            if len(cache) > 200:
                cache.clear()
            cache[n] = equalise(head_crop(_PATHS[n], 256))
        return cache[n]
    for (i, j), k in chunk:
        a, b = dihedral(eq256(i), k), eq256(j)
        W = ecc(a, b, (6.0, 3.0, 1.5), 100, 1e-6)
        out[(i, j)] = (float(unit(detail(warp(a, W))) @ unit(detail(b))), k)
    return out


def _chunks(pairs_kinds, n):
    """Pairs sorted by test image, cut into about n * 4 chunks on test-image boundaries."""
    byi = defaultdict(list)
    for (i, j), k in pairs_kinds:
        byi[i].append(((i, j), k))
    groups = [byi[i] for i in sorted(byi)]
    size = max(1, sum(map(len, groups)) // (n * 4))
    out, cur = [], []
    for g in groups:
        cur += g
        if len(cur) >= size:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


# ---------------------------------------------------------------- the sweep (step 2)


INVERSE = (0, 1, 6, 3, 4, 5, 2, 7)   # dihedral(dihedral(a, k), INVERSE[k]) is a


def pool(a: np.ndarray, f: int) -> np.ndarray:
    """Each f x f block's mean: a coarse feature of a stack of crops."""
    n, h, w = a.shape
    return a.reshape(n, h // f, f, w // f, f).mean((2, 4))


def znorm(a: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit length: their dot products are correlations."""
    a = a.reshape(len(a), -1).astype(np.float32)
    a = a - a.mean(1, keepdims=True)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-6)


def candidates(crops, eq, tr, te, group=None):
    """{(test index, train index): set of dihedral kinds} proposed by any coarse feature.

    ``group`` (the all-pairs audit, ``tr`` and ``te`` then the same images): each image's group
    under the project's own check; pairs within one group (an image and itself included) are
    not proposed, and each pair is keyed once, lower index first, its kinds turned to match."""
    feats = {"plain32": pool(crops, 2), "eq32": pool(eq, 2),
             "eqblur32": ndimage.gaussian_filter(pool(eq, 2), (0, 1, 1)), "plain16": pool(crops, 4)}
    cand = defaultdict(set)
    for name, f in feats.items():
        B = znorm(f[tr])
        for lo in range(0, len(te), 2048):   # row blocks: the all-pairs matrix would be 0.5 GB a copy
            rows = te[lo:lo + 2048]
            best = np.full((len(rows), len(tr)), -np.inf, np.float32)
            kind = np.zeros((len(rows), len(tr)), np.int8)
            for k in range(8):   # strict > keeps the first kind on ties, as argmax over the 8 did
                C = znorm(dihedral(f[rows], k)) @ B.T
                up = C > best
                best[up], kind[up] = C[up], k
            if group is not None:
                best[group[rows][:, None] == group[tr][None, :]] = -np.inf
            idx = np.argpartition(-best, TOP_K, axis=1)[:, :TOP_K]
            for a in range(len(rows)):
                for j in idx[a]:
                    i, t, k = int(rows[a]), int(tr[j]), int(kind[a, j])
                    if group is not None and i > t:
                        i, t, k = t, i, INVERSE[k]
                    cand[(i, t)].add(k)
    return cand


# ---------------------------------------------------------------- driver


def cached(cache_dir: Path, name: str, fn):
    f = cache_dir / f"{name}.pkl"
    if f.exists():
        return pickle.loads(f.read_bytes())
    v = fn()
    tmp = f.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(v))
    tmp.replace(f)
    return v


def audit(paths, split_of, target, workers, cache_dir, log=print, group=None):
    """({target index: (hp256, train index, kind)}: each target image's best 256 px partner,
    {(target index, train index): (hp256, kind)}: every pair scored at 256 px).

    ``group`` (`core.data.group_roots`): every image against every other, pairs within a group left
    out; pairs are (lower index, higher index), and an image is looked at from either end."""
    every = group is not None
    tr = np.arange(len(paths)) if every else np.nonzero(split_of == "train")[0]
    te = tr if every else np.nonzero(split_of == target)[0]
    t0 = time.time()

    crops, eq = crops64(paths, workers, cache_dir)
    log(f"  crops: {len(paths)} images, {time.time() - t0:.0f} s")
    cand = cached(cache_dir, "candidates", lambda: candidates(crops, eq, tr, te, group))
    log(f"  candidates: {len(cand)} pairs, {time.time() - t0:.0f} s")

    def refine():
        with Pool(workers, _init, (paths, crops, eq)) as p:
            return dict(p.imap_unordered(_refine64, list(cand.items()), chunksize=256))
    R = cached(cache_dir, "refined64", refine)
    log(f"  64 px alignment: {sum(r['score'] >= REFINE_MIN for r in R.values())} pairs >= {REFINE_MIN}, "
        f"{time.time() - t0:.0f} s")

    def run_chunks(fn, items):
        out = {}
        with Pool(workers, _init, (paths,)) as p:
            for d in p.imap_unordered(fn, _chunks(items, workers)):
                out.update(d)
        return out
    H = cached(cache_dir, "hp128", lambda: run_chunks(
        _hp128, [(ij, r["kind"]) for ij, r in R.items() if r["score"] >= REFINE_MIN]))

    def hp128(r):   # an implausible warp (squashed, stretched) scores nothing
        return max([r[m][0] for m in "pe" if r[m][1][1] > 0.75 and r[m][1][0] < 1.33] or [-1])
    first = [(ij, r["kind"]) for ij, r in H.items() if hp128(r) >= HP128_MIN]
    log(f"  128 px: {len(H)} pairs, {len(first)} >= {HP128_MIN}, {time.time() - t0:.0f} s")
    P = cached(cache_dir, "hp256", lambda: run_chunks(_hp256, first))
    log(f"  256 px: {len(P)} pairs, {time.time() - t0:.0f} s")

    # second look: a copy re-framed or re-contrasted enough to fail at 128 px still tops the 64 px list
    ends = (lambda ij: ij) if every else (lambda ij: ij[:1])
    found = {n for ij, (h, k) in P.items() if h >= FOUND for n in ends(ij)}
    byi = defaultdict(list)
    for ij, r in R.items():
        for n in ends(ij):
            if n not in found and ij not in P:
                byi[n].append((r["score"], ij, r["kind"]))
    extra = set()
    for n, L in byi.items():
        L.sort(reverse=True)
        extra |= {(ij, k) for s, ij, k in L[:EXTRA_TOP] if s >= EXTRA_MIN}
    E = cached(cache_dir, "hp256_extra", lambda: run_chunks(_hp256, sorted(extra)))
    log(f"  256 px second look: {len(E)} pairs, {time.time() - t0:.0f} s")

    best, scored = {}, {**P, **E}
    for (i, j), (h, k) in scored.items():
        if i not in best or h > best[i][0]:
            best[i] = (h, j, k)
    return best, scored


def metrics(recs, threshold):
    """accuracy (the class when the label is one of the model's classes, else tumour or not),
    sensitivity and specificity of the tumour call at ``threshold``; non-MRI records skipped."""
    ok, tp, pos, tn, neg = 0, 0, 0, 0, 0
    n = 0
    for p in recs:
        t = is_tumour_label(p["label"])
        if t is None:
            continue
        called = p["tumour_probability"] >= threshold
        n += 1
        ok += (p["pred"] == p["label"]) if p["label"] in p["probs"] else (called == t)
        if t:
            pos += 1
            tp += called
        else:
            neg += 1
            tn += not called
    f = lambda a, b: f"{100 * a / b:6.2f}" if b else "   n/a"  # noqa: E731
    return n, f(ok, n), f(tp, pos), f(tn, neg)


def audit_files(record: dict, roots: dict, split: str, cache: str | None = None):
    """(source, split, file) arrays, paths and the cache folder of an audit of ``split`` against
    the training split of split.json's ``record``: train files first, then the target split,
    source by source (the audit's order, which its cache key holds, with each file's content: a
    folder edited in place, or other data under the same names, is audited afresh)."""
    parts = ("train", "val", "test") if split == "all" else ("train", split)
    recs = [(s, sp, rel) for s, d in record.items() for sp in parts for rel in d.get(sp, [])]
    missing = sorted({s for s, _, _ in recs} - set(roots))
    if missing:
        raise ValueError(f"no data root for source(s) {missing}")
    paths = [str(roots[s] / r) for s, _, r in recs]
    key = hashlib.sha1("\n".join(f"{s}|{sp}|{r}|{D.content_key(p)}" for (s, sp, r), p in zip(recs, paths))
                       .encode()).hexdigest()[:16]
    base = Path(cache) if cache else Path(os.environ.get("BT_CACHE", Path.home() / ".cache" / "brain-tumour"))
    cache_dir = base / "copy_audit" / f"{split}_{key}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    return (np.array([r[0] for r in recs]), np.array([r[1] for r in recs]), np.array([r[2] for r in recs]),
            paths, cache_dir)


def crops64(paths, workers: int, cache_dir: Path):
    """Step 1's 64 px head crops, plain and equalised (cached)."""
    def make():
        with Pool(workers, _init, (paths,)) as p:
            c = np.stack(p.map(_crop64, range(len(paths)), chunksize=64)).astype(np.float32)
        return c, np.stack([equalise(x) for x in c])
    return cached(cache_dir, "crops64", make)


def merged_pairs(lists, src, rel) -> dict[tuple[int, int], tuple[float, int]]:
    """The aligned pairs (hp256 a number, not 'hash') of earlier audits' ``--pairs-out`` lists,
    by the all-pairs audit's indices: a test image's copy that the all-pairs sweep did not put
    among its candidates (other copies or neighbouring slices took the places) stays listed."""
    at = {(s, r): n for n, (s, r) in enumerate(zip(src, rel))}
    out = {}
    for f in lists:
        for line in Path(f).read_text().splitlines()[1:]:
            c = line.split("\t")
            if len(c) >= 6 and c[4] != "hash":
                if (c[0], c[1]) not in at or (c[2], c[3]) not in at:
                    raise SystemExit(f"{f}: names {c[0]}/{c[1]} ~ {c[2]}/{c[3]}, not both files of this split "
                                     "(a list made for another split)")
                i, j = at[(c[0], c[1])], at[(c[2], c[3])]
                out[(min(i, j), max(i, j))] = (float(c[4]), int(c[5]) if i < j else INVERSE[int(c[5])])
    return out


def audit_all(src, rel, paths, workers: int, cache_dir: Path, pairs_out: str | None, merge=()) -> int:
    """Every copy between two images of the split that the project's own grouping keeps apart:
    the pairs a fresh split must join (`core.data.known_copy_pairs`), written with each file's
    content key so that they hold under any folder layout or file name. ``merge``: earlier
    audits' pair lists (`merged_pairs`), added where this one lacks the pair."""
    t0 = time.time()
    patient = [D.patient_id(x) for x in paths]
    group = cached(cache_dir, "groups", lambda: np.array(D.group_roots(paths, patient, known=False)))
    print(f"all-pairs audit: {len(paths)} images in {len(set(group.tolist()))} groups of the project's own "
          f"check; cache: {cache_dir}")
    _, scored = audit(paths, None, None, workers, cache_dir, group=group)
    # Two LGG patients' slices are never one scan (their union is refused anyway): left out
    found = {ij: hk for ij, hk in scored.items() if hk[0] >= COPY}
    extra = {ij: hk for ij, hk in merged_pairs(merge, src, rel).items() if ij not in found and group[ij[0]] != group[ij[1]]}
    if merge:
        print(f"merged from {len(merge)} earlier lists: {len(extra)} pairs this audit does not list")
    pairs = sorted((ij, hk) for ij, hk in {**found, **extra}.items()
                   if not (patient[ij[0]] and patient[ij[1]] and patient[ij[0]] != patient[ij[1]]))
    key = [D.content_key(x) for x in paths]
    rows = [(src[i], rel[i], src[j], rel[j], f"{h:.3f}", k, key[i], key[j]) for (i, j), (h, k) in pairs]
    roots = set(group.tolist())
    merged = D._union_find(len(paths), [(int(group[i]), int(group[j])) for (i, j), _ in pairs])
    print(f"audit: {time.time() - t0:.0f} s; {len(rows)} copies over {len({n for ij, _ in pairs for n in ij})} "
          f"images: the project's {len(roots)} groups become {len({merged[g] for g in roots})}")
    by = Counter(tuple(sorted((r[0], r[2]))) for r in rows)
    for (a, b), c in sorted(by.items()):
        print(f"  {a:10s} {b:10s} {c:5d}")
    if pairs_out:
        Path(pairs_out).parent.mkdir(parents=True, exist_ok=True)
        Path(pairs_out).write_text("\t".join(D.KNOWN_COPIES_COLUMNS) + "\n"
                                   + "".join("\t".join(map(str, r)) + "\n" for r in rows))
        print(f"wrote {len(rows)} pairs to {pairs_out}")
    return 0


def data_record(specs: list[str]) -> tuple[dict, dict]:
    """({name: {"train": [rel, ...]}}, {name: root}) of ``--data NAME=DIR`` roots, every readable
    image of each (`core.data.discover`), so that the audit reads them as one split's files."""
    record, roots = {}, {}
    for spec in specs:
        name, sep, root = spec.partition("=")
        if not sep or not name or not root:
            raise ValueError(f"{spec!r}: NAME=DIR is expected")
        if name in record:
            raise ValueError(f"two roots are named {name}: give each its own name")
        root = D.resolve_root(root)   # from here, else the repository, as train.py's --data
        scan = D.discover(root, name, check_readable=True)   # unreadable files skipped, as train.py does
        for rel, why in scan.skipped:
            print(f"skipped {name}/{rel}: {why}")
        record[name] = {"train": sorted(s.rel for s in scan.samples)}
        roots[name] = root.resolve()   # where discover's rel paths start
    if overlap := D.overlapping(list(roots.items())):   # each image would be listed as its own copy
        raise ValueError(f"roots overlap ({'; '.join(overlap)}): give each image once")
    return record, roots


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="model directory (default: weights/DEFAULT)")
    p.add_argument("--split", choices=("test", "val", "all"), default="test",
                   help="the split audited against the training split; 'all': every image of the split "
                        "against every other one, whatever its part, pairs the project's own check groups "
                        "left out (with --pairs-out: the list core/known_copies.tsv is)")
    p.add_argument("--out", help="write the unmarked copies as TSV here (each image's best copy)")
    p.add_argument("--pairs-out", help="write every pair at or above the copy threshold as TSV here, marked "
                                       "or not, each image with all its copies, and the project's own check's "
                                       "pairs (hp256 'hash'): what train.py --drop-copies takes to leave the "
                                       "copies out of training")
    p.add_argument("--data", action="append", metavar="NAME=DIR",
                   help="with --split all: audit the images of these class-per-folder roots (each named; the list "
                        "matches files by content, whatever the names) instead of a model's split; the list is what "
                        "train.py --join-copies reads")
    p.add_argument("--merge", action="append", metavar="LIST",
                   help="with --split all: add the aligned pairs of an earlier audit's --pairs-out list that this "
                        "one lacks (repeatable)")
    p.add_argument("--workers", type=positive, default=2, help="processes (default 2)")
    p.add_argument("--cache", help="cache folder (default $BT_CACHE or ~/.cache/brain-tumour, /copy_audit)")
    args = p.parse_args(argv)
    if args.split == "all" and args.out:
        p.error("--out lists each test or validation image's best copy; with --split all give --pairs-out")
    if args.data and (args.split != "all" or args.weights):
        p.error("--data audits every pair of other data: give it with --split all, without --weights")
    if args.merge and args.split != "all":
        p.error("--merge adds earlier lists to the all-pairs list: give it with --split all")
    header("cpu")
    wdir = Path(args.weights or default_weights())
    try:
        if args.data:   # any data, as train.py reads it: the files of each root, whatever their part
            record, roots = data_record(args.data)
        else:
            card = load_card(wdir)
            record = read_split_file(wdir / "split.json")
            roots = source_roots(card, None)
    except (OSError, ValueError) as e:
        p.error(f"cannot read {'--data' if args.data else f'the model {wdir}'}: {e}")
    ev = None
    if args.split == "test":
        try:
            ev = json.loads((wdir / "eval.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"{wdir}/eval.json: {e}")
    try:
        src, split_of, rel, paths, cache_dir = audit_files(record, roots, args.split, args.cache)
    except ValueError as e:
        p.error(f"--data: {e}" if args.data else f"{wdir}/card.json: {e}")
    if args.split == "all":
        return audit_all(src, rel, paths, args.workers, cache_dir, args.pairs_out, args.merge or ())
    print(f"model: {wdir}; split: {args.split} ({int((split_of == args.split).sum())} images against "
          f"{int((split_of == 'train').sum())} training images); cache: {cache_dir}")
    t0 = time.time()
    best, scored = audit(paths, split_of, args.split, args.workers, cache_dir)

    # what the project marks already
    if ev is not None:
        mark = {(q["source"], q["file"]): bool(q.get("copy_in_training")) for q in ev["predictions"]}
        marked = {i for i in np.nonzero(split_of == args.split)[0] if mark.get((src[i], rel[i]))}
    else:
        marked = set()
        for i, j in D.copy_pairs(paths):
            for a, b in ((i, j), (j, i)):
                if split_of[a] == args.split and split_of[b] == "train":
                    marked.add(a)
    target = np.nonzero(split_of == args.split)[0]
    # in file order, so that ties in the sort below fall as the audit's did
    new = {i: best[i] for i in target if i in best and best[i][0] >= COPY and i not in marked}
    order = sorted(new.items(), key=lambda x: (src[x[0]], -x[1][0]))

    rows = []
    if args.split == "test":
        # why the project's check missed each: its hashes and thumbnails on the same pair
        h = D._all_hashes(paths)
        for i, (s, j, k) in order:
            dp = bin(int(h[i, 0]) ^ int(h[j, 0])).count("1")
            df = min(bin(int(h[i, t]) ^ int(h[j, 0])).count("1") for t in (1, 2, 3))
            tc = float((dihedral(D._thumb(paths[i]), k) * D._thumb(paths[j])).sum())
            if k in (2, 3, 6, 7):
                r = "quarter turn / transpose (not among the project's transforms)"
            elif min(dp, df) > 6:
                r = "phash > 6 bits (plain and flips)"
            elif tc < 0.97:
                r = "hash ok, thumbnail < 0.97"
            else:
                r = "other"
            rows.append((src[i], rel[i], src[j], rel[j], round(s, 3), k, dp, df, round(tc, 3), r))
        cols = ("test_source", "test_file", "train_source", "train_file", "hp256", "dihedral_k",
                "phash_plain", "phash_flip_min", "project_thumb48", "reason_missed")
    else:
        # hp256 to 3 places, trailing zeros kept, as the audit's val list wrote it
        rows = [(src[i], rel[i], src[j], rel[j], f"{s:.3f}", k) for i, (s, j, k) in order]
        cols = ("val_source", "val_file", "train_source", "train_file", "hp256", "dihedral_k")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\t".join(cols) + "\n")
            for r in rows:
                f.write("\t".join(map(str, r)) + "\n")
        print(f"wrote {len(rows)} unmarked copies to {args.out}")
    if args.pairs_out:
        # the project's own check's pairs too (hp256 "hash"): a run dropping the list's copies
        # must drop those as well, and the audit does not score every one of them as a copy
        aligned = {(i, j) for (i, j), (h, k) in scored.items() if h >= COPY}
        hashed = {(a, b) for i, j in D.copy_pairs(paths) for a, b in ((i, j), (j, i))
                  if split_of[a] == args.split and split_of[b] == "train" and (a, b) not in aligned}
        pairs = sorted([(src[i], rel[i], src[j], rel[j], f"{scored[(i, j)][0]:.3f}", scored[(i, j)][1])
                        for i, j in aligned] + [(src[i], rel[i], src[j], rel[j], "hash", "") for i, j in hashed],
                       key=lambda r: (r[0], r[1], -float(r[4]) if r[4] != "hash" else 0.0))
        Path(args.pairs_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.pairs_out).write_text(
            "\t".join((f"{args.split}_source", f"{args.split}_file", "train_source", "train_file", "hp256",
                       "dihedral_k")) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in pairs))
        print(f"wrote {len(pairs)} pairs ({len({r[:2] for r in pairs})} {args.split} images, "
              f"{len({r[2:4] for r in pairs})} training images) to {args.pairs_out}")
    print(f"audit: {time.time() - t0:.0f} s")

    # per-source summary
    near = Counter(src[i] for i, v in best.items() if COPY_NEIGHBOUR <= v[0] < COPY and i not in marked)
    print(f"\n{'source':10s} {'n':>5s} {'marked':>6s} {'unmarked':>8s} {'0.60-0.763':>10s}  reasons missed")
    why = Counter((r[0], r[-1]) for r in rows) if args.split == "test" else Counter()
    for s in record:
        n = int((src[target] == s).sum())
        m = sum(src[i] == s for i in marked)
        u = sum(src[i] == s for i in new)
        reasons = "; ".join(f"{w} {c}" for (ws, w), c in sorted(why.items()) if ws == s)
        print(f"{s:10s} {n:5d} {m:6d} {u:8d} {near[s]:10d}  {reasons}")
    summary = {"split": args.split, "weights": str(wdir), "unmarked": len(new), "marked": len(marked),
               "per_source": {}}
    if ev is not None:
        thr = ev["threshold"]
        unmarked_keys = {(src[i], rel[i]) for i in new}
        print(f"\nat the model's threshold {thr:.4f}: accuracy / sensitivity / specificity (%)")
        print(f"{'source':10s} {'all':>26s}  {'without marked':>26s}  {'without marked + unmarked':>30s}")
        for s in record:
            r_all = [q for q in ev["predictions"] if q["source"] == s]
            r_m = [q for q in r_all if not q.get("copy_in_training")]
            r_mu = [q for q in r_m if (q["source"], q["file"]) not in unmarked_keys]
            cells = [metrics(r, thr) for r in (r_all, r_m, r_mu)]
            print(f"{s:10s} " + "  ".join(f"n {c[0]:4d} {c[1]} {c[2]} {c[3]}" for c in cells))
            summary["per_source"][s] = {name: dict(zip(("n", "accuracy", "sensitivity", "specificity"),
                                                       [c[0]] + [None if x.strip() == "n/a" else float(x) for x in c[1:]]))
                                        for name, c in zip(("all", "without_marked", "without_marked_unmarked"), cells)}
    for s in record:
        summary["per_source"].setdefault(s, {})["unmarked"] = sum(src[i] == s for i in new)
        summary["per_source"][s]["marked"] = sum(src[i] == s for i in marked)
    print(json.dumps(summary, default=int))
    return 0


if __name__ == "__main__":
    sys.exit(main())
