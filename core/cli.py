"""`python -m core` - audit a dataset, evaluate a folder, predict files.

Exit codes: 0 all good, 1 some inputs failed or (predict) were refused as no brain MRI (their lines
are still printed), 2 usage error.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from collections import Counter
from pathlib import Path, PurePosixPath
from .report import printable_path


PLUGIN_MODULES = ("report", "compare", "ood", "saliency_check")


def _predictor(weights: str | None):
    from .inference import Predictor
    return Predictor(weights)


def _image_facts(path: str) -> tuple[tuple[int, int], str]:
    """(width, height) and mode of an image file. The scan reader decides what is readable, as
    in training and evaluation (its formats and size limits); Pillow only names the mode."""
    from .reader import read_scan
    scan = read_scan(path)  # raises ScanError for a file training and evaluate would skip
    size = (int(scan.info.get("width", scan.pixels.shape[1])), int(scan.info.get("height", scan.pixels.shape[0])))
    return size, str(scan.info.get("mode") or scan.kind)


def cmd_audit(args) -> int:
    from . import data as D
    for f in args.join_copies:   # before the images are read: a wrong list fails at once
        D.read_known_copies(f)
    scan = D.discover(args.data_dir)
    samples, sizes, modes, unreadable = _readable(scan.samples)
    skipped = [f"  skipped {printable_path(rel)}: {why}" for rel, why in scan.skipped + unreadable]
    if not samples:
        print(*skipped, f"error: none of the {len(scan.samples)} image files under {args.data_dir} could be read",
              sep="\n", file=sys.stderr)
        return 1
    preset = any(s.preset_split for s in samples)
    _print_counts(args, scan, samples, preset)
    print("sizes (most common):", ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.most_common(6)))
    print("modes:", ", ".join(f"{m}: {n}" for m, n in modes.most_common()))
    for line in skipped:
        print(line)
    _print_groups(args, samples)
    if preset:
        for s in samples:
            s.split = s.preset_split or "train"
    else:
        D.split_by_group(samples, seed=args.seed)
    leaks = D.cross_split_duplicates(samples, args.max_distance, flips=True, lists=args.join_copies)
    print(f"cross-split near duplicates, flipped and listed copies ({'shipped split' if preset else f'grouped split, seed {args.seed}'}): {len(leaks)}")
    for a in leaks[:20]:
        print(f"  {a[0]}:{printable_path(a[1])} ~ {a[2]}:{printable_path(a[3])}")
    if len(leaks) > 20:
        print(f"  ... and {len(leaks) - 20} more")
    return 0


def _readable(found: list) -> tuple[list, Counter, Counter, list[tuple[str, str]]]:
    """(the samples whose image can be read, their sizes, their modes, (file, why) for the others)."""
    from .reader import ScanError, file_fault_error
    sizes, modes, unreadable, samples = Counter(), Counter(), [], []
    for s in found:
        try:
            size, mode = _image_facts(s.path)
        except ScanError as e:
            unreadable.append((s.rel, str(e)))
            continue
        except BaseException as e:  # the reader's surprise for one file never ends the audit
            why = file_fault_error(e)
            unreadable.append((s.rel, why[0].lower() + why[1:-1]))
            continue
        sizes[size] += 1; modes[mode] += 1
        samples.append(s)
    return samples, sizes, modes, unreadable


def _print_counts(args, scan, samples: list, preset: bool) -> None:
    """The audit's notes on the layout, and the images per split and class with their folders."""
    from . import data as D
    split_of = lambda s: s.preset_split or ("train" if preset else "all")  # noqa: E731
    folders: dict[tuple[str, str], set[str]] = {}
    for s in samples:
        folders.setdefault((split_of(s), s.label), set()).add(s.original)
    print(f"{len(samples)} readable images in {args.data_dir}")
    for note in filter(None, (D.nested_classes_note(scan), D.one_folder_note(scan),
                              D.typed_inside_coarse_note(scan), D.untyped_tumour_note(samples))):
        print(f"note: {note}")
    if lost := sorted({s.label for s in scan.samples} - {s.label for s in samples}):
        print(f"note: no image of {', '.join(lost)} could be read (its files are listed as skipped below)")
    for (split, label), n in sorted(Counter((split_of(s), s.label) for s in samples).items()):
        print(f"  {split:5s} {label:12s} {n:6d}   folders: {', '.join(map(printable_path, sorted(folders[split, label])))}")


def _print_groups(args, samples: list) -> None:
    """The near-duplicate groups (assigned here), the largest 20 listed, and those whose labels disagree."""
    from . import data as D
    D.assign_groups(samples, args.max_distance, lists=args.join_copies)
    groups = Counter(s.group for s in samples)
    multi = [g for g, n in groups.items() if n > 1]
    patients = len({p for s in samples if (p := D.patient_id(s.path))})
    listed = len(D.known_copy_pairs([s.path for s in samples], args.join_copies))
    names = ", ".join([D.KNOWN_COPIES_FILE.name] + [Path(f).name for f in args.join_copies])
    print(f"near-duplicate groups (phash <= {args.max_distance} bits, mirrored or half-turned copies, and "
          f"copies {names} list: {listed} pairs among these files"
          + (f"; the slices of each of {patients} TCGA patients are one group" if patients else
             "; no TCGA patient id found in the file or folder names") + f"): {len(groups)} groups, "
          f"{len(multi)} with more than one image, {sum(groups[g] for g in multi)} images in them; "
          f"largest: {groups.most_common(1)[0][1]}")
    members: dict[str, list[str]] = {}   # one pass: a scan per group was quadratic in the images
    for s in samples:
        if groups[s.group] > 1:
            members.setdefault(s.group, []).append(printable_path(s.rel))
    members = {g: sorted(v) for g, v in members.items()}
    for g in sorted(multi, key=lambda g: (-len(members[g]), members[g][0]))[:20]:  # largest first
        shown = members[g][:6]
        print(f"  group of {len(members[g])}: {', '.join(shown)}"
              + (f", ... (+{len(members[g]) - 6})" if len(members[g]) > 6 else ""))
    if len(multi) > 20:
        print(f"  ... and {len(multi) - 20} more groups")
    if (mixed := D.mixed_label_groups(samples)):
        print(f"groups whose labels disagree: {len(mixed)}, {sum(sum(c.values()) for c in mixed)} images; largest: "
              + ", ".join(f"{n} {lab}" for lab, n in mixed[0].most_common())
              + " (a copy under two labels is a labelling error; a hash link between"
              " different scans of no known patient joins groups too. A group is split as one: these cost"
              " stratification)")


def cmd_mark_copies(args) -> int:
    from .evaluation import mark_copies
    from .ood import require_model_folder
    require_model_folder(args.weights, "split.json", "eval.json")   # before the whole dataset is hashed
    mark_copies(args.weights, args.data_config, args.copy_list or ())
    return 0


def cmd_seen_files(args) -> int:
    from .evaluation import mark_seen_files
    from .ood import require_model_folder
    require_model_folder(args.weights, "split.json")
    mark_seen_files(args.weights, args.data_config)
    return 0


def cmd_rescore(args) -> int:
    from .evaluation import rescore
    for w in args.weights:
        rescore(w)
    return 0


def integer_at_least(low: int):
    """argparse type: an integer >= ``low`` (0 runs or -1 slices is a usage error, not a crash later)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} must be at least {low}")
        return v
    return parse


_non_negative = integer_at_least(0)


def output_problem(flag: str, path: str | Path, example: str | None = None) -> str | None:
    """Why an output file cannot be written at ``path`` (checked before a long run, not after
    it), or None. ``example`` names a file to suggest when ``path`` is a folder."""
    out = Path(path)
    try:
        os.stat(out)
    except OSError as e:   # is_dir and is_file say False for a loop of links, and writing it fails late
        if e.errno == errno.ELOOP:
            return f"{flag} {path}: its links lead round in a loop, to no file"
    if out.is_dir():
        return f"{flag} {path} is a folder; give a file name" + (f" such as {out / example}" if example else "")
    if not out.parent.is_dir():
        return f"{flag} {path}: the folder {out.parent} does not exist"
    try:  # a real probe: os.access says yes to root even where nothing can be written (/proc)
        if out.is_file():   # a file, or a link to one
            with open(out, "a"):
                pass
        elif not os.path.lexists(out):
            with open(out, "x"):
                pass
            out.unlink()
        elif out.is_symlink() and not out.exists():  # a link (or a chain) to a file not made yet
            target = Path(os.path.realpath(out))
            if not target.parent.is_dir():
                return f"{flag} {path}: it links to {target}, whose folder does not exist"
        # else a pipe or a device: opening it now would consume it
    except OSError as e:
        return f"{flag} {path}: cannot be written ({e.strerror or e})"
    return None


def _writable_file(path: str) -> Path:
    if (why := output_problem("--json", path, "eval.json")):
        raise ValueError(why)
    return Path(path)


def _print_skipped(errors: list[dict], most: int = 3) -> None:
    """One line per skipped file, but one per folder for more than ``most`` of one folder skipped
    for one reason: a yes/no folder against a three-type model printed 120 identical lines. The
    JSON keeps every file."""
    groups: dict[int | tuple, list[dict]] = {}
    for k, e in enumerate(errors):
        folder = str(PurePosixPath(e["file"]).parent)
        # a skipped folder ('astro/'), or a file loose at the root, is named on its own line
        alone = e["file"].endswith("/") or folder == "."
        groups.setdefault(k if alone else (e.get("source"), folder, e["error"]), []).append(e)
    for files in groups.values():
        first = files[0]
        where = f"{first['source']}: " if "source" in first else ""
        if len(files) > most:
            folder = str(PurePosixPath(first["file"]).parent)
            print(f"skipped {where}{printable_path(folder)}/ ({len(files)} files): {first['error']}", file=sys.stderr)
            continue
        for e in files:
            print(f"skipped {where}{printable_path(e['file'])}: {e['error']}", file=sys.stderr)


# the trust figures too: accuracy and tumours missed count every scan, refused ones included, so
# the summary must say how many were refused and how many misses went without any flag
SOURCE_SUMMARY = ("n", "n_fine", "accuracy", "tumour_missed", "silent_misses", "flagged_ood", "referred_uncertain",
                  "sensitivity", "specificity", "ece", "tumour_ece")


def cmd_evaluate(args) -> int:
    from .evaluation import NothingToScore, evaluate_dirs, json_text
    to_stdout = args.json == "-"   # the whole JSON on stdout; the summary moves to stderr
    out = _writable_file(args.json) if args.json and not to_stdout else None
    pred = _predictor(args.weights)
    try:
        ev = evaluate_dirs(pred, args.data_dir)
    except NothingToScore as e:
        _print_skipped(e.errors)
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {k: ev.get(k) for k in ("model", "scored_as", "n", "n_fine", "accuracy", "macro_f1", "tumour_missed",
                                      "silent_misses", "normal_flagged", "flagged_ood", "referred_uncertain",
                                      "sensitivity", "specificity", "ece", "tumour_ece")
               if k not in ("scored_as", "silent_misses") or k in ev}
    if "per_source" in ev:
        summary["per_source"] = {s: {k: m.get(k) for k in SOURCE_SUMMARY if k in m} for s, m in ev["per_source"].items()}
    print(json_text(summary, indent=1), file=sys.stderr if to_stdout else sys.stdout)
    _print_skipped(ev["errors"])
    what = ev["evaluated"]
    print("evaluated: " + ("; ".join(f"{k}: {v}" for k, v in what.items()) if isinstance(what, dict) else what),
          file=sys.stderr)
    if to_stdout:
        print(json_text(ev, indent=1))
    elif out:
        out.write_text(json_text(ev, indent=1))
    return 0


def cmd_predict(args) -> int:
    from .evaluation import json_text
    from .inference import iter_predictions
    from .report import call_of, series_lines, strict_name, text_line
    from .labels import cannot_rule_out
    from .audit_log import model_fields
    pred = _predictor(args.weights)
    if (note := cannot_rule_out(pred.classes)):   # stderr: stdout stays one line per file
        print(f"note: {note}", file=sys.stderr)
    read_kw = {} if args.slice is None else {"slice": args.slice}
    model = model_fields(pred)   # a line kept apart from its run still names the model, card and gate behind it
    if not args.json:
        print(f"model: {model['model']} (weights SHA-256 {model['weights_sha256'][:16]})", file=sys.stderr)
    results = []
    for r in iter_predictions(pred, [(f, f) for f in args.files], best_slice=args.best_slice, **read_kw):
        # `call`: what a user is told (null for a scan the out-of-distribution check refuses, a cat
        # photo); `pred` stays the model's raw output, which evaluation and the audit log keep
        r = {**r, "call": call_of(r) or None, **model} if r["ok"] else r
        r["file"] = strict_name(r["file"])   # an undecodable byte as \xNN: strict JSON, as text mode prints it
        print(json_text(r) if args.json else text_line(r), flush=True)   # each line as it is ready
        results.append(r)
    for line in series_lines(results):  # stdout stays one line per file
        print(line, file=sys.stderr)
    # a refused input (a photo) has probabilities but no call: a script checking the exit status
    # alone must not take it for a scan read as 'no tumour'
    return 0 if all(r["ok"] and r.get("in_distribution", True) for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("audit", help="counts, sizes, duplicate groups and cross-split leaks")
    a.add_argument("data_dir"); a.add_argument("--max-distance", type=_non_negative, default=6)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--join-copies", action="append", default=[], metavar="TSV",
                   help="a known-copies list of this data (bench/copy_audit.py --split all --data ... writes one): "
                        "its pairs are grouped and counted as leaks too, as train.py --join-copies does")
    a.set_defaults(fn=cmd_audit)
    e = sub.add_parser("evaluate", help="evaluate class-per-folder directories (several: each one source, "
                                        "reported apart in per_source)",
                       description="Score labelled scans: DATA_DIR/<class>/* (glioma_tumor, Brain_Menin, no, yes ... "
                                   "are mapped to the model's classes; a yes/no folder is scored as tumour vs no "
                                   "tumour), or DATA_DIR/Training + Testing, of which Testing/ alone is scored "
                                   "(else Validation/; a Training/ alone is scored whole, and said so). Prints the "
                                   "summary (accuracy, macro F1, tumours missed, ECE ...) and the files it skipped, "
                                   "with why. Exit 0; 1 when no file could be scored; 2 on a usage error, or a "
                                   "folder, output or model that cannot be used.")
    e.add_argument("data_dir", nargs="+", help="class-per-folder directories (several: each one source)")
    e.add_argument("--weights", help="model folder (default: $BT_WEIGHTS, else the one weights/DEFAULT names)")
    e.add_argument("--json", help="write the whole evaluation (metrics, per-class, confusion, one record per "
                                  "file) to this file; '-' prints it on stdout (the summary then goes to stderr)")
    e.set_defaults(fn=cmd_evaluate)
    pr = sub.add_parser("predict", help="predict image, DICOM or NIfTI files",
                        description="One line per file, in order. Exit 0 when every file was predicted, 1 when "
                                    "some failed or were refused by the out-of-distribution check (no call), "
                                    "2 on a usage error.")
    pr.add_argument("files", nargs="+"); pr.add_argument("--weights")
    pr.add_argument("--json", action="store_true", help="one JSON object a line")
    which = pr.add_mutually_exclusive_group()
    which.add_argument("--slice", type=_non_negative, help="the slice (NIfTI) or frame (DICOM, TIFF/GIF) "
                                                            "to predict; default: the middle one (NIfTI, DICOM), "
                                                            "the first page (TIFF/GIF), as the app shows it")
    which.add_argument("--best-slice", action="store_true",
                       help="each volume's most tumour-like slice that passes the out-of-distribution check")
    pr.set_defaults(fn=cmd_predict)
    mc = sub.add_parser("mark-copies", help="mark eval.json's test records that have a copy "
                                            "(near duplicate, mirrored or turned) in training, and "
                                            "rewrite seen_sha256.txt with them")
    mc.add_argument("--weights", required=True)
    mc.add_argument("--data-config", help="TOML whose [[data]] entries name the source roots")
    mc.add_argument("--copy-list", action="append", metavar="TSV",
                    help="also mark the images this list names (source, file, train_source, train_file "
                         "columns; bench/copy_audit.py --out writes one); repeatable")
    mc.set_defaults(fn=cmd_mark_copies)
    sf = sub.add_parser("seen-files", help="list the SHA-256 of every file the model trained or was validated "
                                           "on (seen_sha256.txt): an upload of one is flagged 'seen in training'")
    sf.add_argument("--weights", required=True)
    sf.add_argument("--data-config", help="TOML whose [[data]] entries name the source roots")
    sf.set_defaults(fn=cmd_seen_files)
    rs = sub.add_parser("rescore", help="recompute eval.json's summary and the card's metrics from "
                                        "the stored per-image records (no data needed)")
    rs.add_argument("weights", nargs="+", help="weights directories holding eval.json")
    rs.set_defaults(fn=cmd_rescore)
    # Subcommands that live beside the code they drive: each module has add_cli(subparsers).
    import importlib
    for mod in PLUGIN_MODULES:
        importlib.import_module(f".{mod}", __package__).add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name the console cannot encode must not end a batch
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)  # argparse exits 2 on a usage error
    try:
        return args.fn(args)
    except BrokenPipeError:  # `... | head`: the reader has gone; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, ValueError) as e:  # missing, unreadable or unwritable paths; bad values
        print(f"error: {e}", file=sys.stderr)
        return 2
