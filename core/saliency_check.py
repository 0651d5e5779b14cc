"""Saliency checked against tumour masks: `python -m core saliency-check --weights weights/NAME`.

For each CAM method of `core.saliency.METHODS`, over the LGG FLAIR test slices of a model's
split.json that have a non-empty mask, two numbers in the model-input frame (the method the
card names is chosen the same way on the validation slices, then reported on the test ones):

- pointing game: share of slices whose map peak lies inside the mask grown by ``dilate_px``;
- energy in mask: mean share of the map's mass inside the (ungrown) mask.

Three maps that know nothing of the model give the floor: uniform noise, a Gaussian centred on
the frame (the head is centred by preprocessing), and the model's input itself blurred (FLAIR
lesions are bright: a map that points at the brightest region is the floor a CAM must clear to
show it reads more than intensity). The mask's own area share is the chance level of the energy
share; the grown mask's area share that of the pointing game, over the frame and over the head.

A run of fewer slices than the default or another tolerance is a probe: it writes to ``--json``
only, never over the model's saliency_eval.json or its card's default method.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import saliency as S
from .metrics import wilson

if TYPE_CHECKING:  # for the type hints only: core.inference loads torch and the models
    from .inference import Predictor

BASELINES = ("random map", "centre Gaussian", "blurred image")
BLUR_SIGMA = 1 / 24   # of the input size (8 px at 192): fixed before the image floor was measured
TARGETS = ("glioma", "predicted")
DEFAULT_LIMIT = 150
DEFAULT_DILATE_PX = S.POINTING_PX
HEAD_LEVEL = 0.08   # of the input's maximum: the head, for the pointing game's chance within it


# ----------------------------------------------------------------------------- inputs
def lesion_class(classes: list[str]) -> str | None:
    """The class the masked lesions (gliomas) belong to: glioma, or the any-tumour class of a
    yes/no model (the "glioma" target of the tables then reads "tumour"); None if neither."""
    from .labels import TUMOUR
    return next((c for c in ("glioma", TUMOUR) if c in classes), None)


def masked_slices(weights_dir: str | Path, source: str = "lgg",
                  data_config: str | Path | None = "experiments/default.toml",
                  split: str = "test") -> list[tuple[Path, Path]]:
    """(image, mask) for the ``split`` slices of ``source`` that have a mask file."""
    from .inference import load_card
    from .ood import source_roots, split_files
    weights_dir = Path(weights_dir)
    if not (weights_dir / "split.json").is_file():
        raise FileNotFoundError(f"no split.json in {weights_dir}: the test split is unknown")
    files = split_files(weights_dir / "split.json", source_roots(load_card(weights_dir), data_config))
    if source not in files:
        raise ValueError(f"split.json has no source {source!r} (it has {', '.join(files)})")
    images = sorted(files[source].get(split, ([], []))[0])
    pairs = [(Path(f), S.mask_path_for(f)) for f in images]
    return [(img, m) for img, m in pairs if m is not None]


def spread(items: list, limit: int | None) -> list:
    """At most ``limit`` items evenly spaced over the list, so every test patient stays in."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))]


# ----------------------------------------------------------------------------- maps
def baseline_map(name: str, size: int, rng: np.random.Generator, image: np.ndarray | None = None) -> np.ndarray:
    """A map that ignores the model: the floor every method must clear. ``image``: the model's
    input (size x size), which the 'blurred image' floor smooths."""
    if name == "random map":
        return rng.random((size, size), dtype=np.float32)
    if name == "blurred image":
        from scipy.ndimage import gaussian_filter
        return gaussian_filter(np.asarray(image, np.float32), BLUR_SIGMA * size)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    sigma = size / 4  # about the head's half-width after the crop
    return np.exp(-(yy ** 2 + xx ** 2) / (2 * sigma ** 2)).astype(np.float32)


def _predicted(predictor: Predictor, scan) -> str:
    from .metrics import decide
    p = predictor.probabilities(predictor.input_tensor(scan))
    return predictor.classes[int(decide(p, predictor.classes, predictor.threshold)[0])]


def score_slice(predictor: Predictor, image: Path, mask_file: Path, dilate_px: int,
                rng: np.random.Generator, methods: list[str]) -> dict | None:
    """Every method's scores on one slice, for both targets; None when the mask is empty here.
    ValueError when the mask file cannot be read or does not fit its scan: a measurement must not
    quietly drop the slices it cannot use."""
    from .masks import frame_mask
    from .reader import read_scan
    scan = read_scan(image)
    try:   # the app's fitting: size checked, reduced alike
        full = frame_mask(scan, mask_file)
    except Exception as e:
        raise ValueError(f"{mask_file} cannot be used as the mask of {image.name}: {e}") from None
    mask = S.mask_to_input(scan.pixels, full, predictor.spec) if full.any() else None
    if mask is None or not mask.any():  # a lesion outside the head crop, or an empty mask file
        return None
    size = mask.shape[0]
    tol = dilate_px / size  # mask_scores takes the tolerance as a share of the frame
    pred = _predicted(predictor, scan)
    from .preprocess import prepare
    seen = prepare(scan.pixels, predictor.spec, scan.head_box)   # the input, in the mask's frame
    head = seen > HEAD_LEVEL * seen.max()
    grown = S.dilate(mask, dilate_px)
    out = {"file": image.name, "pred": pred, "area_share": float(mask.mean()),
           "grown_share": float(grown.mean()),
           "grown_share_of_head": float((grown & head).sum() / max(int(head.sum()), 1)),
           "glioma": {}, "predicted": {}}
    for name in BASELINES:
        s = S.mask_scores(baseline_map(name, size, rng, seen), mask, tol)
        out["glioma"][name] = out["predicted"][name] = [s["pointing_hit"], s["energy_in_mask"]]
    lesion = lesion_class(predictor.classes)
    # One pass per target serves every method; a lesion-class prediction needs no second one.
    for key, target in (("glioma", lesion), ("predicted", pred)):
        if key == "predicted" and pred == lesion:
            out["predicted"].update({m: out["glioma"][m] for m in methods})
            continue
        for m, cam in S.saliency_maps(predictor, scan, methods, target).items():
            s = S.mask_scores(cam, mask, tol)
            out[key][m] = [s["pointing_hit"], s["energy_in_mask"]]
    return out


# ----------------------------------------------------------------------------- summary
def summarise(slices: list[dict], methods: list[str]) -> list[dict]:
    """One row per method and baseline: pointing game (with 95% CI) and energy, per target."""
    rows = []
    for m in [*methods, *BASELINES]:
        row = {"method": m, "baseline": m in BASELINES, "n": len(slices)}
        for target in TARGETS:
            hits = [s[target][m][0] for s in slices]
            row[f"pointing_{target}"] = float(np.mean(hits)) if hits else None
            row[f"pointing_{target}_ci95"] = list(wilson(sum(hits), len(hits)))
            row[f"energy_{target}"] = float(np.mean([s[target][m][1] for s in slices])) if hits else None
        rows.append(row)
    return rows


def best_method(rows: list[dict]) -> str:
    """The CAM method (no baseline) with the highest glioma pointing game; ties by energy.

    Compared at 4 decimals: methods that give the same map for a model (Grad-CAM, HiResCAM and
    XGrad-CAM behind a ResNet's pooling) differ only in float rounding, which another BLAS or
    thread count flips. Of tied methods the first in `METHODS` order wins."""
    cands = [r for r in rows if not r["baseline"]]
    return max(cands, key=lambda r: (round(r["pointing_glioma"], 4), round(r["energy_glioma"], 4)))["method"]


def beats_floors(rows: list[dict], method: str) -> bool:
    """Whether ``method``'s glioma pointing game is above every floor's: a best of six below a
    random map (EigenCAM at 0.08 against 0.11) points nowhere, and says so in the card."""
    score = next(r["pointing_glioma"] for r in rows if r["method"] == method)
    return all(score > r["pointing_glioma"] for r in rows if r["baseline"])


def check(predictor: Predictor, pairs: list[tuple[Path, Path]], dilate_px: int = DEFAULT_DILATE_PX,
          seed: int = 0, methods: list[str] | None = None) -> dict:
    """Scores every method on ``pairs``; returns rows, per-slice scores, chance levels, timing."""
    methods = list(methods or S.METHODS)
    rng = np.random.default_rng(seed)
    t0, slices, empty = time.perf_counter(), [], []
    for image, mask_file in pairs:
        s = score_slice(predictor, image, mask_file, dilate_px, rng, methods)
        (slices.append(s) if s is not None else empty.append(image.name))
    if not slices:
        raise ValueError("no slice with a non-empty mask in the model-input frame")
    rows = summarise(slices, methods)
    best = best_method(rows)
    return {"rows": rows, "best": best, "best_beats_floors": beats_floors(rows, best), "slices": slices,
            "skipped_empty": empty,
            "chance": {"area_share": float(np.mean([s["area_share"] for s in slices])),
                       "grown_share": float(np.mean([s["grown_share"] for s in slices])),
                       "grown_share_of_head": float(np.mean([s["grown_share_of_head"] for s in slices]))},
            "predicted_glioma": sum(s["pred"] == lesion_class(predictor.classes) for s in slices),
            "seconds": round(time.perf_counter() - t0, 1)}


def to_markdown(result: dict) -> str:
    """The table for docs/generalisation.md: methods, then the floors and the chance level."""
    lines = ["| method | pointing game, glioma (95% CI) | energy in mask, glioma "
             "| pointing game, predicted class | energy in mask, predicted class |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lo, hi = r["pointing_glioma_ci95"]
        name = f"*{r['method']}* (floor)" if r["baseline"] else (
            f"**{r['method']}**" if r["method"] == result["best"] else r["method"])
        lines.append(f"| {name} | {r['pointing_glioma']:.3f} ({lo:.2f}-{hi:.2f}) "
                     f"| {r['energy_glioma']:.3f} | {r['pointing_predicted']:.3f} "
                     f"| {r['energy_predicted']:.3f} |")
    c = result["chance"]
    lines.append(f"| *mask area (chance)* | {c['grown_share']:.3f} | {c['area_share']:.3f} "
                 f"| {c['grown_share']:.3f} | {c['area_share']:.3f} |")
    if "grown_share_of_head" in c:
        lines.append(f"| *mask area within the head (chance)* | {c['grown_share_of_head']:.3f} | | "
                     f"{c['grown_share_of_head']:.3f} | |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI
def write_card_default(weights_dir: Path, result: dict, settings: dict) -> None:
    """Record the best method in the card; only the ``saliency`` key is rewritten."""
    card_file = weights_dir / "card.json"
    card = json.loads(card_file.read_text())
    best = next(r for r in result["rows"] if r["method"] == result["best"])
    card["saliency"] = {"default_method": result["best"], "beats_floors": result["best_beats_floors"], "measured": {
        "pointing_game": round(best["pointing_glioma"], 4),
        "energy_in_mask": round(best["energy_glioma"], 4),
        "n_slices": best["n"], "target": "glioma", "dilate_px": settings["dilate_px"],
        "source": settings["source"], "split": "test", "chosen_on": result.get("chosen_on", {}).get("split", "test"),
        "file": "saliency_eval.json",
        "command": settings["command"], "date": settings["date"]}}
    from .evaluation import write_json
    write_json(card_file, card)   # atomic: a stopped run must not leave a truncated card


def cmd_saliency_check(args) -> int:
    import datetime
    import torch
    from .inference import Predictor
    torch.set_num_threads(args.threads)  # a background check, not a race with training
    probe = (args.limit not in (DEFAULT_LIMIT, 0) or args.dilate != DEFAULT_DILATE_PX or args.seed != 0
             or args.source != "lgg")   # another seed moves the random floor, and can flip beats_floors
    if probe and not args.json:   # --limit 5 replaced the shipped measurement and the app's default map
        print(f"error: a run of other settings than the default ({DEFAULT_LIMIT} slices, {DEFAULT_DILATE_PX} px, "
              "seed 0, source lgg) "
              "is a probe: give --json OUT (it never replaces WEIGHTS/saliency_eval.json or the card's default)",
              file=sys.stderr)
        return 2
    args.no_card = args.no_card or probe
    predictor = Predictor(args.weights)
    if lesion_class(predictor.classes) is None:
        raise ValueError(f"{predictor.dir} has no glioma or tumour class ({', '.join(predictor.classes)}): "
                         "its maps cannot be checked against glioma masks")
    all_pairs = masked_slices(predictor.dir, args.source, args.data_config)
    pairs = spread(all_pairs, args.limit)
    if not pairs:
        raise ValueError(f"no {args.source} test slice with a mask file for {predictor.dir}")
    result = check(predictor, pairs, args.dilate, args.seed)
    # the method is chosen on validation slices and reported on test ones: the best of six picked
    # on the test slices flatters its own figure (LayerCAM once won there by one slice)
    val_pairs = spread(masked_slices(predictor.dir, args.source, args.data_config, "val"), args.limit)
    try:
        chosen = check(predictor, val_pairs, args.dilate, args.seed) if val_pairs else None
    except ValueError:   # every validation mask empty in the model's frame: the test measurement stands
        chosen = None
    if chosen:
        result.update(best=chosen["best"], best_beats_floors=beats_floors(result["rows"], chosen["best"]),
                      chosen_on={"split": "val", "slices": len(chosen["slices"]), "rows": chosen["rows"]})
    else:
        result["chosen_on"] = {"split": "test", "slices": len(result["slices"]),
                               "why": "no validation slice with a mask: chosen on the test slices it is reported on"}
    settings = {"weights": str(args.weights), "model": predictor.name, "source": args.source,
                "split": "test", "slices_with_mask": len(all_pairs), "slices_used": len(pairs),
                "limit": args.limit, "selection": "evenly spaced over the sorted test list",
                "dilate_px": args.dilate, "input_size": predictor.spec["size"], "seed": args.seed,
                "threads": args.threads, "date": datetime.date.today().isoformat(),
                "command": (f"python -m core saliency-check --weights {args.weights} "
                            f"--limit {args.limit} --dilate {args.dilate} --seed {args.seed}")}
    out = Path(args.json) if args.json else predictor.dir / "saliency_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from .evaluation import write_json
    write_json(out, {"settings": settings, **result})
    if not args.no_card:
        write_card_default(predictor.dir, result, settings)
    print(to_markdown(result))
    print(f"{len(result['slices'])} slices ({len(all_pairs)} with a mask in the test split), "
          f"peak counted inside when within {args.dilate} px of the mask at "
          f"{predictor.spec['size']} px; predicted glioma on {result['predicted_glioma']}; "
          f"best: {result['best']} (chosen on {result['chosen_on']['slices']} {result['chosen_on']['split']} "
          f"slices); {result['seconds']} s; written to {out}")
    if not result["best_beats_floors"]:
        print(f"note: no method beats every floor; {result['best']} is the best of them "
              "(the card says so: beats_floors false)")
    return 0


def add_cli(sub) -> None:
    from .cli import integer_at_least
    c = sub.add_parser("saliency-check", help="pointing game and mask energy of each CAM method "
                                              "on the LGG test slices with tumour masks")
    c.add_argument("--weights", required=True, help="model directory with card.json and split.json")
    c.add_argument("--limit", type=integer_at_least(0), default=DEFAULT_LIMIT,
                   help=f"at most this many slices, evenly spread (default {DEFAULT_LIMIT}; 0 = all)")
    c.add_argument("--json", help="where to write the results (default WEIGHTS/saliency_eval.json)")
    c.add_argument("--dilate", type=integer_at_least(0), default=DEFAULT_DILATE_PX,
                   help="pointing-game tolerance: pixels the mask is grown by at the input size")
    c.add_argument("--source", default="lgg", help="the source whose masks to use")
    c.add_argument("--data-config", default="experiments/default.toml",
                   help="TOML whose [[data]] entries name the source roots (besides the card's)")
    c.add_argument("--threads", type=integer_at_least(1), default=1, help="CPU threads for torch")
    c.add_argument("--seed", type=int, default=0, help="seed of the random-map floor")
    c.add_argument("--no-card", action="store_true",
                   help="do not record the best method as the card's saliency default")
    c.set_defaults(fn=cmd_saliency_check)
