"""The training run behind train.py: data, split, the epochs, calibration, the operating point,
the evaluation and the card written into --out. train.py parses and checks the command line."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import data as D
from . import distributed as DD
from . import engine as E
from .evaluation import (SEEN_FILE, card_metrics, copies_trained_on, copy_marked, evaluate_records, mark_records,
                         prediction_records, seen_files, write_json, write_seen_files)
from .inference import MIRROR_ALWAYS, file_sha256, tta_rows, weights_mismatch
from .labels import (FINE_TUMOURS, NO_TUMOUR, TUMOUR, has_tumour_decision, is_tumour_label, label_targets, model_classes,
                     normalise_label, tumour_classes)
from .metrics import apart, other_calls, tumour_probability
from .models import count_parameters, create_model, has_class_maps
from .preprocess import DEFAULT_SPEC
from .referral import ReferralRule, pick_referral


WARMUP = 0.15  # share of the OneCycle schedule spent raising the learning rate


class DataError(ValueError):
    """The data or the run directory cannot be used as given: reported in one sentence."""


LESION_NEEDS_MASKS = "--lesion-dim-p needs --mask-loss: the lesions it dims are the masks that loss reads"


# Options of the run itself (not the augmentation's) added since runs began recording theirs.
ADDED_LATER = {"keep": "best", "drop_copies_sha256": []}


def with_added_options(recorded: dict) -> dict:
    """A run's recorded options, with those added to train.py since at their defaults: a run that
    does not record one trained without it."""
    return {**E.ADDED_LATER, **ADDED_LATER, **recorded}


def split_file_problem(path: Path) -> str | None:
    """Why a recorded split cannot be used (damaged, or no split.json of train.py), before the images are read."""
    from .ood import read_split_file
    try:
        read_split_file(path)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def _gamma_words(gamma_log: float) -> str:
    """'gamma', or its widened range, for the card's augmentation summary."""
    if gamma_log == E.AUG_OPTION_DEFAULTS["gamma_log"]:
        return "gamma"
    return f"gamma ({math.exp(-gamma_log):.2f}-{math.exp(gamma_log):.2f})"


def aug_options(args: argparse.Namespace) -> dict:
    """The augmentation's widening settings (`core.engine.augment`), as the card records them."""
    return {k: getattr(args, k) for k in E.AUG_OPTION_DEFAULTS}


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)


def load_samples(sources: list[dict], args) -> tuple[list[D.Sample], list]:
    samples, skipped = [], []
    for src in sources:
        try:
            scan = D.discover(D.resolve_root(src["path"]), src["name"])
        except ValueError as e:  # no images in it
            raise DataError(str(e)) from None
        if nested := D.nested_classes_note(scan):   # a model of 'train_imgs' vs 'test_imgs' is no model
            raise DataError(f"source {src['name']}: {nested}")
        for note in filter(None, (D.one_folder_note(scan), D.typed_inside_coarse_note(scan))):
            print(f"note: {src['name']}: {note}", flush=True)
        found = scan.samples
        renames = src.get("label_map") or {}  # the config's own folder -> class names
        if unknown := sorted(set(renames) - {s.original for s in found}):
            raise DataError(f"source {src['name']}: its label_map names {', '.join(map(repr, unknown))}, which "
                            f"no folder of it is called (its folders: "
                            f"{', '.join(sorted(map(repr, {s.original for s in found})))})")
        if args.limit:
            rng = random.Random(args.seed)
            found = rng.sample(found, min(args.limit, len(found)))
        for s in found:
            if s.original in renames:
                s.label = normalise_label(renames[s.original])
        if args.binary:
            for s in found:
                s.label = TUMOUR if s.label in FINE_TUMOURS else s.label
        if note := D.untyped_tumour_note(found):
            print(f"note: {src['name']}: {note}", flush=True)
        args.labels_found = getattr(args, "labels_found", set()) | {s.label for s in found}
        # One decode each (~5 ms): an unreadable file is reported and skipped, not fatal later.
        scan = D.drop_unreadable(D.Scan(found, scan.skipped))
        found = scan.samples
        if not found:   # every file unreadable: np.stack of nothing was a traceback; a source adding
            # nothing trained on silently with 'weight 1.0' in its card (a review)
            why = scan.skipped[0][1] if scan.skipped else "none found"
            raise DataError(f"source {src['name']} ({src['path']}): no readable image; {len(scan.skipped)} "
                            f"file(s) skipped (e.g. {scan.skipped[0][0] if scan.skipped else '-'}: {why})")
        samples += found
        skipped += [(src["name"], rel, why) for rel, why in scan.skipped]
        src["label_map"] = sorted({(s.original, s.label) for s in found})
    return samples, skipped


def sampling_weights(samples: list[D.Sample], sources: list[dict]) -> torch.Tensor:
    """Per-image draw weight: a source's weight times its natural share, classes balanced within it."""
    w_src = {s["name"]: s["weight"] for s in sources}
    counts: dict = {}
    for s in samples:
        counts[(s.source, s.label)] = counts.get((s.source, s.label), 0) + 1
    n_src = {k: sum(v for (src, _), v in counts.items() if src == k) for k in w_src}
    n_cls = {k: sum(1 for (src, _) in counts if src == k) for k in w_src}
    w = [w_src[s.source] * n_src[s.source] / (n_cls[s.source] * counts[(s.source, s.label)])
         for s in samples]
    return torch.tensor(w, dtype=torch.double)


def assign_splits(samples: list[D.Sample], args: argparse.Namespace, resumed: Path | None) -> tuple[str, str | None]:
    """Give every sample its split: the one recorded by the run continued (``resumed``), by
    --split-from or by --init, else near-duplicate groups split anew. Returns (the split's method
    for the card, the run whose recorded split is reused)."""
    split_from = resumed or args.split_from or args.init
    origin = None  # the run whose recorded split this one reuses
    method = (f"phash near-duplicate groups (<= {args.max_distance} of 64 bits), mirrored or half-turned "
              f"copies (a flip's phash, then head thumbnails correlating >= {D.TWIN_CORRELATION}), the aligned copies "
              f"{D.KNOWN_COPIES_FILE.name} lists (by content) and TCGA patient ids, across sources; StratifiedGroupKFold by source/label, files in (source, path) order, "
              f"the test and validation folds drawn from seed {args.seed}")
    if split_from:
        split_file = Path(split_from) / "split.json"
        if (why := split_file_problem(split_file)):   # a resumed run's own, cut short by a full disk
            raise DataError(why)
        record = json.loads(split_file.read_text())
        for note in D.apply_split_record(samples, record["files"]):
            print(f"note: {note}", flush=True)
        if not any(s.split for s in samples):
            raise DataError(f"no file of --data is in the split recorded in {split_from} (its sources: "
                            f"{', '.join(sorted(record['files']))}): give the sources the record's names")
        method = record["method"] if resumed else f"the split recorded in {split_from} ({record['method']})"
        if args.join_copies:   # a config's lists on a recorded split: nothing to regroup, and said so
            print(f"note: --join-copies: the split is the one recorded in {split_from}; its groups are "
                  "not drawn again, so the lists change nothing (--drop-copies leaves copies out)", flush=True)
        origin = record.get("from") if resumed else str(split_from)
    else:
        # Group and split before dropping anything, so that the split depends only on the files
        # and the seed, not on the input size or filters: runs with other settings share test sets.
        try:
            D.assign_groups(samples, args.max_distance, lists=args.join_copies or ())
        except ValueError as e:   # a known-copies list damaged since it was checked (the shipped one too)
            raise DataError(str(e)) from None
        D.split_by_group(samples, seed=args.seed)
        if (shipped := D.preset_split_text(samples)):
            method += f"; {shipped}"
            print(f"note: {shipped}", flush=True)
        if args.join_copies:
            method = method.replace(" and TCGA patient ids", f", the copies {', '.join(Path(f).name for f in args.join_copies)} "
                                    "list(s) and TCGA patient ids")
    return method, origin


def restore_run(resume: dict, out: Path, args: argparse.Namespace, model: torch.nn.Module,
                opt: torch.optim.Optimizer, sched, ema, scaler, steps: int, steps_per_epoch: int, world: int,
                device: torch.device) -> Loop:
    """Put a checkpointed run back where it stopped: weights, optimiser, schedule, EMA, loss scale
    and random state; returns where its epochs go on from (with the shipped weights' average record
    when best.pt was rebuilt from them). What the card says of the continuation is set on ``args``."""
    try:
        model.load_state_dict(resume["model"]); opt.load_state_dict(resume["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # before anything in the run is rewritten
        raise DataError(f"the checkpoint in {out} does not match this run (another --arch or other "
                         f"classes?): {str(e).splitlines()[0]}") from None
    if ema is not None and resume.get("ema"):
        ema.load_state_dict(resume["ema"])
    if resume["scheduler"].get("total_steps") == steps + 1:
        sched.load_state_dict(resume["scheduler"])
    else:  # resumed with another --epochs: follow the new schedule from the step reached
        remaining = max(0, args.epochs - resume["epoch"] - 1) * steps_per_epoch
        if not schedule_fits(resume["scheduler"]["last_epoch"], remaining, steps):
            raise DataError(f"--resume: the run has taken {resume['scheduler']['last_epoch']} steps, and "
                            f"{remaining} more do not fit in this schedule's {steps} ({args.epochs} epochs of "
                            f"{steps_per_epoch} steps on {world} process(es)): give more --epochs")
        sched.last_epoch = resume["scheduler"]["last_epoch"]
    history, shipped_average = resume["history"], None
    saved = resume.get("args") or {}
    # a spliced schedule is not one run's: the card says so (the rate jumps to the new cycle)
    args.schedule_splices = [*(saved.get("schedule_splices") or []),
                             *([{"epochs_before": saved.get("epochs"), "epochs_after": args.epochs,
                                 "at_epoch": resume["epoch"] + 1}] if saved.get("epochs") not in (None, args.epochs) else [])]
    args.resume_commands = [*(saved.get("resume_commands") or []), args.command]
    args.first_command = saved.get("first_command") or saved.get("command")  # the run's own command
    args.command_dir = saved.get("command_dir") or args.command_dir
    card = D.read_card(out) if (out / "card.json").exists() else {}
    old = card.get("training", {})
    finished = card.get("arch") == args.arch and old.get("epochs_run") == len(history)
    if finished and not (out / "best.pt").exists() and (out / "model.safetensors").exists():
        # A finished run removed best.pt; its best weights are the ones it shipped (which
        # may already be the average with the parent: then it is not averaged again).
        torch.save(E.shipped_state(model, out), out / "best.pt")
        done = old.get("weight_average") or {}
        shipped_average = done if done.get("shipped") == "average" else None
    start_epoch, best, bad = resume["epoch"] + 1, resume["best"], resume["bad"]
    if scaler is not None and resume.get("scaler"):  # fp16's loss scale, grown over the run
        scaler.load_state_dict(resume["scaler"])
    best_epoch = resume.get("best_epoch")
    if world > 1:
        # Only rank 0's random state is saved: restored on every rank, it made every rank draw the
        # same augmentations. Each rank gets its own stream, fixed by seed, rank and epoch.
        seed_everything(args.seed + torch.distributed.get_rank() + 7919 * start_epoch)
    else:
        torch.set_rng_state(resume["rng"])
        if resume.get("rng_cuda") is not None and device.type == "cuda":
            # augmentation draws on the device: without its generator a GPU resume diverges
            torch.cuda.set_rng_state(resume["rng_cuda"], device)
    return Loop(history=history, start_epoch=start_epoch, best=best, bad=bad, best_epoch=best_epoch,
                shipped_average=shipped_average)


def untaught_reason(samples: list[D.Sample], idx: dict[str, torch.Tensor], untaught: list[str]) -> str:
    """Why classes have no training image: the dataset's own split, a held-out source, or ours."""
    theirs = [i for i, s in enumerate(samples) if s.label in untaught]
    trained_on = set(idx["train"].tolist()) | set(idx["val"].tolist())
    if theirs and all(samples[i].preset_split for i in theirs):
        return ("its images are all in the dataset's own Testing/ or Validation/ folders: put some in "
                "Training/, or leave the class out")
    if theirs and not trained_on.intersection(theirs):
        return "its images are all in held-out sources (weight 0) or the test split: train on a source that has it"
    return ("none is left for training after the grouped split (too few images, or all in one "
            "near-duplicate group): add images or leave the class out")


def check_trainable(samples: list[D.Sample], idx: dict[str, torch.Tensor], classes: list[str], say,
                    trained: set[str] | None = None) -> str | None:
    """Refuse, in one sentence (DataError), data a classifier cannot be trained and validated on;
    warn of tumour types taught only through coarse labels; return (and warn of) the classes that
    have no validation or test image (`untested_classes_note`)."""
    if len(classes) < 2:
        held = f"one class only ({classes[0]})" if classes else "no image left (each unreadable, or dropped as a near-black slice)"
        raise DataError(f"the data holds {held}: a classifier needs at least two classes")
    train_labels = {samples[i].label for i in idx["train"].tolist()}
    taught = {classes[k] for lab in train_labels for k in label_targets(lab, classes)}
    if untaught := sorted(set(classes) - taught):
        raise DataError(f"no training image of {', '.join(untaught)}: {untaught_reason(samples, idx, untaught)}")
    if coarse_only := sorted(taught - train_labels - {TUMOUR}):
        say(f"warning: {', '.join(coarse_only)} learnt only through coarse labels in training: "
            "the model cannot tell these types apart", flush=True)
    if len(idx["train"]) < 2 or len(idx["val"]) == 0 or len(idx["test"]) == 0:
        # no test image: the whole run trained, then its evaluation failed with a traceback
        raise DataError(f"too few images to train, validate and test: {len(idx['train'])} in training, "
                         f"{len(idx['val'])} in validation, {len(idx['test'])} in test (a split groups near "
                         "duplicates; add images, or with --split-from give the data its recorded test files)")
    if (note := untested_classes_note(samples, idx, classes, trained)):
        say(f"warning: {note}", flush=True)
    return note


def untested_classes_note(samples: list[D.Sample], idx: dict[str, torch.Tensor], classes: list[str],
                          trained: set[str] | None = None) -> str | None:
    """The classes with no image in validation or test, in one sentence with why and what it costs;
    None when every class has both. A source's class of 1-2 near-duplicate groups all goes to
    training (`split_by_group` splits each source and class apart), a source shipping its own
    Testing/ folder takes no other test share, and a held-out source (``trained``: the sources
    with weight) is never validated on: such a class trained silently, then had no test figure
    and dropped out of the macro F1 unannounced."""
    def exactly(s: D.Sample) -> str | None:   # the one class a label names (a coarse 'tumor' names none of several)
        try:
            t = label_targets(s.label, classes)
        except ValueError:
            return None
        return classes[t[0]] if len(t) == 1 else None
    named = [exactly(s) for s in samples]
    in_split = {k: {named[i] for i in idx[k].tolist()} for k in ("val", "test")}
    shipped = {s.source for s in samples if s.preset_split == "test"}
    parts = []
    for c in classes:
        lacks = [k for k in ("val", "test") if c not in in_split[k]]
        if not lacks:
            continue
        mine = [s for s, n in zip(samples, named) if n == c]
        used = sum(named[i] == c for k in ("train", "val", "test") for i in idx[k].tolist())
        why = []
        for src in sorted({s.source for s in mine}):
            groups = {s.group for s in mine if s.source == src and s.group and not s.preset_split}
            held_out = trained is not None and src not in trained
            if "val" in lacks and held_out:
                why.append(f"{src} is held out, never validated on")
            if "test" in lacks and src in shipped:
                why.append(f"the own Testing/ folder of {src} holds none")
            if 0 < len(groups) < 3 and not held_out and (src not in shipped or "val" in lacks):
                why.append(f"{src} has {len(groups)} near-duplicate group{'s' * (len(groups) != 1)} of it, "
                           "and a source's class needs 3 to be split")
        cost = [*(["no test figure (the macro F1 averages the classes tested)"] if "test" in lacks else []),
                *(["the operating point and calibration never saw it"] if "val" in lacks else [])]
        splits = " or ".join({"val": "validation", "test": "test"}[k] for k in lacks)
        parts.append(f"{c}: {used} image{'s' * (used != 1)} in this run, none in {splits} "
                     f"({'; '.join(why) or 'the split gave it none'}); " + " and ".join(cost))
    return ". ".join(parts) + "." if parts else None


def check_copy_lists(samples: list[D.Sample], lists: list[str], say=print) -> None:
    """Before the images are cached: a --drop-copies list that names no image of the data is one
    for other data (another source name, another dataset): DataError, not a silent run on the
    copies. Pairs of files the data lacks are counted in a note."""
    present = {(s.source, s.rel) for s in samples}
    for f in lists:
        got = D.read_copy_pairs(f)
        named = sum(1 for a, b in got if a in present or b in present)
        if not named:
            raise DataError(f"--drop-copies {f}: none of its {len(got)} pairs names an image of --data "
                            "(a list made for other sources or names?)")
        if named < len(got):
            say(f"note: --drop-copies {Path(f).name}: {len(got) - named} of its {len(got)} pairs name no "
                "image of --data", flush=True)


def listed_copies_out(samples: list[D.Sample], lists: list[str], trained: set[str],
                      roles: dict) -> set[tuple[str, str]]:
    """(source, file) of the training images of trained sources that a --drop-copies list pairs with
    a validation or test image (`core.data.listed_training_copies`; ``roles``: the recorded split's,
    for partners the data holds no longer, e.g. test files left out of a GPU pack)."""
    pairs = [pair for f in lists for pair in D.read_copy_pairs(f)]
    return {(s.source, s.rel) for s in D.listed_training_copies(samples, pairs, roles) if s.source in trained}


def open_out_dir(out: Path, resumed: bool, split: dict, say) -> None:
    """Make --out ready for this run: a fresh run moves the previous run's files aside; the split
    is recorded. Called only once the data is read and checked: a wrong --data moved the previous
    model aside and then failed, leaving --out without one (a folder made for nothing, too)."""
    out.mkdir(parents=True, exist_ok=True)
    if not resumed:   # with any temporary file a killed write left (`core.data.save_whole`'s names, older ones too)
        moved, where = move_aside(out, [*RUN_FILES, *sorted(p.name for p in out.glob("*.tmp*"))])
        if moved:
            say(f"moved the previous run's {len(moved)} files ({', '.join(moved[:4])}"
                f"{', ...' if len(moved) > 4 else ''}) aside to {where}/ (a fresh run; --resume continues one)",
                flush=True)
    (out / "split.json").write_text(json.dumps(split))


def leave_out(samples: list[D.Sample], images: torch.Tensor, args: argparse.Namespace, sources: list[dict],
              out: Path, resume: dict | None, say) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Which samples the run uses (a boolean mask) and the near-black slices it drops: files a
    recorded split does not name, --drop-copies' copies of validation or test images and slices
    whose head covers less than --min-head are left out (counted on ``args`` for the card)."""
    head = (images > 25).float().mean(dim=(1, 2, 3))
    # Files a recorded split (--split-from) does not name are not this run's data: left out of
    # training, the split record and the data fingerprint alike.
    split_dir = out if resume else (args.split_from or args.init)
    record = json.loads((Path(split_dir) / "split.json").read_text()) if split_dir else {}
    # A resumed run's copies are its split.json's: its lists are not read again (moved or edited since).
    copies_out = set() if resume else listed_copies_out(
        samples, args.drop_copies or [], {s["name"] for s in sources if s["weight"] > 0},
        D.split_roles(record.get("files") or {}))
    # The copies the recorded split's run left out (this run's own, resumed; or --split-from/--init's)
    # stay out, and are named so rather than as files the record does not hold.
    present = {(s.source, s.rel) for s in samples}
    copies_out |= present & {tuple(x) for x in record.get("dropped_copies") or []}
    listed = torch.tensor([(s.source, s.rel) in copies_out for s in samples], dtype=torch.bool)
    unsplit = torch.tensor([not s.split for s in samples], dtype=torch.bool) & ~listed
    args.left_out_record = int(unsplit.sum())   # the card says so: a reused split's own drops are among them
    if args.left_out_record:
        say(f"{args.left_out_record} files are not in the recorded split: left out", flush=True)
    if copies_out:
        say(f"{len(copies_out)} training images are copies of validation or test images (--drop-copies): "
            "left out of training", flush=True)
    keep = (head >= args.min_head) & ~unsplit & ~listed
    dropped = [(s.source, s.rel) for s, k, u, c in zip(samples, keep, unsplit, listed) if not (k or u or c)]
    args.dropped_copies = sorted(copies_out)
    return keep, dropped


@dataclasses.dataclass
class Place:
    """Where this process trains and writes: its rank of ``world`` (1 without torchrun), device,
    precision, the run's folder (--out) and ``say`` (print on rank 0, quiet on the others)."""
    rank: int
    world: int
    device: torch.device
    precision: str
    out: Path
    say: Callable[..., None]


@dataclasses.dataclass
class RunData:
    """The images a run uses, their sources and preprocessing, its split, and what it read but left out."""
    sources: list[dict]           # --data's roots, each with its weight and label map
    spec: dict                    # the preprocessing (size, crop, normalisation)
    all_samples: list[D.Sample]   # every image read, the left-out ones too (the teacher indexes them)
    keep: torch.Tensor            # which of those the run uses
    samples: list[D.Sample]
    images: torch.Tensor
    masks: torch.Tensor
    idx: dict[str, torch.Tensor]  # rows of `samples` in "train", "val" and "test"
    classes: list[str]
    lesions: tuple | None         # the tumour masks the mask loss reads (--mask-loss)
    skipped: list                 # unreadable files and empty folders
    dropped: list                 # near-black slices left out (--min-head)
    split_method: dict            # how the split was drawn: {"method", "from"}
    resume: dict | None           # the checkpoint this run continues (--resume)


@dataclasses.dataclass
class Fit:
    """The model and what steps it."""
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.OneCycleLR
    scaler: torch.amp.GradScaler | None   # fp16 only
    ema: E.ModelEma | None
    steps: int
    steps_per_epoch: int


@dataclasses.dataclass
class Loop:
    """What one epoch hands the next (a checkpoint restores all but the training time, which is
    summed again from the history)."""
    history: list[dict] = dataclasses.field(default_factory=list)
    start_epoch: int = 0
    best: float = float("inf")          # lowest validation loss so far
    bad: int = 0                        # validated epochs without improvement
    best_epoch: int | None = None       # the epoch whose weights are in best.pt (1-based), set when saved
    shipped_average: dict | None = None  # set when best.pt is rebuilt from weights that are already an average
    train_time: float = 0.0


def run(args: argparse.Namespace) -> int:
    if args.mask_loss > 0 and not has_class_maps(create_model(args.arch, 2)):
        # before any process group or data work: a refusal costs nothing and writes nothing
        print(f"train.py: error: --mask-loss needs a model whose head is pooling + one linear layer "
              f"(resnet18, resnet18_half, resnet50, efficientnet_b0), not {args.arch}", file=sys.stderr)
        return 2
    t_start = time.time()
    at = start(args)
    out = at.out
    sources = D.parse_sources(args.data)
    for src in sources:  # recorded so that later commands find the data from any folder
        src["path"] = D.portable_root(src["path"])
    data = read_data(args, sources, {**DEFAULT_SPEC, "size": args.img, "crop": args.crop}, at)
    teacher, teacher_net = None, None   # the teacher's answers (E.Distill) and, online, its network
    if args.teacher and not args.finish_from:
        teacher, teacher_net = distillation(args, data.all_samples, data.keep, data.idx["train"], data.classes,
                                            D.split_record(data.samples), data.spec, at.device, at.precision,
                                            at.say, saved=((data.resume or {}).get("args") or {}).get("distill_record"))
    fit = make_fit(args, data, at)
    loop = Loop()
    if data.resume:
        loop = restore_run(data.resume, out, args, fit.model, fit.opt, fit.sched, fit.ema, fit.scaler, fit.steps,
                           fit.steps_per_epoch, at.world, at.device)
        # "from epoch 3" read as epoch 3 run again: say how many are done
        at.say(f"resumed after epoch {loop.start_epoch} of {args.epochs}"
               + (" (every epoch done: finishing the run)" if loop.start_epoch >= args.epochs else ""), flush=True)
    split_files = D.split_record(data.samples)
    if at.rank == 0:
        open_out_dir(out, args.resume, {**data.split_method, "dropped_small_head": data.dropped,
                                        **({"dropped_copies": args.dropped_copies} if args.dropped_copies else {}),
                                        "files": split_files}, at.say)
        DD.barrier(at.world)
    if args.finish_from:
        loop.history, loop.train_time = adopt_trained(fit.model, Path(args.finish_from), args, data.classes,
                                                      sources, split_files)
        write_json(out / "history.json", loop.history)
        if args.average_init or args.average_init_always:   # checked in parse_args: its parent, not averaged yet
            args.average_record = average_with_init(fit.model, args.init, data.images[data.idx["val"]],
                                                    data.masks[data.idx["val"]], data.spec, at.device, at.precision,
                                                    always=args.average_init_always)
        finish_run(fit.model, args, data, at, loop, t_start)
        return 0
    train_epochs(args, fit, data, at, loop, teacher, teacher_net)
    DD.debug_dump(fit.model, at.rank, at.world)
    if at.rank == 0:
        ship_best(fit.model, args, data, at, loop)
        finish_run(fit.model, args, data, at, loop, t_start)
    DD.cleanup(at.world)
    return 0


def start(args: argparse.Namespace) -> Place:
    """The process group under torchrun (WORLD_SIZE > 1; otherwise rank 0 of 1), the seed, the
    threads and the device."""
    rank, world, ddp_device = DD.setup(args.device)
    args.world_size = world
    # Model init may differ by rank (DDP copies rank 0's weights); augmentation should differ.
    seed_everything(args.seed + rank)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ddp_device or pick_device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":  # one input size for the whole run: let cuDNN time and keep its fastest kernels
        torch.backends.cudnn.benchmark = True
    return Place(rank, world, device, precision, Path(args.out), print if rank == 0 else DD.quiet)


def read_data(args: argparse.Namespace, sources: list[dict], spec: dict, at: Place) -> RunData:
    """The sources' images read, cached and split, those the run leaves out removed, the
    checkpoint of a resumed run loaded (its split and loss are the run's)."""
    say, out = at.say, at.out
    if at.rank > 0:
        DD.barrier(at.world)  # rank 0 fills the image and hash caches and writes split.json first
    samples, skipped = load_samples(sources, args)
    say(f"{len(samples)} images from {len(sources)} source(s); {len(skipped)} skipped", flush=True)   # files or empty folders
    if not args.resume and not args.limit:   # a resume's copies are its split.json's; --limit reads a subset
        check_copy_lists(samples, args.drop_copies or [], say)
    for src, rel, why in skipped[:20]:
        say(f"  skipped {src}/{rel}: {why}")
    if len(skipped) > 20:
        say(f"  ... and {len(skipped) - 20} more")
    images = E.cache_images(samples, spec, workers=args.workers)
    ckpt_path = out / "checkpoint.pt"
    resume = E.load_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
    if resume and not args.mask_loss:  # a resumed run keeps the loss it was started with
        args.mask_loss = (resume.get("args") or {}).get("mask_loss", 0.0)
    if args.lesion_dim_p and not args.mask_loss:  # (resumed: checked once the run's own loss is known)
        raise DataError(LESION_NEEDS_MASKS)
    # The recorded split is the reference: recomputing it elsewhere can differ (another Pillow
    # moves a few hashes, which reshuffles the group folds). A continued run keeps its parent's.
    method, origin = assign_splits(samples, args, out if resume else None)
    keep, dropped = leave_out(samples, images, args, sources, out, resume, say)
    all_samples, samples = samples, [s for s, k in zip(samples, keep) if k]
    images = images[keep]
    classes = model_classes({s.label for s in samples})
    if gone := sorted(getattr(args, "labels_found", set()) - {s.label for s in samples}):
        say(f"warning: no image of {', '.join(gone)} is left (every one unreadable, or dropped as a "
            f"near-black slice): the model has no such class", flush=True)
    # A source with weight 0 is held out: never trained or validated on, but its test split is
    # evaluated, so that runs on different source mixes are measured on the same test images.
    trained = {s["name"] for s in sources if s["weight"] > 0}
    idx = {k: torch.tensor([i for i, s in enumerate(samples) if s.split == k
                            and (k == "test" or s.source in trained)], dtype=torch.long)
           for k in ("train", "val", "test")}
    say("split sizes:", {k: len(v) for k, v in idx.items()}, "classes:", classes, flush=True)
    args.untested_classes = check_trainable(samples, idx, classes, say, trained)
    masks = E.target_masks(samples, classes)
    lesions = mask_lesions(args, samples, spec, idx, say)
    return RunData(sources=sources, spec=spec, all_samples=all_samples, keep=keep, samples=samples, images=images,
                   masks=masks, idx=idx, classes=classes, lesions=lesions, skipped=skipped, dropped=dropped,
                   split_method={"method": method, "from": origin}, resume=resume)


def mask_lesions(args: argparse.Namespace, samples: list[D.Sample], spec: dict, idx: dict[str, torch.Tensor],
                 say) -> tuple | None:
    """The tumour masks the mask loss reads, prepared like the images (in worker processes);
    None without --mask-loss."""
    if args.mask_loss <= 0:
        return None
    lesions = E.cache_lesions(samples, spec, workers=args.workers)
    n_masked = int(lesions[1][idx["train"]].sum())
    args.mask_record = {"weight": args.mask_loss, "loss": "pointing (class map vs tumour mask)",
                        "train_images_with_mask": n_masked}
    say(f"mask loss {args.mask_loss}: {n_masked} training images have a tumour mask"
        + ("" if n_masked else " (none: the loss does nothing; masks are read from <root>/masks/)"), flush=True)
    return lesions


def make_fit(args: argparse.Namespace, data: RunData, at: Place) -> Fit:
    """The model (from --init's weights when given), AdamW and its one-cycle schedule, the fp16
    loss scale and the EMA copy."""
    model = create_model(args.arch, len(data.classes)).to(at.device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)
    # --batch-size is per process: with N ranks an epoch has 1/N of the steps, N x the batch.
    steps_per_epoch = max(1, len(data.idx["train"]) // (args.batch_size * at.world))
    steps = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps + 1, pct_start=WARMUP)
    scaler = torch.amp.GradScaler("cuda") if at.precision == "fp16" else None
    args.init_record = None
    if args.init:  # before the EMA copies the weights; a resumed checkpoint then overrides them
        try:
            args.init_record = E.init_weights(model, args.init, args.arch, data.classes, D.split_record(data.samples))
        except Exception as e:  # a corrupt or foreign parent: one sentence, and nothing written
            raise DataError(f"cannot continue from {args.init}: {e}") from None
        at.say(f"initialised from {args.init}", flush=True)
    ema = E.ModelEma(model, args.ema) if args.ema > 0 else None
    return Fit(model, opt, sched, scaler, ema, steps, steps_per_epoch)


def train_epochs(args: argparse.Namespace, fit: Fit, data: RunData, at: Place, loop: Loop,
                 teacher: E.Distill | None, teacher_net: torch.nn.Module | None) -> None:
    """The epochs from ``loop.start_epoch``: train, validate on rank 0, keep the best weights in
    best.pt and checkpoint every epoch, until --epochs or --patience."""
    # The whole epochs before the learning rate peaks are neither kept as the best weights nor
    # counted by early stopping: a run continued from --init has its lowest validation loss in
    # epoch 1, before the new augmentation has taught it anything, and would stop there.
    warmup_epochs = int(WARMUP * args.epochs)
    draw_w = sampling_weights([data.samples[i] for i in data.idx["train"]], data.sources)
    net = DD.wrap(fit.model, at.device, at.world)  # DDP when world > 1; `fit.model` stays the plain module
    gen = torch.Generator().manual_seed(args.seed)
    loop.train_time = sum(h["train"]["time_s"] for h in loop.history)
    for epoch in range(loop.start_epoch, args.epochs):
        # Before the epoch, not after it: a run resumed from the checkpoint of the epoch that
        # stopped it must stop too, not train on (one better epoch would reset the count).
        if DD.rank0_decides(loop.bad >= args.patience, at.world, at.device):
            at.say(f"early stop: no validation improvement for {loop.bad} epochs", flush=True)
            break
        gen.manual_seed(args.seed * 1000 + epoch)
        small = bool(args.small_img) and epoch < args.small_img_epochs
        if args.small_img and epoch == args.small_img_epochs:
            # Losses at another resolution are not comparable: early stopping starts afresh, and a
            # low-resolution best is not one to ship (no full-size epoch improving must still fail)
            loop.best, loop.bad = float("inf"), 0
            if at.rank == 0:
                (at.out / "best.pt").unlink(missing_ok=True)
                loop.shipped_average, loop.best_epoch = None, None
        order = data.idx["train"][torch.multinomial(draw_w, fit.steps_per_epoch * args.batch_size * at.world,
                                                    replacement=True, generator=gen)]
        order = DD.shard(order, at.rank, at.world)  # same draw on every rank; each trains its share
        teach = teacher  # online only at full size: the teacher reads the low-resolution batches poorly
        if teacher is not None and args.distill_online and not small:
            teach = teacher._replace(source=teacher_net)
        tr = E.train_one_epoch(net, data.images, data.masks, order, fit.opt, fit.sched, data.spec, at.device,
                               args.batch_size, at.precision, args.smoothing, args.aug,
                               args.skull_strip_p, fit.scaler, progress=not args.no_progress and at.rank == 0,
                               out_size=args.small_img if small else None, ema=fit.ema, lesions=data.lesions,
                               mask_weight=args.mask_loss, aug_options=aug_options(args), teacher=teach)
        tr = DD.reduce_epoch_stats(tr, len(order), at.world, at.device)
        if at.rank == 0:  # validation, logs and checkpoints on rank 0 only, with the plain module
            end_epoch(args, fit, data, at, loop, epoch, tr, small, warmup_epochs)


def end_epoch(args: argparse.Namespace, fit: Fit, data: RunData, at: Place, loop: Loop, epoch: int, tr: dict,
              small: bool, warmup_epochs: int) -> None:
    """Validate the epoch's weights (the EMA's when kept), log it, keep them in best.pt when best,
    and write the history, the run's record and the checkpoint."""
    judged = fit.ema.module if fit.ema is not None else fit.model
    t_val = time.time()
    va = E.evaluate_split(judged, data.images[data.idx["val"]], data.masks[data.idx["val"]], data.spec,
                          at.device, at.precision, out_size=args.small_img if small else None)
    va["time_s"] = round(time.time() - t_val, 2)
    loop.train_time += tr["time_s"]
    loop.history.append({"epoch": epoch + 1, "train": tr, "val": va, "lr": fit.opt.param_groups[0]["lr"]})
    print(f"epoch {epoch + 1}/{args.epochs} loss {tr['loss']:.4f} acc {tr['acc']:.4f} "
          f"val_loss {va['loss']:.4f} val_acc {va['acc']:.4f} {tr['images_per_s']:.0f} img/s", flush=True)
    # the low-resolution warm-up of progressive resizing never stops a run
    is_best, loop.best, loop.bad = judge_epoch(epoch, va["loss"], loop.best, loop.bad, warmup_epochs,
                                               counts=not small)
    if args.keep == "last":  # every epoch replaces the last, and none stops the run early
        is_best, loop.bad = True, 0
    if is_best:  # written whole, then swapped in: a run killed here keeps its previous best
        D.save_whole(at.out / "best.pt", lambda tmp: torch.save(judged.state_dict(), tmp))
        loop.shipped_average, loop.best_epoch = None, epoch + 1
    write_json(at.out / "history.json", loop.history)
    write_json(at.out / TRAINED, trained_record(args, data.classes, data.sources, at.device, at.precision,
                                                loop.best_epoch, loop.train_time))
    E.save_checkpoint(at.out / "checkpoint.pt", model=fit.model.state_dict(), optimizer=fit.opt.state_dict(),
                      scheduler=fit.sched.state_dict(), epoch=epoch, history=loop.history, best=loop.best,
                      bad=loop.bad, best_epoch=loop.best_epoch, rng=torch.get_rng_state(),
                      rng_cuda=torch.cuda.get_rng_state(at.device) if at.device.type == "cuda" else None,
                      ema=fit.ema.state_dict() if fit.ema is not None else None,
                      scaler=fit.scaler.state_dict() if fit.scaler is not None else None,
                      args=vars(args) | {"config_values": None})


def ship_best(model: torch.nn.Module, args: argparse.Namespace, data: RunData, at: Place, loop: Loop) -> None:
    """Load best.pt into ``model``, averaged with --init's weights where asked and it helps."""
    if not (at.out / "best.pt").exists():
        raise DataError("no epoch after the warm-up improved the validation loss (was it NaN or "
                        "infinite? try a lower --lr): there are no best weights to ship")
    model.load_state_dict(torch.load(at.out / "best.pt", weights_only=True))
    args.best_epoch_record = loop.best_epoch
    args.average_record = loop.shipped_average or (
        average_with_init(model, args.init, data.images[data.idx["val"]], data.masks[data.idx["val"]],
                          data.spec, at.device, at.precision, always=args.average_init_always)
        if args.average_init or args.average_init_always else None)


def finish_run(model: torch.nn.Module, args: argparse.Namespace, data: RunData, at: Place, loop: Loop,
               t_start: float) -> None:
    """Calibrate, pick the operating point, evaluate and write the card (`finish`)."""
    finish(model, args, data.sources, data.samples, data.images, data.masks, data.idx, data.classes, data.spec,
           at.device, at.precision, loop.history, data.skipped, data.dropped, loop.train_time, time.time() - t_start)


PREVIOUS = "previous"  # a fresh run puts the files another run left into out/previous-<UTC time>/
# What train.py and the later commands on its folder write: only these are moved, whatever else
# the folder holds (--out . must not move a repository's own files).
RUN_FILES = ("checkpoint.pt", "best.pt", "model.safetensors", "card.json", "eval.json",
             "split.json", "history.json", "ood.safetensors", "ood_eval.json", "saliency_eval.json",
             "trained.json", "salvaged.safetensors", SEEN_FILE)   # and any *.tmp* a killed write left (open_out_dir)


def distillation(args, all_samples, keep, train_rows, classes, split, spec, device, precision, say,
                 saved: dict | None = None):
    """(`E.Distill` of the teacher's logits for the kept samples, the teacher itself) for
    `E.train_one_epoch`, the logits computed on the unfiltered list, whose cached images the
    teacher's own run already made. ``saved``: the record of the run a resume continues, whose teacher must be
    the same weights."""
    try:
        t_spec = D.read_card(args.teacher)["preprocessing"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cannot distil from {args.teacher}: no readable card.json there ({e})") from None
    if args.distill_online and {k: v for k, v in t_spec.items() if k != "size"} != \
            {k: v for k, v in spec.items() if k != "size"}:
        raise DataError(f"--distill-online: {args.teacher} prepares its input otherwise than this run "
                        "(grey handling, crop or normalisation), so it cannot read this run's batches; "
                        "leave --distill-online out")
    rows = keep.nonzero().flatten()[train_rows]
    try:
        logits, args.distill_record, net = E.teacher_logits(args.teacher, all_samples, rows, classes, split,
                                                            device, precision, args.workers)
    except (OSError, ValueError, KeyError) as e:  # a missing, foreign or leaking teacher: one sentence
        raise DataError(f"cannot distil from {args.teacher}: {e}") from None
    if saved and saved.get("teacher_sha256") != args.distill_record["teacher_sha256"]:
        raise DataError(f"--resume: the teacher in {args.teacher} is not the one this run started with "
                        "(its weights changed): resume with that teacher, or start the run afresh")
    args.distill_record |= {"weight": args.distill, "temperature": args.distill_t,
                            "online": ("the teacher reads each augmented batch at the full input size; fixed "
                                       "answers for the clean images in the low-resolution epochs")
                            if args.distill_online else None,
                            "loss": "(1 - weight) x label loss + weight x t^2 KL(teacher_t || student_t)"}
    r = args.distill_record
    say(f"teacher {args.teacher}: logits for {r['images']} training images in {r['time_s']} s "
        f"(its top class agrees with the label on {r['train_accuracy_of_teacher']:.1%})", flush=True)
    return E.Distill(logits[keep], args.distill, args.distill_t), net


def move_aside(out: Path, names: list[str]) -> tuple[list[str], Path | None]:
    """Move these files of ``out`` into a new ``out/previous-<UTC time>/``; returns the names
    moved and where to.

    Another run's files must never be resumed, shipped or served with this run's: an interrupted
    run left its new split beside the old weights and card, and a retrained model kept the old
    out-of-distribution gate, which then read the new network's features. Moved, never deleted
    or overwritten: a forgotten --resume must not cost the interrupted run, and a failed retry
    must not cost the finished model an earlier retry moved aside. (While a run retrains a folder
    in place, that folder serves no model.)"""
    names = [n for n in names if (out / n).is_file()]
    if not names:
        return [], None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    prev = out / f"{PREVIOUS}-{stamp}"
    k = 1
    while prev.exists():  # two moves within one second
        k += 1
        prev = out / f"{PREVIOUS}-{stamp}-{k}"
    prev.mkdir()
    for n in names:
        os.replace(out / n, prev / n)
    return names, prev


def retire_measurements(out: Path, old_sha: str | None, new_sha: str) -> list[str]:
    """Move aside what later commands measured on the folder's weights (the gate, the saliency
    check) when this run's weights (``new_sha``) differ from them: a gate reads the network's features."""
    if old_sha == new_sha:
        return []
    return move_aside(out, ["ood.safetensors", "ood_eval.json", "saliency_eval.json"])[0]


def schedule_fits(taken: int, remaining: int, steps: int) -> bool:
    """Whether a resumed run's steps (``taken`` before, ``remaining`` to come) fit in a OneCycle
    schedule of ``steps`` (+1 spare): more processes mean fewer steps an epoch, and a schedule
    resized by them could run out mid-run, in the scheduler, with a traceback."""
    return taken + remaining <= steps


def judge_epoch(epoch: int, loss: float, best: float, bad: int, warmup_epochs: int,
                counts: bool = True) -> tuple[bool, float, int]:
    """(keep this epoch's weights as the best?, best loss, epochs without improvement) after one
    validated epoch (0-based). Epochs of the learning-rate warm-up are neither (see WARMUP)."""
    if epoch < warmup_epochs:
        return False, best, bad
    if loss < best:
        return True, loss, 0
    return False, best, bad + int(counts)


# Options that must be the same as the run --finish-from adopts (what it was trained with).
TRAINED_WITH = ("arch", "img", "epochs", "batch_size", "lr", "wd", "smoothing", "ema", "small_img",
                "small_img_epochs", "mask_loss", "aug", "skull_strip_p", *E.AUG_OPTION_DEFAULTS, "seed", "patience",
                "limit", "min_head", "binary", "keep")
# What a run records of itself from its first epoch on, for --finish-from when it was stopped
# before its card (a time limit on a lent GPU); removed once the card is written.
TRAINED = "trained.json"


def trained_record(args, classes, sources, device, precision, best_epoch, train_time) -> dict:
    return {"arch": args.arch, "classes": classes, "options": {k: getattr(args, k) for k in TRAINED_WITH},
            "device": device_name(device), "precision": precision, "command": getattr(args, "command", None),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "sources": [{"name": s["name"], "path": s["path"], "weight": s["weight"]} for s in sources],
            "best_epoch": best_epoch, "train_time_s": round(train_time, 1),
            "init": getattr(args, "init_record", None), "weight_average": getattr(args, "average_record", None)}


def adopted_record(src: Path) -> tuple[dict, Path, str | None]:
    """(what the run says of itself, its weights file, their recorded SHA-256 or None): from its
    card when it finished, else from trained.json beside its shipped or salvaged weights."""
    if (src / "card.json").is_file():
        card = D.read_card(src)
        t = card["training"]
        record = {"arch": card.get("arch"), "classes": card.get("classes"), "options": t.get("options"),
                  "device": t.get("device"), "precision": t.get("precision"), "command": card.get("command"),
                  "date": card.get("date"), "sources": card.get("sources", []), "best_epoch": t.get("best_epoch"),
                  "train_time_s": t.get("train_time_s"), "init": t.get("init"),
                  "weight_average": t.get("weight_average"), "metrics_there": card.get("metrics"),
                  "preprocessing": card.get("preprocessing")}
        return record, src / "model.safetensors", card.get("weights_sha256")
    record = json.loads((src / TRAINED).read_text())
    for name in ("model.safetensors", "salvaged.safetensors"):  # stopped after its weights, or mid-run
        if (src / name).is_file():
            return record | {"salvaged": name}, src / name, None
    raise OSError(f"no model.safetensors or salvaged.safetensors in {src}")


def adopt_trained(model, src: Path, args, classes: list[str], sources: list[dict],
                  split_here: dict) -> tuple[list, float]:
    """Load the weights and history of a run trained elsewhere (--finish-from) into ``model``.

    The card written here describes that training and tests on this split: refused unless the
    run names this architecture, these classes, every one of these options, these sources and
    weights, and its training and validation images are this run's, in the same roles."""
    try:
        record, weights, sha = adopted_record(src)
        history = json.loads((src / "history.json").read_text())
        split_full = json.loads((src / "split.json").read_text())
        split_there = split_full["files"]
        dropped_there = {tuple(x) for x in split_full.get("dropped_copies") or []}
        if not (isinstance(record, dict) and isinstance(history, list) and isinstance(split_there, dict)):
            raise ValueError("its trained.json, history.json or split.json is not what train.py writes")
        options = record.get("options")
        there_mix = _source_mix(record.get("sources") or [])
        moved, missing, total = roles_moved(split_there, split_here)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"--finish-from {src}: not a run's folder ({e})") from None
    if isinstance(options, dict):
        options = with_added_options(options)
    if not isinstance(options, dict) or set(TRAINED_WITH) - set(options):
        raise DataError(f"--finish-from {src}: it does not record every option it was trained with "
                        "(a run of an older train.py); it cannot be finished here")
    differ = [k for k in TRAINED_WITH if options[k] != getattr(args, k)]
    if record.get("arch") != args.arch or record.get("classes") != classes or differ:
        raise DataError(f"--finish-from {src}: trained with other settings "
                        f"({', '.join(differ) or 'architecture or classes'}); give the options it was trained with")
    if there_mix != _source_mix(sources):
        raise DataError(f"--finish-from {src}: trained on other sources or source weights ({there_mix}); "
                        "give the same data entries")
    # The copies left out of training (--drop-copies) are part of what it trained on: a run finished
    # here without its lists was carded as if it had trained on them, and with lists it never had
    # as if it had not (its digest alone cannot tell: a run of an older train.py records none).
    if dropped_there != (dropped_here := {tuple(x) for x in getattr(args, "dropped_copies", None) or []}):
        raise DataError(f"--finish-from {src}: it left {len(dropped_there)} training copies out (its split.json's "
                        f"dropped_copies) and this run leaves {len(dropped_here)} out: give the --drop-copies "
                        "lists it was trained with")
    if moved or missing > max(5, 0.01 * total):  # a few may be dropped as near-empty on one side only
        raise DataError(f"--finish-from {src}: of its {total} training and validation images, {moved} have "
                        f"another role in this run's split and {missing} are not in it (give the data and "
                        "--split-from it was trained on)")
    got_sha = file_sha256(weights)  # read once: checked against the card, then recorded
    if sha is not None and (why := weights_mismatch({"weights_sha256": sha}, got_sha, src)):
        raise DataError(f"--finish-from {src}: {why}")
    try:
        model.load_state_dict(E.state_from_file(model, weights))
    except Exception as e:  # a cut or foreign file: safetensors' and torch's own errors
        raise DataError(f"--finish-from {src}: cannot load {weights.name} ({str(e).splitlines()[0]})") from None
    args.best_epoch_record = record.get("best_epoch")
    args.init_record, args.average_record = record.get("init"), record.get("weight_average")
    args.elsewhere_record = {"from": str(src), "weights_sha256": got_sha,
                             "data": [s.get("path") for s in record.get("sources", [])],
                             **{k: record.get(k) for k in ("device", "precision", "command", "date",
                                                           "preprocessing", "metrics_there", "salvaged")
                                if record.get(k) is not None}}
    return history, float(record.get("train_time_s") or 0.0)


def _source_mix(sources: list[dict]) -> list[tuple[str, float]]:
    """Sources as sorted (name, sampling weight) pairs: what two runs must share to be one training."""
    return sorted((s["name"], float(s["weight"])) for s in sources)


def roles_moved(there: dict, here: dict) -> tuple[int, int, int]:
    """(moved, missing, total): of one split record's training and validation files, how many
    have another role in another record, and how many it does not hold at all."""
    role = D.split_roles(here)
    theirs = [(key, k) for key, k in D.split_roles(there).items() if k in ("train", "val")]
    moved = sum(1 for key, k in theirs if role.get(key, k) != k)
    return moved, sum(1 for key, _ in theirs if key not in role), len(theirs)


def average_with_init(model, init: str, val_images, val_masks, spec, device, precision,
                      always: bool = False) -> dict:
    """Replace the run's weights by their mean with the parent's when validation loss prefers it,
    or ``always`` (WiSE-FT: the rule fixed before the run, so validation only reports)."""
    best = {k: v.clone() for k, v in model.state_dict().items()}
    va_best = E.evaluate_split(model, val_images, val_masks, spec, device, precision)
    model.load_state_dict(E.average_states(E.shipped_state(model, init), best))
    va_avg = E.evaluate_split(model, val_images, val_masks, spec, device, precision)
    shipped = "average" if always or va_avg["loss"] < va_best["loss"] else "best"
    if shipped == "best":
        model.load_state_dict(best)
    print(f"weight average with {init}: val loss {va_avg['loss']:.4f} (acc {va_avg['acc']:.4f}) against "
          f"{va_best['loss']:.4f} ({va_best['acc']:.4f}) for this run's weights: shipping the {shipped}"
          f"{' (always)' if always else ''}", flush=True)
    return {"with": init, "shipped": shipped, "rule": "always" if always else "lower validation loss",
            "val_best": va_best, "val_average": va_avg}


def calibrate(model, images, masks, spec, device, precision, tta_below: float
              ) -> tuple[torch.Tensor, dict | None, float, list[str]]:
    """The validation outputs as served, the mirror rule (``tta_below`` > 0), the temperature, and
    what `E.CalibrationWarning` said of a temperature left unfitted (validation all right: no
    optimum), for the card; any other warning is passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", E.CalibrationWarning)
        val_logits = E.predict_logits(model, images, spec, device, precision=precision)
        tta = None
        if tta_below > 0:
            # The rule picks rows on the plain outputs' calibrated confidence; everything after it
            # (temperature, operating point, referral, the test evaluation) sees the served outputs.
            tta = {"kind": "mirror", "below_confidence": tta_below,
                   "selection_temperature": E.fit_temperature(val_logits, masks)}
            two = tta_rows(val_logits, tta)
            tta["val_share"] = round(float(two.float().mean()), 4)
            # Only the selected rows need the mirror pass (the mean of both passes, as served).
            val_logits[two] = E.predict_logits(model, images[two], spec, device, precision=precision,
                                               tta=MIRROR_ALWAYS)
            # One temperature for both kinds of row: rescale the two-pass rows to the one-pass rows' T.
            if two.any() and (~two).any():
                tta["scale"] = E.fit_temperature(val_logits[~two], masks[~two]) / E.fit_temperature(val_logits[two], masks[two])
                val_logits[two] *= tta["scale"]
        temperature = E.fit_temperature(val_logits, masks)
    fit_notes = [str(w.message) for w in caught if issubclass(w.category, E.CalibrationWarning)]
    for w in caught:
        if not issubclass(w.category, E.CalibrationWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for note in fit_notes:
        print(f"warning: {note}", file=sys.stderr)
    return val_logits, tta, temperature, fit_notes


def finish(model, args, sources, samples, images, masks, idx, classes, spec, device, precision,
           history, skipped, dropped, train_time, wall_time) -> None:
    """Calibrate on validation, pick the operating point, evaluate the test split, write the card."""
    from safetensors.torch import save_file
    out = Path(args.out)
    model.eval()
    # Calibrate and evaluate the weights that ship (fp16 safetensors), not their fp32 originals.
    model.load_state_dict({k: (v.half().float() if v.is_floating_point() else v) for k, v in model.state_dict().items()})
    val_logits, tta, temperature, fit_notes = calibrate(model, images[idx["val"]], masks[idx["val"]], spec, device,
                                                        precision, args.tta_below)
    if not math.isfinite(temperature):   # non-finite validation logits: no card that no command can load
        raise DataError("the validation outputs are not finite (NaN or infinite weights? try a lower --lr): "
                        "the model cannot be calibrated")
    val_probs = torch.softmax(val_logits / temperature, 1).numpy()
    val_samples = [samples[i] for i in idx["val"]]
    operating = operating_point(val_probs, val_samples, classes, args)
    threshold = operating.get("threshold")
    uncertainty = pick_referral(val_probs, [s.label for s in val_samples], classes, threshold)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights_file = out / "model.safetensors"
    old_sha = file_sha256(weights_file) if args.resume and weights_file.is_file() else None
    # Written whole, then swapped in: a run killed here leaves the old weights or the new ones.
    D.save_whole(weights_file, lambda tmp: save_file(E.half_state(state), str(tmp)))
    args.weights_sha256_record = new_sha = file_sha256(weights_file)   # read once: the card records it
    retire_measurements(out, old_sha, new_sha)
    test = [samples[i] for i in idx["test"]]
    test_probs = torch.softmax(E.predict_logits(model, images[idx["test"]], spec, device,
                                                precision=precision, tta=tta) / temperature, 1).numpy()
    records = prediction_records(test, test_probs, classes, threshold,
                                 referral=ReferralRule.from_card({"classes": classes,
                                                                  "uncertainty": uncertainty}))
    ev = evaluate_records(records, classes, threshold)
    write_evaluation(out, ev, samples, sources)
    card = make_card(args, sources, samples, classes, spec, temperature, operating, uncertainty,
                     ev, history, skipped, dropped, train_time, wall_time, model, device, precision)
    card["tta"] = tta
    if fit_notes:
        card["calibration"]["note"] = "; ".join(fit_notes)
    if old_sha == new_sha and (out / "card.json").exists():
        # Same weights: what later commands measured on them (gate, saliency, latency) still holds.
        old = D.read_card(out)
        card |= {k: old[k] for k in ("ood", "saliency", "benchmark") if k in old}
    write_json(out / "card.json", card)
    for f in ("best.pt", TRAINED):  # the card now says what trained.json said
        (out / f).unlink(missing_ok=True)
    print(json.dumps({"test_accuracy": ev.get("accuracy"), "macro_f1": ev.get("macro_f1"),
                      "tumour_missed": ev.get("tumour_missed"), "ece": ev.get("ece"),
                      "per_source": {k: {m: v.get(m) for m in ("accuracy", "sensitivity", "specificity",
                                                                 "tumour_missed")}
                                     for k, v in ev.get("per_source", {}).items()},
                      "train_time_s": round(train_time)}, indent=1), flush=True)


def operating_point(val_probs: np.ndarray, val_samples: list[D.Sample], classes: list[str],
                    args: argparse.Namespace) -> dict:
    """The tumour-probability threshold picked on validation for --target-sensitivity, holding
    --min-specificity in each source, with what it gives there ({} for a model without a tumour
    decision)."""
    if not has_tumour_decision(classes):
        return {}
    # Rows of a class that is neither a tumour nor 'no tumour' say nothing about the threshold.
    known = [i for i, s in enumerate(val_samples) if is_tumour_label(s.label) is not None]
    t_prob = tumour_probability(val_probs[known], classes)
    is_t = np.array([bool(is_tumour_label(val_samples[i].label)) for i in known], bool)
    src = np.array([val_samples[i].source for i in known])
    # a row called a class that is neither ('stroke') is no tumour call at any threshold (`decide`)
    never = other_calls(val_probs[known], classes)
    thr = E.pick_threshold(t_prob, is_t, args.target_sensitivity, args.min_specificity, groups=src, never=never)
    called = (t_prob >= thr) & ~never
    operating = {"threshold": thr, "target_sensitivity": args.target_sensitivity,
                 "min_specificity": args.min_specificity,
                 "min_specificity_applies_to": "every source with >= 20 validation normals "
                                               "(all sources pooled when none has that many)",
                 "val_sensitivity": float(called[is_t].mean()) if is_t.any() else None,
                 "val_specificity": float((~called[~is_t]).mean()) if (~is_t).any() else None,
                 # per source, as pick_threshold holds the floor: a pooled 90.9 % hid one source's 0 %
                 "val_specificity_by_source": {
                     str(g): float((~called[~is_t & (src == g)]).mean()) for g in E.floor_groups(is_t, src)} or None}
    if (short := E.floor_unmet(operating)):
        spec_s, floor_s = apart(short[1], args.min_specificity, 1, True)
        print(f"warning: the operating point is at its {E.CAP_THRESHOLD} cap, and validation specificity "
              f"there is {spec_s} ({short[0]}), under the {floor_s} floor: the model does not yet tell "
              "tumour-free scans apart", flush=True)
    return operating


def write_evaluation(out: Path, ev: dict, samples: list[D.Sample], sources: list[dict]) -> None:
    """eval.json, its test records marked where a copy was trained on, and the list of files the
    model trained on (`seen_sha256.txt`); neither auxiliary step ends a finished run."""
    # a test image whose copy was trained on is a scan the model has seen: marked now, the Evaluation
    # page and `compare --paired` can leave it out (about a minute on the shared data; hashes cached)
    try:   # an auxiliary mark must not end a finished run: without it the records stay unmarked
        mark_records(ev, copies_trained_on(samples, sources))
    except (OSError, ValueError) as e:
        print(f"warning: test records not marked for copies in training ({e}); "
              "`python -m core mark-copies` can do it later", flush=True)
    write_json(out / "eval.json", ev)
    (out / SEEN_FILE).unlink(missing_ok=True)   # a failed write must not leave the previous weights' list
    try:   # an upload of a file it trained on is flagged 'seen in training' (app, predict, reports)
        write_seen_files(out, seen_files(samples, sources, copy_marked(ev)))
    except (OSError, ValueError) as e:
        print(f"warning: {SEEN_FILE} not written ({e}); `python -m core seen-files` can do it later", flush=True)


def mixed_groups_note(samples: list[D.Sample]) -> dict:
    """The card's word on near-duplicate groups whose labels disagree, for a split grouped by this
    run (a reused split's groups are its parent's): split as one, they cost stratification."""
    if not samples or not all(s.group for s in samples):
        return {}
    mixed = D.mixed_label_groups(samples)
    if not mixed:
        return {}
    return {"groups_whose_labels_disagree": {
        "groups": len(mixed), "images": sum(sum(c.values()) for c in mixed), "largest": dict(mixed[0].most_common()),
        "note": "near-duplicate groups are split whole; a large one lands in one split whatever the seed"}}


def _split_record(args, samples: list[D.Sample], sources: list[dict]) -> dict:
    """The card's split: method, sizes per split and any copies a --drop-copies list removed."""
    trained = {s["name"] for s in sources if s["weight"] > 0}  # weight 0: held out, tested only
    per_split = {k: sum(1 for s in samples if s.split == k and (k == "test" or s.source in trained))
                 for k in ("train", "val", "test")}
    split_rec = json.loads((Path(args.out) / "split.json").read_text())
    record = {"method": split_rec["method"], "from": split_rec.get("from"),
              "file": "split.json", "sizes": per_split, "seed": args.seed}
    if split_rec.get("dropped_copies") or args.drop_copies:
        record["dropped_copies"] = {
            "n": len(split_rec.get("dropped_copies") or []),
            "lists": [{"file": Path(f).name, "sha256": h}
                      for f, h in zip(args.drop_copies or [], args.drop_copies_sha256)],
            "what": "training images a --drop-copies list pairs with a validation "
                    "or test image (the same slice), left out of training "
                    "(split.json's dropped_copies)"}
    return record


def _source_records(sources: list[dict], samples: list[D.Sample]) -> list[dict]:
    return [{"name": s["name"], "path": s["path"], "weight": s["weight"],
             "label_map": {o: l for o, l in s["label_map"]},
             "images": {k: sum(1 for x in samples if x.source == s["name"] and x.split == k)
                        for k in ("train", "val", "test")}} for s in sources]


def _data_notes(args, samples: list[D.Sample], skipped: list, dropped: list) -> dict:
    notes = {"skipped_files": len(skipped),
             "skipped": [f"{src}/{rel}: {why}" for src, rel, why in skipped[:50]],
             "dropped_small_head": f"{len(dropped)} slices whose head covers < "
                                   f"{args.min_head:.0%} of the image (near-black ends of volumes)"}
    if getattr(args, "left_out_record", 0):
        notes["not_in_recorded_split"] = (f"{args.left_out_record} files the recorded split does not "
                                          "name, left out (the run that made the split dropped them, "
                                          "or they are new)")
    if getattr(args, "untested_classes", None):
        notes["classes_not_tested"] = args.untested_classes
    return {**notes, **mixed_groups_note(samples)}


def _augmentation_words(args) -> str:
    """The augmentation ops in words, the optional ones only where switched on."""
    optional = [(args.blur_p, "blur"), (args.lesion_dim_p, "dimmed lesions"),
                (args.strip_crop_p, "stripped and cropped to the brain"),
                (args.marks_p, "a reader's marks burned in")]
    return (f"affine (rotate {args.rotate:g}, scale 12%, shear {args.shear:g}, shift 8%), h-flip, "
            + (f"quarter turns (p {args.turn_p:g}), " if args.turn_p else "")
            + _gamma_words(args.gamma_log)
            + ", contrast, brightness, noise, skull removal"
            + "".join(f", {words} (p {p:g})" for p, words in optional if p))


def _training_record(args, history: list, train_time: float, wall_time: float,
                     device: torch.device, precision: str) -> dict:
    """How the model was trained: schedule, augmentation, timing, machine and every option."""
    return {"epochs_run": len(history), "epochs": args.epochs, "img": args.img,
            "progressive": ({"small_img": args.small_img, "epochs": args.small_img_epochs}
                            if args.small_img and args.small_img_epochs else None),
            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.wd,
            "optimizer": "AdamW", "schedule": "OneCycle", "label_smoothing": args.smoothing,
            "schedule_splices": getattr(args, "schedule_splices", None) or None,
            "kept": args.keep,
            "best_epoch": getattr(args, "best_epoch_record", None), "stopped_early": len(history) < args.epochs,
            "weight_ema": args.ema or None,
            "augmentation": {"strength": args.aug, "skull_strip_p": args.skull_strip_p,
                             **aug_options(args), "ops": _augmentation_words(args)},
            "train_time_s": round(train_time, 1), "wall_time_s": round(wall_time, 1),
            **_where_trained(args, device, precision),
            "world_size": getattr(args, "world_size", 1),
            "config": getattr(args, "config_values", None),
            "init": getattr(args, "init_record", None),
            "weight_average": getattr(args, "average_record", None),
            "mask_loss": getattr(args, "mask_record", None),
            "distillation": getattr(args, "distill_record", None),
            "options": {k: getattr(args, k) for k in TRAINED_WITH},
            "trained_elsewhere": getattr(args, "elsewhere_record", None)}


def make_card(args, sources, samples, classes, spec, temperature, operating, uncertainty, ev,
              history, skipped, dropped, train_time, wall_time, model, device, precision) -> dict:
    """The model's card: what it is, how to feed it, what it saw, how it scored, how it was made."""
    import torchvision
    binary = sorted(classes) == sorted([TUMOUR, NO_TUMOUR])
    return {
        "name": args.name or Path(args.out).name,
        "version": dt.date.today().isoformat(),
        "arch": args.arch,
        "task": "binary tumour / no tumour" if binary else f"{len(classes)}-class",
        "classes": classes,
        "tumour_classes": tumour_classes(classes),
        "input": {"channels": 1, "size": spec["size"], "dtype": "float32",
                  "value_range": "[0, 1] before normalisation"},
        "preprocessing": spec,
        "calibration": {"method": "temperature scaling on the validation split",
                        "temperature": temperature},
        "operating_point": operating,
        "uncertainty": uncertainty,
        "sources": _source_records(sources, samples),
        "split": _split_record(args, samples, sources),
        "data_fingerprint": D.data_fingerprint(samples),
        "data_notes": _data_notes(args, samples, skipped, dropped),
        "metrics": card_metrics(ev),
        "training": _training_record(args, history, train_time, wall_time, device, precision),
        "parameters": count_parameters(model),
        "weights_file_bytes": (Path(args.out) / "model.safetensors").stat().st_size,
        "command": getattr(args, "first_command", None) or getattr(args, "command", None),
        "resumed_with": args.command if getattr(args, "first_command", None) else None,
        "resume_commands": getattr(args, "resume_commands", None) or None,   # every resume, in order
        "command_dir": getattr(args, "command_dir", None),
        "weights_sha256": args.weights_sha256_record,  # the Predictor refuses weights another run swapped in
        "libraries": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                      "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "intended_use": "Research and teaching demo. Not a medical device; not for diagnosis.",
    }


def _where_trained(args, device: torch.device, precision: str) -> dict:
    """The card's device and precision: the training's, also when it ran elsewhere (--finish-from)."""
    there = getattr(args, "elsewhere_record", None)
    if there:
        return {"device": f"{there.get('device', 'elsewhere')} (calibrated and evaluated on {device_name(device)})",
                "precision": there.get("precision", precision)}
    return {"device": device_name(device), "precision": precision}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
