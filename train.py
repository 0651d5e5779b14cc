"""Train a brain-tumour MRI classifier from class-per-folder data into --out (default runs/<arch>).

    python train.py --data ../shared/data/brain-tumor-mri/Training --arch resnet18 --out runs/resnet18
    python train.py --config experiments/resnet18_192_gpu_ema120_s2.toml --out runs/default   # the shipped
        default's recipe (weights/DEFAULT names it; about 5.6 h on a 2-core CPU, minutes on a GPU)

Writes model.safetensors, card.json, history.json, eval.json and split.json into --out.
A checkpoint is saved every epoch (checkpoint.pt, not shipped); --resume continues from it.
The out-of-distribution gate is fitted afterwards: python -m core fit-ood --weights OUT
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

import torch

from core import data as D
from core import engine as E
from core.inference import default_weights, file_sha256, shipped_default
from core.models import list_models, min_input_size
from core.training import (LESION_NEEDS_MASKS, DataError, adopted_record, run, split_file_problem,
                           with_added_options)

# Config keys that are notes for `python -m core compare` (kept in the card), not options.
CONFIG_NOTES = {"reduced", "reported"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file with any of these options (command line wins)")
    p.add_argument("--data", action="append", default=None,
                   help="data root, repeatable; PATH or PATH=WEIGHT (sampling weight of the source)")
    p.add_argument("--arch", default="mobilenet_v3_small")
    p.add_argument("--out", default=None, help="output directory (default runs/<arch>; weights/ holds the shipped "
                   "models: give --out weights/NAME to ship one)")
    p.add_argument("--name", default=None, help="model name for the card (default: out dir name)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--img", type=int, default=192, help="input size in pixels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.0,
                   help="decay of an exponential moving average of the weights (0 = off); "
                        "when on, the average is validated, checkpointed and shipped")
    p.add_argument("--small-img", type=int, default=0,
                   help="progressive resizing: train the first --small-img-epochs at this size")
    p.add_argument("--small-img-epochs", type=int, default=0)
    p.add_argument("--mask-loss", type=float, default=0.0,
                   help="weight of a pointing loss that puts each class map's evidence on the tumour "
                        "mask where a source has masks (LGG); 0 = off")
    p.add_argument("--teacher", default=None,
                   help="distil from a finished run (DIR written by train.py, same classes, none of this "
                        "run's validation or test images in its training split): its logits for each "
                        "training image, on its own input, become soft targets")
    p.add_argument("--distill", type=float, default=0.5,
                   help="with --teacher: weight of the distillation loss; the label's loss gets 1 - this")
    p.add_argument("--distill-t", type=float, default=2.0, help="with --teacher: softening temperature")
    p.add_argument("--distill-online", action="store_true",
                   help="with --teacher: at the full input size the teacher reads each augmented batch as "
                        "the student sees it (a third more time per step) instead of its fixed answer "
                        "for the clean image; the low-resolution epochs keep the fixed answers")
    p.add_argument("--aug", type=float, default=1.0, help="augmentation strength, 0 = none")
    p.add_argument("--skull-strip-p", type=float, default=0.2)
    d = E.AUG_OPTION_DEFAULTS
    p.add_argument("--rotate", type=float, default=d["rotate"], help="largest random rotation, degrees")
    p.add_argument("--shear", type=float, default=d["shear"], help="largest random shear (affine factor)")
    p.add_argument("--turn-p", type=float, default=d["turn_p"],
                   help="probability of a random quarter/half/three-quarter turn (files stored sideways)")
    p.add_argument("--blur-p", type=float, default=d["blur_p"], help="probability of a random Gaussian blur")
    p.add_argument("--gamma-log", type=float, default=d["gamma_log"],
                   help="largest |ln gamma| of the random gamma (0.4: 0.67-1.49; 0.8: 0.45-2.2)")
    p.add_argument("--lesion-dim-p", type=float, default=d["lesion_dim_p"],
                   help="probability of dimming a masked lesion (x 0.35-1; needs --mask-loss: the masks)")
    p.add_argument("--strip-crop-p", type=float, default=d["strip_crop_p"],
                   help="probability of stripping the skull and cropping to the brain, as a skull-stripped "
                        "upload is served (core.engine.strip_and_crop)")
    p.add_argument("--marks-p", type=float, default=d["marks_p"],
                   help="probability of burning a reader's marks into an image (lines, outlines, arrows, "
                        "labels: core.engine.draw_marks), as screen captures and annotated exports carry them")
    p.add_argument("--crop", default="head", choices=["head", "none"])
    p.add_argument("--binary", action="store_true", help="fold every tumour class into 'tumor'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--patience", type=int, default=8,
                   help="early stopping on validation loss (the warm-up epochs do not count)")
    p.add_argument("--keep", default="best", choices=["best", "last"],
                   help="which epoch's weights ship: the lowest validation loss (best, with early "
                        "stopping), or the final epoch (last, as the torchvision references do: for a "
                        "short fine-tune whose validation losses differ by less than their noise; with --average-init, "
                        "validation still chooses between the final epoch and its average with the parent)")
    p.add_argument("--target-sensitivity", type=float, default=0.99)
    p.add_argument("--min-specificity", type=float, default=0.97,
                   help="the operating point never trades validation specificity below this")
    p.add_argument("--max-distance", type=int, default=6, help="phash bits for near duplicates")
    p.add_argument("--min-head", type=float, default=0.03,
                   help="drop slices whose head covers less of the image than this")
    p.add_argument("--limit", type=int, default=0, help="use at most N images per source (tests)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--replace", action="store_true",
                   help="let a fresh run retrain a finished model's folder under weights/ (weights/NAME with a card), "
                        "whose files are moved aside to --out/previous-<time>/ (git ignores them)")
    p.add_argument("--average-init", action="store_true",
                   help="with --init: ship the mean of the parent's and this run's best weights when "
                        "that has the lower validation loss (weight averaging over the two cycles)")
    p.add_argument("--average-init-always", action="store_true",
                   help="with --init: ship that mean whatever validation says (WiSE-FT at 0.5: the "
                        "parent keeps what the fine-tune forgets); also with --finish-from, to average "
                        "a finished fine-tune with its parent without training it again")
    p.add_argument("--split-from", default=None,
                   help="use the split recorded in DIR/split.json instead of computing one (images it "
                        "does not list are left out); default with --init: the parent's")
    p.add_argument("--drop-copies", action="append", default=None, metavar="TSV",
                   help="leave out of training every training image this list pairs with a validation or "
                        "test image (a copy of the same slice; columns source, file, train_source, "
                        "train_file: bench/copy_audit.py --pairs-out writes one); repeatable; recorded in "
                        "split.json and the card")
    p.add_argument("--join-copies", action="append", default=None, metavar="TSV",
                   help="a fresh split also keeps together the copies this known-copies list names by "
                        "content (columns as core/known_copies.tsv, which is always read: bench/copy_audit.py "
                        "--split all --data NAME=DIR --pairs-out writes one for other data); repeatable; "
                        "named in the card's split method")
    p.add_argument("--init", default=None,
                   help="start from a finished run's weights (weights/NAME of the same arch, classes "
                        "and split) for a second, shorter cycle; recorded in the card")
    p.add_argument("--finish-from", default=None,
                   help="no training: take the weights and history of a run made elsewhere (DIR with "
                        "model.safetensors, history.json and card.json; e.g. a GPU machine trained on "
                        "images packed by bench/prepare_gpu_data.py) and calibrate, evaluate and write the "
                        "card on this data; the run's other options must be the ones it was trained with")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tta-below", type=float, default=0.0,
                   help="serve with a mirror-image second pass for predictions whose plain calibrated "
                        "confidence is below this (0 = off); calibration, operating point and referral "
                        "are fitted on those served outputs and the rule is written to the card")
    return p


def _read_config(p: argparse.ArgumentParser, path: str) -> dict:
    """The TOML config as option defaults; an unknown key is an error, not a silent no-op."""
    try:
        cfg = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        p.error(f"--config {path}: no such file")
    except OSError as e:   # "[Errno 21] Is a directory: '...'" said the path twice
        p.error(f"--config {path}: {e.strerror or e}")
    except tomllib.TOMLDecodeError as e:
        p.error(f"--config {path}: {e}")
    actions = {a.dest: a for a in p._actions}
    unknown = sorted(k for k in cfg if k.replace("-", "_") not in actions.keys() | CONFIG_NOTES)
    if unknown:
        p.error(f"--config {path}: unknown key(s) {', '.join(unknown)}")
    for k, v in cfg.items():   # argparse converts a text default itself, and its error named no config
        action = actions.get(k.replace("-", "_"))
        if isinstance(v, str) and action is not None and action.type is not None:
            try:
                action.type(v)
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                p.error(f"--config {path}: {k} = {v!r} is not a valid value of {action.option_strings[0]}")
    return cfg


INT_OPTIONS = ("epochs", "batch_size", "img", "small_img", "small_img_epochs", "patience", "limit",
               "workers", "threads", "seed", "max_distance")
# The augmentation's options (rotate ... marks_p) come from the engine, so that one added there
# is parsed, fixed on resume and checked on a finish without a hand edit in each list.
FLOAT_OPTIONS = ("lr", "wd", "smoothing", "ema", "mask_loss", "distill", "distill_t", "aug", "skull_strip_p",
                 *E.AUG_OPTION_DEFAULTS, "target_sensitivity", "min_specificity", "min_head", "tta_below")
FLAG_OPTIONS = ("binary", "resume", "replace", "average_init", "average_init_always", "no_progress", "distill_online")
# Text options: a config's out = 3 or name = 2026-01-01 (a TOML date) failed late, the date only
# when the card was written after the whole run.
STR_OPTIONS = ("out", "name", "device", "init", "split_from", "teacher", "finish_from")
# What a resumed run must share with the run it continues: its checkpoint's optimiser, schedule,
# split and cached images were made with them (and --data, --init, --split-from, compared as real
# paths). --epochs may change (the schedule follows), and so may what only the finish does.
RESUME_FIXED = ("arch", "img", "batch_size", "lr", "wd", "smoothing", "ema", "small_img", "small_img_epochs",
                "aug", "skull_strip_p", *E.AUG_OPTION_DEFAULTS, "crop", "binary", "seed", "max_distance",
                "min_head", "limit", "distill", "distill_t", "distill_online", "keep")


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_types(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A config's values get no argparse conversion: 1.5 epochs or resume = "no" stop here."""
    for d in INT_OPTIONS:
        v = getattr(args, d)
        if isinstance(v, bool) or not isinstance(v, int):
            p.error(f"{_option(d)}: a whole number is expected, not {v!r}")
    for d in FLOAT_OPTIONS:
        v = getattr(args, d)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            p.error(f"{_option(d)}: a finite number is expected, not {v!r}")
    for d in FLAG_OPTIONS:
        if not isinstance(getattr(args, d), bool):
            p.error(f"{_option(d)}: true or false is expected, not {getattr(args, d)!r}")
    for d in STR_OPTIONS:
        if (v := getattr(args, d)) is not None and not isinstance(v, str):
            p.error(f"{_option(d)}: a text (in quotes in a config) is expected, not {v!r}")
    for d in ("drop_copies", "join_copies"):
        if isinstance(v := getattr(args, d), str):   # a config's drop_copies = "x.tsv"
            setattr(args, d, v := [v])
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            p.error(f"{_option(d)}: paths (texts) are expected, not {v!r}")
    for k, v in (getattr(args, "config_values", None) or {}).items():
        if k in CONFIG_NOTES and not isinstance(v, (str, int, float, bool)):
            p.error(f"--config: {k} must be a text or a number (it goes into the card), not {v!r}")
    for d, choices in (("crop", ("head", "none")), ("precision", ("auto", "fp32", "bf16", "fp16")),
                       ("keep", ("best", "last"))):
        if getattr(args, d) not in choices:
            p.error(f"{_option(d)}: one of {', '.join(choices)}, not {getattr(args, d)!r}")


def _check_device(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.arch not in list_models():
        p.error(f"--arch {args.arch}: unknown model; one of {', '.join(list_models())}")
    dev = args.device
    if dev not in ("auto", "cpu", "mps") and not re.fullmatch(r"cuda(:\d+)?", dev):
        p.error(f"--device {dev}: use auto, cpu, cuda, cuda:N or mps")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA device is available here")
    if dev.startswith("cuda:") and int(dev[5:]) >= torch.cuda.device_count():
        p.error(f"--device {dev}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if dev == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        p.error("--device mps, but no Apple MPS device is available here")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dev == "mps":
        p.error("--device mps under torchrun: several processes train on CUDA or the CPU only")
    if args.precision == "fp16" and not (dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())):
        p.error("--precision fp16 needs CUDA (its loss scaling runs there); use bf16 or fp32")


def _label_map_key(source: dict) -> list:
    """A source's label_map as `resolved_paths` compares it (sorted: the order of a table is no change)."""
    return sorted((source.get("label_map") or {}).items())


def resolved_paths(args: argparse.Namespace | dict) -> dict:
    """--data roots, --init and --split-from as absolute real paths: a resume from another folder,
    or one that names the same folder another way, is the same run."""
    a = vars(args) if isinstance(args, argparse.Namespace) else args
    real = lambda p: os.path.realpath(D.resolve_root(str(p))) if p else None  # noqa: E731
    try:   # a changed label_map relabels the images mid-run
        data = [(real(s["path"]), s["weight"], s["name"], _label_map_key(s)) for s in D.parse_sources(a.get("data"))]
    except (ValueError, KeyError, TypeError):
        data = None
    return {"data": data, "init": real(a.get("init")), "split_from": real(a.get("split_from")),
            "teacher": real(a.get("teacher"))}


def resume_conflicts(saved: dict, now: dict) -> list[str]:
    """The settings of a resumed run that differ from those its checkpoint was made with."""
    saved = with_added_options(saved)
    out = [f"{_option(k)} {saved[k]!r} -> {now[k]!r}" for k in RESUME_FIXED
           if k in saved and saved[k] != now.get(k)]
    # a resume without --mask-loss keeps the run's; one with it must not switch it on or change it
    if "mask_loss" in saved and now.get("mask_loss") and (saved["mask_loss"] or 0) != now["mask_loss"]:
        out.append(f"--mask-loss {saved['mask_loss']!r} -> {now['mask_loss']!r}")
    was = dict(saved.get("paths_resolved") or resolved_paths(saved))  # older checkpoints: resolved here
    if was.get("data") and any(len(d) == 3 for d in was["data"]):   # recorded before label maps were compared
        maps = [_label_map_key(src) for src in D.parse_sources(saved["data"])]
        was["data"] = [(*d, m) for d, m in zip(was["data"], maps)]
    is_ = resolved_paths(now)
    for k in ("init", "split_from", "teacher"):
        if k in saved and was.get(k) != is_[k]:
            out.append(f"{_option(k)} {saved[k]!r} -> {now.get(k)!r}")
    if "data" in saved and was["data"] != is_["data"]:
        out.append("--data (other sources or weights)")
    if saved["drop_copies_sha256"] != (now.get("drop_copies_sha256") or []):
        out.append("--drop-copies (other lists: other training images would be left out)")
    return out


def _check_resume(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    ckpt = Path(args.out) / "checkpoint.pt"
    if not ckpt.is_file():
        p.error(f"--resume: no checkpoint.pt in {args.out} to continue from")
    try:
        checkpoint = E.load_checkpoint(ckpt, mmap=True)   # run() reads the tensors
        saved, done = checkpoint.get("args") or {}, int(checkpoint.get("epoch", -1)) + 1
    except Exception as e:  # truncated, not a checkpoint at all, or from a foreign program
        p.error(f"--resume: the checkpoint in {args.out} is damaged ({type(e).__name__}); "
                "remove it to start the run afresh")
    if args.epochs < done:   # said here, not after minutes of reading images as a count of steps
        p.error(f"--resume --epochs {args.epochs}: the run in {args.out} has trained {done} epochs already; "
                f"give --epochs {done} or more (its own {saved.get('epochs', done)} finishes it as planned)")
    ran_on, world = saved.get("world_size", 1), int(os.environ.get("WORLD_SIZE", "1") or 1)
    if ran_on != world and done < args.epochs:
        # epochs to train: the global batch and the steps of an epoch follow the process count
        # (a finished run may be finished anywhere)
        how = "python train.py" if ran_on == 1 else f"torchrun --nproc_per_node {ran_on} train.py"
        p.error(f"--resume: the run in {args.out} was trained on {ran_on} process(es) and this is "
                f"{world}: resume it as it ran ({how}), or start a new run")
    if not getattr(args, "name_given", False) and saved.get("name"):
        args.name = saved["name"]   # a resumed run keeps its name, whatever its --out or config says
    for k in ("init", "split_from", "teacher"):  # left out on the resume: the run's own
        if getattr(args, k) is None and saved.get(k):
            setattr(args, k, (saved.get("paths_resolved") or {}).get(k) or saved[k])
    if args.drop_copies is None and saved.get("drop_copies"):
        # the run's split.json already leaves its listed copies out: the lists need not be here
        args.drop_copies, args.drop_copies_sha256 = saved["drop_copies"], saved.get("drop_copies_sha256") or []
    diff = resume_conflicts(saved, vars(args))
    if diff:
        p.error(f"--resume continues the run in {args.out} with its own settings, and these differ: "
                f"{'; '.join(diff)} (only --epochs and how it runs or finishes may change)")


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what would fail later (after minutes of caching) or leave a damaged run behind
    (`parse_args` has checked the config's types by now)."""
    _check_modes(p, args)
    _check_numbers(p, args)
    _check_device(p, args)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, not a directory")
    _check_out(p, args, _check_sources(p, args))
    if args.resume:
        _check_resume(p, args)
    else:
        for opt, d in (("--init", args.init), ("--split-from", args.split_from), ("--teacher", args.teacher)):
            if d and os.path.realpath(D.resolve_root(d)) == os.path.realpath(args.out):
                p.error(f"{opt} and --out name the same folder: a fresh run moves that folder's files "
                        "aside while it still needs them; write the new run to another folder")


def _check_modes(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options that cannot go together: --finish-from with training or a teacher (distillation
    options without a teacher are refused in `parse_args`, where it is known which were named)."""
    if args.finish_from and (args.resume or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        p.error("--finish-from trains nothing: run it alone, without --resume or torchrun")
    if args.finish_from and args.teacher:
        p.error("--finish-from trains nothing, so a --teacher has nothing to teach: leave it out")
    if not 0 < args.distill <= 1 or args.distill_t <= 0:
        p.error("--distill must be in (0, 1] and --distill-t > 0")
    if args.finish_from and args.out and Path(args.finish_from).resolve() == Path(args.out).resolve():
        p.error("--finish-from DIR --out DIR: the run there would be moved aside first; give another --out")


def _check_numbers(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each number in its range, and the input sizes the architecture and the reader allow."""
    if args.epochs < 1 or args.batch_size < 2 or args.lr <= 0:
        p.error("--epochs must be >= 1, --batch-size >= 2 and --lr > 0")
    if args.wd < 0 or not 0 <= args.ema < 1 or args.aug < 0 or args.max_distance < 0:
        # AdamW refused a negative decay after minutes of caching; --ema 1 or 1.5 averaged by the
        # warm-up's schedule alone, -0.5 was off without a word
        p.error("--wd, --aug and --max-distance must be >= 0, and --ema in [0, 1) (0 = off)")
    if args.mask_loss < 0:
        p.error("--mask-loss must be 0 (off) or positive")
    from core.reader import MAX_SIDE   # no scan reaches the model larger: a bigger input only upsamples
    if not 8 <= args.img <= MAX_SIDE or args.small_img < 0 or 0 < args.small_img < 8 or args.small_img > MAX_SIDE:
        p.error(f"--img must be between 8 and {MAX_SIDE} pixels (and --small-img 0 or in that range)")
    if args.small_img_epochs and not args.small_img and not args.resume:   # ran every epoch at --img, silently
        p.error("--small-img-epochs needs --small-img (the size of those first epochs)")
    if args.small_img and args.small_img_epochs >= args.epochs:
        # every epoch small: early stopping never counts, and the model is calibrated and tested at
        # a size it never trained on
        p.error(f"--small-img-epochs {args.small_img_epochs} leaves no epoch at --img {args.img}: it must be "
                f"fewer than --epochs {args.epochs} (or --small-img 0)")
    if args.patience < 1 or args.limit < 0 or args.threads < 0 or args.workers < 0:
        p.error("--patience must be >= 1, and --limit, --threads and --workers >= 0")
    if not 0 <= args.seed < 2**31:
        p.error("--seed must be between 0 and 2**31 - 1")
    if not 0 < args.target_sensitivity <= 1 or not 0 <= args.smoothing < 1:
        p.error("--target-sensitivity must be in (0, 1] and --smoothing in [0, 1)")
    shares = {k: getattr(args, k) for k in ("min_specificity", "turn_p", "blur_p", "lesion_dim_p", "skull_strip_p",
                                             "strip_crop_p", "marks_p", "tta_below")}
    if (bad := [k for k, v in shares.items() if not 0 <= v <= 1]):
        p.error(f"--{bad[0].replace('_', '-')} must be between 0 and 1")
    if args.lesion_dim_p and not args.mask_loss and not args.resume:  # a resume keeps its run's mask loss
        p.error(LESION_NEEDS_MASKS)
    least = min_input_size(args.arch)
    if args.img < least or 0 < args.small_img < least:
        p.error(f"{args.arch} needs --img (and --small-img) of at least {least} pixels")


def _check_sources(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict]:
    """--data's sources, each an existing folder of its own, named once, with a usable weight."""
    try:
        sources = D.parse_sources(args.data)
    except (ValueError, KeyError, TypeError) as e:
        p.error(f"--data: {e}")
    for src in sources:
        if not str(src["path"]).strip():   # an unset "$DATA" must not train on the working directory
            p.error("--data: an empty path (an unset variable?): name the dataset's folder")
        if not D.resolve_root(src["path"]).is_dir():
            p.error(f"--data {src['path']}: not a directory")
    # by path: two sources from folders of one name are both named after it ("L3 and L3 overlap")
    if overlap := D.overlapping([(str(src["path"]), D.resolve_root(src["path"]).resolve()) for src in sources]):
        p.error(f"--data: the sources {overlap[0]} overlap, so their images would count twice")
    names = [src["name"] for src in sources]
    if len(set(names)) < len(names):
        p.error(f"two sources share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}: "
                "give each its own (PATH in a config with name = ...)")
    bad = [src["name"] for src in sources if not (math.isfinite(src["weight"]) and src["weight"] >= 0)]
    if bad:
        p.error(f"--data {bad[0]}: a source's weight must be a finite number >= 0")
    if sum(src["weight"] for src in sources) <= 0:
        p.error("every source has weight 0: nothing to train on")
    return sources


def _check_out(p: argparse.ArgumentParser, args: argparse.Namespace, sources: list[dict]) -> None:
    """Refuse an --out that a run would damage: a data folder (the run's files were then read as
    images of it), or, for a fresh run, the app's default model, which it would move aside, the app
    then serving a model of however few epochs with no word (a helper's first run, session 50)."""
    try:
        out = D.real_path(args.out)
    except FileNotFoundError:
        p.error(f"--out {args.out}: its links lead round in a loop, to no folder")
    for src in sources:
        root = D.resolve_root(src["path"]).resolve()
        if out == root or root in out.parents:
            p.error(f"--out {args.out} is inside --data {src['path']}: the run's files would sit among its images; "
                    "write the model to another folder")
    if not args.resume and out in _served():
        p.error(f"--out {args.out} is the app's default model (weights/DEFAULT, or $BT_WEIGHTS): a fresh run "
                "would move it aside and the app would serve the new one; write to another folder (runs/NAME) "
                "and ship it by naming it in weights/DEFAULT (or $BT_WEIGHTS)")
    # a model under weights/ (where the shipped ones are) replaced by a toy run, its files moved to a
    # previous-*/ git ignores: a `git commit -a` then shipped the toy and kept no tracked copy (a review)
    if not args.resume and not args.replace and out.parent == SHIPPED and (out / "card.json").is_file():
        p.error(f"--out {args.out} holds a finished model under weights/, where the shipped models are (its "
                "card.json): write to another folder (runs/NAME), or give --replace to retrain it there (its "
                "files are moved aside to previous-<time>/)")


SHIPPED = D.REPO_ROOT / "weights"   # the models the repository ships, each in a folder of its own


def _served() -> set[Path]:
    """The folders the app serves by default: weights/DEFAULT's, and $BT_WEIGHTS's when set."""
    out = set()
    for find in (shipped_default, default_weights):
        try:
            out.add(find().resolve())
        except OSError:   # no weights/DEFAULT: nothing served from it
            pass
    return out


def _named_options(argv: list[str] | None) -> set[str]:
    """The options the command line names, whatever their values (one equal to its default too)."""
    q = get_args_parser()
    for action in q._actions:
        action.default = argparse.SUPPRESS
    return set(vars(q.parse_args(argv)))


def parse_args(argv=None) -> argparse.Namespace:
    p = get_args_parser()
    args = given_alone = p.parse_args(argv)   # the command line's own values, before the config's
    cfg_data = cfg_drop = cfg_join = None
    if args.config:
        cfg = _read_config(p, args.config)
        defaults = {k.replace("-", "_"): v for k, v in cfg.items()}
        # --data appends: given on the command line, it replaces the config's sources.
        cfg_data = defaults.pop("data", None)
        # --drop-copies appends too: given on the command line, it replaces the config's lists
        cfg_drop = defaults.pop("drop_copies", None)
        cfg_join = defaults.pop("join_copies", None)
        p.set_defaults(**defaults)
        args = p.parse_args(argv)
        args.config_values = cfg
    if not args.data:
        args.data = [cfg_data] if isinstance(cfg_data, (str, dict)) else cfg_data
    # copies of the config's lists: resolving their paths below must not rewrite the config the card keeps
    for d, v in (("drop_copies", cfg_drop), ("join_copies", cfg_join)):
        if getattr(args, d) is None and args.config:
            setattr(args, d, [v] if isinstance(v, str) else list(v) if isinstance(v, list) else v)
    if not args.data:
        p.error("--data is required (or a config with data = [...])")
    _check_types(p, args)
    named = _named_options(argv) | ({k.replace("-", "_") for k in cfg} if args.config else set())
    if (alone := [o for o in ("distill", "distill_t", "distill_online") if o in named]) and not args.teacher \
            and not args.resume:   # `_check` sees only values: --distill 0.5, the default, went unnoticed
        p.error(f"{_option(alone[0])} needs --teacher (the model to distil from)")
    if args.out is not None and not args.out.strip():
        # an unset "$OUT" retrained weights/<arch> in place, the shipped model moved aside
        p.error("--out: an empty path (an unset variable?): name the folder to write the model to")
    args.name_given = given_alone.name is not None
    own_out = cfg.get("out") if args.config and isinstance(cfg.get("out"), str) else ""
    if args.config and given_alone.out is not None and not args.name_given and \
            os.path.realpath(own_out) != os.path.realpath(given_alone.out):
        args.name = None   # the config's name is its own out's: another --out names this run (card, compare)
    # not weights/<arch>: a first bare run replaced a shipped model, which the app then served
    args.out = args.out or f"runs/{args.arch}"
    # shlex: a path with spaces must replay as one argument
    args.command = (shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0].endswith("train.py")
                    else None)
    # where it ran: its relative paths replay from there ("." = the repository root)
    here = Path.cwd().resolve()
    args.command_dir = os.path.relpath(here, D.REPO_ROOT) if here.is_relative_to(D.REPO_ROOT) else str(here)
    _resolve_run_dirs(p, args)
    _read_copy_lists(p, args, given_alone)
    _check(p, args)  # a resume takes its run's --init when left out
    _check_averaging(p, args)
    args.paths_resolved = resolved_paths(args)  # into the checkpoint: what a resume is compared with
    return args


def _resolve_run_dirs(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--split-from, --init and --teacher: each a folder train.py wrote, its path made absolute."""
    for key in ("split_from", "init", "teacher"):
        if not (d := getattr(args, key)):
            continue
        if not (D.resolve_root(d) / "split.json").is_file():
            p.error(f"{_option(key)} {d}: no split.json there (a directory written by train.py is expected)")
        if (why := split_file_problem(D.resolve_root(d) / "split.json")):
            p.error(f"{_option(key)} {d}: {why}")
        # found as --data is, from here, else from the repository: a config run from another
        # folder found its data but not its split
        setattr(args, key, str(D.resolve_root(d)))


def _read_copy_lists(p: argparse.ArgumentParser, args: argparse.Namespace, given_alone: argparse.Namespace) -> None:
    """Read --drop-copies and --join-copies now, so that a wrong file fails before the images are;
    a config's list gone since a run began is let go where the run's split records its copies."""
    args.drop_copies_sha256 = []
    for i, f in enumerate(args.drop_copies or []):
        f = args.drop_copies[i] = str(D.resolve_root(f).resolve())   # from here, else the repository, as --data
        try:
            D.read_copy_pairs(f)
            args.drop_copies_sha256.append(file_sha256(f))
        except (OSError, ValueError) as e:
            if args.resume and given_alone.drop_copies is None and not os.path.exists(f):
                # a config's lists moved since the run began: the run's split.json holds its copies
                print(f"note: --resume: the config's list {f} is not there; the run's own split.json "
                      "holds the copies it leaves out", file=sys.stderr)
                args.drop_copies, args.drop_copies_sha256 = None, []
                break
            p.error(f"--drop-copies: {e}")
    for i, f in enumerate(args.join_copies or []):
        try:
            D.read_known_copies(f)
        except (OSError, ValueError) as e:
            if (args.resume or args.split_from or args.init) and given_alone.join_copies is None:
                # a config's list gone on a recorded split: it would change nothing there anyway
                print(f"note: the config's --join-copies list {f} cannot be read ({e}); the split is "
                      "recorded, so it is not needed", file=sys.stderr)
                args.join_copies = None
                break
            p.error(f"--join-copies: {e}")
        args.join_copies[i] = str(D.resolve_root(f).resolve())


def _check_averaging(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.average_init and args.average_init_always:
        p.error("give --average-init (validation loss chooses) or --average-init-always, not both")
    for flag in ("average_init", "average_init_always"):
        if getattr(args, flag) and not args.init:
            p.error(f"{_option(flag)} needs --init")
    if args.finish_from and (args.average_init or args.average_init_always):
        if (why := _finish_average_problem(Path(args.finish_from), Path(args.init))):
            p.error(why)   # before --out is touched: a refused run must not move a finished model aside


def _finish_average_problem(src: Path, init: Path) -> str | None:
    """Why the run in ``src`` cannot be averaged with ``init`` (--finish-from with --average-init[-always]):
    it was not continued from those weights, or it ships such an average already. None when it can,
    or when ``src`` cannot be read (adopt_trained then says why in its own sentence)."""
    try:
        record = adopted_record(src)[0]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    parent = record.get("init") if isinstance(record, dict) else None
    if not isinstance(parent, dict) or not parent.get("weights_sha256"):
        return (f"--finish-from {src} was not continued from another model's weights (it records no --init): "
                "there is no parent to average it with")
    try:
        sha = file_sha256(init / "model.safetensors")
    except OSError:
        return None   # --init's own check says what is wrong with that folder
    if sha != parent["weights_sha256"]:
        return (f"--finish-from {src} was continued from {parent.get('from', 'another model')}, whose weights "
                f"are not those in {init}: give --init with the weights it was continued from")
    if (record.get("weight_average") or {}).get("shipped") == "average":
        return (f"--finish-from {src} already ships an average with its parent; averaging again would "
                "weigh the parent three to one")
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    before = _stamp(Path(args.out) / "checkpoint.pt")
    try:
        return run(args)
    except (DataError, OSError) as e:  # bad data or files: one sentence; a bug keeps its traceback
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C: a sentence on what is kept, not a traceback through conv2d
        if int(os.environ.get("RANK", "0")) == 0:   # once, not once per torchrun process
            print(f"train.py: interrupted. {_resume_hint(Path(args.out), before, args.resume)}", file=sys.stderr)
        return 130


def _stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime in ns) of a file, None if there is none: a file rewritten since has another."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _resume_hint(out: Path, before: tuple[int, int] | None, resumed: bool) -> str:
    """Whether --resume can go on: only from this run's checkpoint (``before``: the one there when
    it started). A fresh run moves an earlier run's files aside once its data is read, so a Ctrl-C
    before that found the earlier run's."""
    ckpt = out / "checkpoint.pt"
    if (now := _stamp(ckpt)) is not None and (resumed or now != before):
        return f"The last finished epoch is kept in {ckpt}: rerun the same command with --resume to go on."
    return "No epoch of this run had finished, so there is nothing to resume: rerun the command to start again."


if __name__ == "__main__":
    sys.exit(main())
