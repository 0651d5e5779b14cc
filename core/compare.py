"""`python -m core compare weights/* runs/*` - one row per trained model, from its card.json.

Rows: name, classes, training sources, test accuracy, macro F1, tumours missed, ECE, parameters,
file size, CPU latency (1 thread, median single-image forward), training time, device and the
settings it was trained at, with "reduced" where its config says the run was cut down; and from
eval.json the test images with a copy in training and the figures without them (`copy_free`).
`compare_rows(dirs)` gives the same rows to the app.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

from .data import read_card, source_of

# The keys the dashboard also accepts for a latency recorded in a card (ms per image).
_LATENCY_KEYS = ("latency_ms", "cpu_latency_ms")
_BENCH_KEYS = ("latency_ms", "cpu_ms", "ms_per_image", "p50_ms")
REPEATS = 20   # timed forwards per model


# ----------------------------------------------------------------------------- finding models
def model_dirs(paths: list[str | Path]) -> list[Path]:
    """Directories holding a card.json, in the order given, each once.

    A path without a card of its own contributes its immediate subdirectories that have one,
    so `compare weights runs` works as well as `compare weights/* runs/*`. Files (such as
    weights/DEFAULT) and card-less folders (runs/logs) are passed over.
    """
    found, seen = [], set()
    for p in map(Path, paths):
        if not p.is_dir():
            continue
        cands = [p] if (p / "card.json").is_file() else sorted(
            d for d in p.iterdir() if d.is_dir() and (d / "card.json").is_file())
        for d in cands:
            key = d.resolve()
            if key not in seen:
                seen.add(key)
                found.append(d)
    return found


# ----------------------------------------------------------------------------- latency
def card_latency(card: dict) -> float | None:
    """A latency (ms) the card already records, if any."""
    for key in _LATENCY_KEYS:
        if isinstance(card.get(key), (int, float)):
            return float(card[key])
    bench = card.get("benchmark") or card.get("latency") or {}
    if isinstance(bench, (int, float)):
        return float(bench)
    if isinstance(bench, dict):
        for key in _BENCH_KEYS:
            if isinstance(bench.get(key), (int, float)):
                return float(bench[key])
    return None


# what measure_latency times, as a card says it (the Model card page quotes it)
LATENCY_WHAT = ("median classifier forward of one prepared image (decoding, preprocessing and the gate "
                "not included: `bench/latency.py` times the whole served path)")


def measure_latency(weights_dir: str | Path, repeats: int = REPEATS, warmup: int = 3) -> tuple[float, str]:
    """(median single-image forward time in ms on one CPU thread, the precision it ran in), in
    the served precision (`Predictor.probabilities`: bf16 autocast on CPUs with native bf16), on
    an input already decoded and preprocessed, without the gate.

    One thread because that is what a shared CPU server gives each request, and it makes
    numbers comparable between machines with different core counts.
    """
    import torch
    from .inference import Predictor
    pred = Predictor(weights_dir, device="cpu")
    size = int(pred.spec.get("size", 192))
    x = torch.rand(1, 1, size, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        with torch.inference_mode():
            for k in range(warmup + repeats):
                t0 = time.perf_counter()
                pred.probabilities(x)
                if k >= warmup:
                    times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times), pred.precision


# ----------------------------------------------------------------------------- test sets
class UnusableFile(ValueError):
    """A model folder's file that cannot be used; its message names the file."""


def _stored_eval(weights_dir: str | Path) -> dict:
    """eval.json with what compare reads of each record (its file, label and call) checked; {}
    when there is none. `UnusableFile` naming it when it cannot be used (a traceback before)."""
    path = Path(weights_dir) / "eval.json"
    if not path.is_file():
        return {}
    try:
        ev = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnusableFile(f"{path} cannot be used: not JSON ({e})") from None
    records = ev.get("predictions") if isinstance(ev, dict) else None
    if not isinstance(records, list):
        raise UnusableFile(f"{path} cannot be used: no list of per-image predictions")
    for k, r in enumerate(records):
        if not (isinstance(r, dict) and all(isinstance(r.get(f), str) for f in ("file", "label", "pred"))):
            raise UnusableFile(f"{path} cannot be used: its record {k + 1} has no file, label or call")
    return ev


def _card_classes(weights_dir: Path) -> list[str]:
    """The card's class list; ValueError naming the card when it has none."""
    path = weights_dir / "card.json"
    try:
        classes = read_card(weights_dir).get("classes")
    except ValueError:   # damaged, or no JSON object
        classes = None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise UnusableFile(f"{path} cannot be used: it names no list of classes")
    return classes


def _keyed(ev: dict) -> dict[tuple[str, str], dict]:
    return {(source_of(r), r["file"]): r for r in ev.get("predictions", [])}


def test_records(weights_dir: str | Path) -> dict[tuple[str, str], dict]:
    """eval.json's test records keyed by (source, file); {} when there is no eval.json."""
    return _keyed(_stored_eval(weights_dir))


def test_set_code(records: dict) -> str | None:
    """8 hex digits naming the set of test images: two rows with different codes were tested on
    different images (each run draws its own grouped split), so their figures are not paired."""
    if not records:
        return None
    return hashlib.sha1("\n".join(f"{s}/{f}" for s, f in sorted(records)).encode(errors="surrogateescape")).hexdigest()[:8]


def paired(a: str | Path, b: str | Path, with_copies: bool = False) -> dict:
    """Two models on the test images both were tested on, per source: each one's accuracy, the
    images only one of them gets right, and an exact p-value (`mcnemar`: McNemar's test, with one
    patient's slices as one unit). Each model is judged at its own operating point (its card's
    threshold), as it serves. Side-by-side rows of
    `compare` come from different splits; only this says which model is better on the same
    images (a shared test image is in neither model's training split). Images with a copy in either
    model's training split (``copy_in_training``) are left out, as the Evaluation page does by
    default, unless ``with_copies``."""
    from .data import patient_id
    from .evaluation import call_is_right
    a, b = Path(a), Path(b)
    ra, rb = test_records(a), test_records(b)
    if not ra or not rb:
        raise ValueError(f"no eval.json in {a if not ra else b}: train.py writes it")
    ca, cb = _card_classes(a), _card_classes(b)
    judged_on = None
    if set(ca) != set(cb):   # a yes/no model's right call and a typed model's are not one task:
        ca = cb = []         # both are judged on the call they share, tumour or no tumour
        judged_on = "tumour vs no tumour (the models' classes differ)"
    both = sorted(set(ra) & set(rb))
    shared = both if with_copies else [k for k in both if not (ra[k].get("copy_in_training")
                                                             or rb[k].get("copy_in_training"))]
    # a run never marked (trained before 2026-12-06, when train.py began to; `mark-copies`) has no copy to leave out
    unmarked = [] if with_copies else [str(d) for d, r in ((a, ra), (b, rb))
                                       if not any("copy_in_training" in x for x in r.values())]
    out = {"a": str(a), "b": str(b), "shared": len(both), "copies_left_out": len(both) - len(shared),
           "copies_unmarked": unmarked, "judged_on": judged_on, "per_source": {}}
    for src in sorted({s for s, _ in shared}) + ["all"]:
        keys = [k for k in shared if src == "all" or k[0] == src]
        judged = [(k, h, g) for k, h, g in ((k, call_is_right(ra[k], ca), call_is_right(rb[k], cb)) for k in keys)
                  if h is not None and g is not None]
        if not judged:
            continue
        pairs = [(h, g) for _, h, g in judged]
        # slices of one patient (LGG's file names give it) are one unit of the test, not many
        groups = [None if (pid := patient_id(k[1])) is None else f"{k[0]}/{pid}" for k, _, _ in judged]
        out["per_source"][src] = {"n": len(pairs), "a": sum(h for h, _ in pairs) / len(pairs),
                                  "b": sum(g for _, g in pairs) / len(pairs), **mcnemar(pairs, groups)}
    return out


def mcnemar(pairs: list[tuple[bool, bool]], groups: list[str | None] | None = None) -> dict:
    """(A right, B right) per image -> the images only A and only B get right, and an exact
    two-sided p-value for "A and B are equally good" (1.0 when they never disagree).

    Without ``groups`` (or with every image its own) this is the exact McNemar test, a binomial
    test on the discordant images. Images that share a group (slices of one patient: ``groups``
    gives its id, None for an image of its own) are not independent: one patient's slices went
    3 of 6 one way in a comparison of 432 LGG slices. They then count as one unit: an exact
    sign-flip test over the units, each unit's difference (only A right minus only B right)
    equally likely to have either sign. With single images it is McNemar's test again."""
    if groups is not None and len(groups) != len(pairs):
        raise ValueError(f"{len(pairs)} pairs and {len(groups)} groups")
    a_only = sum(h and not g for h, g in pairs)
    b_only = sum(g and not h for h, g in pairs)
    diff: dict[object, int] = {}
    for i, ((h, g), key) in enumerate(zip(pairs, groups or [None] * len(pairs))):
        if h != g:
            unit = ("group", key) if key is not None else ("image", i)
            diff[unit] = diff.get(unit, 0) + (1 if h else -1)
    units = [abs(d) for d in diff.values() if d]
    out = {"a_only": a_only, "b_only": b_only, "p": _sign_flip_p(units, abs(a_only - b_only)) if units else 1.0}
    if any(k is not None for k in (groups or [])):
        out["units"] = len(units)   # patients and single images that disagree, what the p-value counts
    return out


def _sign_flip_p(units: list[int], observed: int) -> float:
    """P(|sum of +-u| >= observed) with every sign a fair coin: the exact distribution of the
    sum, built one unit at a time (integers, so a table of at most 2 x sum(units) + 1 entries)."""
    total = sum(units)
    dist = [0.0] * (2 * total + 1)
    dist[total] = 1.0
    for u in units:
        nxt = [0.0] * len(dist)
        for v, q in enumerate(dist):
            if q:
                nxt[v - u] += q / 2
                nxt[v + u] += q / 2
        dist = nxt
    return min(1.0, sum(q for v, q in enumerate(dist) if abs(v - total) >= observed))


def paired_calls(pairs: list[tuple[dict, dict]]) -> dict:
    """Two runs' records of the same images ({label, pred} each, matched by the caller): per call
    (the type right, where the label gives one; a tumour found, a tumour-free image right), how many images it counts, how
    many each run gets right, the images only one run gets right and the exact p-value (`mcnemar`;
    slices of one patient, where the file names give it, as one unit)."""
    from .data import patient_id
    from .labels import NO_TUMOUR, TUMOUR, is_tumour_label
    # a tumour is found by a tumour call, not by 'anything but notumor' (a 'stroke' call misses it)
    calls = {"accuracy": (lambda r: r["label"] != TUMOUR, lambda r: r["pred"] == r["label"]),  # coarse: no type
             "tumours_found": (lambda r: is_tumour_label(r["label"]) is True, lambda r: bool(is_tumour_label(r["pred"]))),
             "normals_right": (lambda r: r["label"] == NO_TUMOUR, lambda r: not is_tumour_label(r["pred"]))}
    out = {"n": len(pairs)}
    for name, (counts, right) in calls.items():
        kept = [(ra, rb) for ra, rb in pairs if counts(ra)]
        hits = [(right(ra), right(rb)) for ra, rb in kept]
        m = mcnemar(hits, [patient_id(ra.get("file", "")) for ra, _ in kept])   # a patient's slices: one unit
        out[name] = {"n": len(hits), "a_right": sum(h for h, _ in hits), "b_right": sum(g for _, g in hits),
                     **m, "p": round(float(m["p"]), 6)}
    return out


def paired_text(res: dict) -> str:
    a, b = Path(res["a"]).name, Path(res["b"]).name
    copies = res.get("copies_left_out", 0)
    lines = [f"{a} (A) against {b} (B) on the {res['shared']} test images both were tested on"
             + (f", less {copies} with a copy in either model's training split" if copies else "")
             + (f", judged on {res['judged_on']}" if res.get("judged_on") else "") + ":",
             "source      n     A        B        only A right  only B right  p"]
    for src, r in res["per_source"].items():
        lines.append(f"{src:10s} {r['n']:5d}  {100 * r['a']:6.2f}%  {100 * r['b']:6.2f}%  {r['a_only']:12d}  "
                     f"{r['b_only']:12d}  {r['p']:.3g}")
    if not res["per_source"]:
        lines.append("(no image in common: the two runs were tested on different splits)")
    else:
        lines.append("p: exact McNemar test; where file names give the patient (LGG) one patient's slices count "
                     "as one unit (an exact sign-flip test over patients). Each model at its own threshold.")
    for d in res.get("copies_unmarked") or []:
        lines.append(f"Note: {Path(d).name}'s test records were never marked for copies in its training split, "
                     f"so its test images with one are counted here (python -m core mark-copies --weights {d}).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- rows
def _settings(tr: dict, cfg: dict) -> dict:
    aug = tr.get("augmentation") or {}
    return {"img": tr.get("img"), "epochs": tr.get("epochs"), "epochs_run": tr.get("epochs_run"),
            "batch_size": tr.get("batch_size"), "precision": tr.get("precision"),
            "aug": aug.get("strength"), "skull_strip_p": aug.get("skull_strip_p"),
            "aug_wide": _widened(aug), "world_size": tr.get("world_size", 1),
            "reduced": cfg.get("reduced") or tr.get("reduced"),
            "reported": cfg.get("reported"), "overridden": _overridden(tr, cfg)}


def _widened(aug: dict) -> str | None:
    """'rotate 45, turns 0.25, blur 0.3' where train.py's geometric/blur options left their defaults."""
    from .engine import AUG_OPTION_DEFAULTS
    words = {"rotate": "rotate", "shear": "shear", "turn_p": "turns", "blur_p": "blur", "gamma_log": "ln gamma",
             "lesion_dim_p": "dimmed lesions", "strip_crop_p": "stripped + cropped",
             "marks_p": "marks"}
    parts = [f"{words[k]} {aug[k]:g}" for k, d in AUG_OPTION_DEFAULTS.items() if aug.get(k, d) != d]
    return ", ".join(parts) or None


def _overridden(tr: dict, cfg: dict) -> list[str]:
    """Settings the command line changed from the config (a smoke run of a seed config)."""
    actual = {"img": tr.get("img"), "epochs": tr.get("epochs"), "batch_size": tr.get("batch_size"),
              "aug": (tr.get("augmentation") or {}).get("strength")}
    return [f"{k}={actual[k]} (config {cfg[k]})" for k in actual
            if k in cfg and actual[k] is not None and actual[k] != cfg[k]]


def settings_text(row: dict) -> str:
    """'128 px, 12/12 epochs, aug 1.0, bf16' plus 'REDUCED: why' when the config says so."""
    parts = []
    if row.get("img"):
        parts.append(f"{row['img']} px")
    if row.get("epochs"):
        run = row.get("epochs_run")
        unit = "epoch" if row["epochs"] == 1 else "epochs"
        parts.append(f"{run}/{row['epochs']} {unit}" if run not in (None, row["epochs"])
                     else f"{row['epochs']} {unit}")
    if row.get("aug") is not None:
        parts.append("no aug" if not row["aug"] and not row.get("skull_strip_p")
                     else f"aug {row['aug']}" + (f" ({row['aug_wide']})" if row.get("aug_wide") else ""))
    if row.get("precision"):
        parts.append(row["precision"])
    if (row.get("world_size") or 1) > 1:
        parts.append(f"{row['world_size']} processes")
    if row.get("overridden"):
        parts.append("config overridden: " + ", ".join(row["overridden"]))
    text = ", ".join(parts)
    return f"{text}; REDUCED: {row['reduced']}" if row.get("reduced") else text


def card_row(weights_dir: str | Path, latency: bool = True, repeats: int = REPEATS) -> dict:
    """One comparison row for a model directory (card.json, model.safetensors)."""
    from .inference import training_sources
    d = Path(weights_dir)
    card = read_card(d)
    m, tr = card.get("metrics") or {}, card.get("training") or {}
    cfg = tr.get("config") or {}
    row = {"name": card.get("name", d.name), "dir": str(d), "arch": card.get("arch"),
           "task": card.get("task"), "classes": card.get("classes", []),
           "sources": training_sources(card), "test_images": m.get("n"), "typed_test_images": m.get("n_fine"),
           "accuracy": m.get("accuracy"),
           "accuracy_per_source": {k: v.get("accuracy") for k, v in (m.get("per_source") or {}).items()},
           "macro_f1": m.get("macro_f1"),
           "tumour_missed": m.get("tumour_missed"), "sensitivity": m.get("sensitivity"),
           "specificity": m.get("specificity"), "ece": m.get("ece"),
           "parameters": card.get("parameters"), "weights_file_bytes": card.get("weights_file_bytes"),
           "latency_ms": card_latency(card), "latency_from": None, **_test_set(d, card),
           "train_time_s": tr.get("train_time_s"), "device": tr.get("device"),
           **_settings(tr, cfg)}
    if row["latency_ms"] is not None:
        row["latency_from"] = "card"
    elif latency:
        try:
            ms, precision = measure_latency(d, repeats)
            row["latency_ms"], row["latency_from"] = ms, f"measured, 1 thread, {precision}"
        except Exception as e:  # a broken model must not hide the other rows
            row["latency_from"] = f"not measured ({type(e).__name__}: {e})"
    row["settings"] = settings_text(row)
    return row


def _test_set(d: Path, card: dict) -> dict:
    """The test-set code, the tumours the counts of missed ones are out of, and the copy-free figures."""
    from .inference import training_sources
    ev = _stored_eval(d)
    bench = benchmark_part(ev, training_sources(card))
    return {"test_set": test_set_code(_keyed(ev)),
            "n_tumour": ev.get("n_tumour"), "benchmark_missed": bench.get("tumour_missed"),
            "benchmark_n_tumour": bench.get("n_tumour"), **_copy_free_of(d, ev, card)}


def _copy_free_of(d: Path, ev: dict, card: dict) -> dict:
    """`copy_free`, its failure named as eval.json's (records without probabilities)."""
    try:
        return copy_free(ev, card)
    except (KeyError, TypeError, ValueError) as e:
        raise UnusableFile(f"{Path(d) / 'eval.json'} cannot be used: its records lack {e}") from None


def benchmark_part(m: dict, sources: list[str]) -> dict:
    """The benchmark's figures among metrics ``m``: its per-source block, or all of ``m`` for a
    model that learnt from the benchmark alone (its eval.json has no per-source blocks); else {}."""
    per = (m.get("per_source") or {}).get("benchmark")
    return per if per is not None else m if sources == ["benchmark"] else {}


COPY_FREE = ("copies_in_training", "copy_free_n", "copy_free_accuracy", "copy_free_accuracy_per_source",
             "copy_free_benchmark_missed", "copy_free_benchmark_n_tumour")


def copy_free(ev: dict, card: dict) -> dict:
    """The figures over the test images without a copy in training (`without_copies`), at the
    card's operating point: the card's count every test image, and a test image whose copy was
    trained on flatters the model (the previous default's 98.1 % benchmark accuracy is 97.0 %
    without). All None where eval.json's records were never marked (`python -m core mark-copies`)."""
    from .evaluation import evaluate_records, without_copies
    from .inference import card_threshold, training_sources
    records = ev.get("predictions") or []
    kept, n_copies = without_copies(records)
    if not kept or not any("copy_in_training" in r for r in records):
        return dict.fromkeys(COPY_FREE)
    m = evaluate_records(kept, card["classes"], card_threshold(card))
    bench = benchmark_part(m, training_sources(card))
    return dict(zip(COPY_FREE, (n_copies, len(kept), m.get("accuracy"),
                                {k: v.get("accuracy") for k, v in (m.get("per_source") or {}).items()},
                                bench.get("tumour_missed"), bench.get("n_tumour"))))


def compare_rows(dirs: list[str | Path], latency: bool = True, repeats: int = REPEATS) -> list[dict]:
    """Rows for every directory (or its subdirectories) with a card.json; see `card_row`."""
    return [_row_or_problem(d, latency, repeats) for d in model_dirs(dirs)]


def _row_or_problem(d: Path, latency: bool, repeats: int) -> dict:
    """`card_row`, or a row naming the broken card: one bad model must not hide the others."""
    try:
        return card_row(d, latency, repeats)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        why = str(e) if isinstance(e, UnusableFile) else f"{Path(d) / 'card.json'} cannot be read: {e or type(e).__name__}"
        return {"name": Path(d).name, "dir": str(d), "classes": [], "sources": [], "problem": why,
                "settings": why, **dict.fromkeys(("accuracy", "macro_f1", "tumour_missed", "ece",
                                                  "parameters", "train_time_s", "latency_ms",
                                                  "latency_from"))}


# ----------------------------------------------------------------------------- formatting
def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _duration(s) -> str:
    if s is None:
        return "-"
    s = round(s)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def _accuracy(r: dict, key: str = "accuracy") -> str:
    """Overall accuracy; for a multi-source model also on the benchmark part of its test split,
    the number closest to what the benchmark-only seed systems report."""
    bench = (r.get(f"{key}_per_source") or {}).get("benchmark")
    typed = r.get("typed_test_images") if key == "accuracy" and r.get(key) is not None else None
    counted = isinstance(typed, int) and not isinstance(typed, bool) and isinstance(r.get("test_images"), int)
    over = f" of {typed} typed" if counted and typed != r["test_images"] else ""   # Br35H's tumours have no type
    return _pct(r.get(key)) + over + (f" (benchmark {_pct(bench)})" if bench is not None else "")


def copy_free_text(r: dict) -> str:
    """'96.6% (benchmark 96.6%), benchmark missed 1 of 600': the figures without copies in training."""
    if r.get("copy_free_accuracy") is None:
        return "-"
    missed = r.get("copy_free_benchmark_missed")
    return _accuracy(r, "copy_free_accuracy") + ("" if missed is None else
                                                 f", benchmark missed {missed} of {r['copy_free_benchmark_n_tumour']}")


def _classes(classes: list[str]) -> str:
    return "/".join(classes) if len(classes) <= 2 else f"{len(classes)}-class"


COLUMNS = ("model", "classes", "sources", "test n", "test set", "accuracy", "macro F1", "tumours missed",
           "ECE", "copies", "copy-free", "params", "size", "CPU latency", "train time", "device", "settings")

# Said wherever the rows are shown (terminal, Markdown, the Training page): the card's figures
# rank a model whose test images have twins in its training split above one without.
COPIES_NOTE = ("Accuracy, macro F1, tumours missed and ECE are the card's, over the whole test split, including "
               "those with a copy (near duplicate, mirrored or turned) in the model's training split "
               "('copies'); the copy-free figures leave those out, at the card's operating point. "
               "Compare models on the copy-free figures.")


def missed_text(r: dict) -> str:
    """'30 of 983 (benchmark 2 of 614)': counts over different numbers of tumours do not compare."""
    if r.get("tumour_missed") is None:
        return "-"
    text = str(r["tumour_missed"]) + (f" of {r['n_tumour']}" if r.get("n_tumour") else "")
    if r.get("benchmark_missed") is not None and r.get("sources") != ["benchmark"]:
        text += f" (benchmark {r['benchmark_missed']} of {r['benchmark_n_tumour']})"
    return text


def display_row(r: dict) -> list[str]:
    size = r.get("weights_file_bytes")
    lat = r.get("latency_ms")
    return [r["name"], _classes(r["classes"]), "+".join(r["sources"]) or "-",
            _num(r.get("test_images"), "d"), r.get("test_set") or "-", _accuracy(r), _num(r["macro_f1"], ".3f"),
            missed_text(r), _num(r["ece"], ".3f"), _num(r.get("copies_in_training"), "d"), copy_free_text(r),
            "-" if r["parameters"] is None else f"{r['parameters'] / 1e6:.2f} M",
            "-" if size is None else f"{size / 2**20:.1f} MiB",
            "-" if lat is None else f"{lat:.1f} ms", _duration(r["train_time_s"]),
            r.get("device") or "-", r["settings"]]


def to_markdown(rows: list[dict]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731 - a cell must not open a column
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(esc(c) for c in display_row(r)) + " |" for r in rows]
    notes = [f"- **{r['name']}** public seed reported: {r['reported']}" for r in rows if r.get("reported")]
    codes = {r.get("test_set") for r in rows if r.get("test_set")}
    foot = ["", "Test metrics are on each run's own grouped (near-duplicate-free) test split"
            + (f": {len(codes)} different test sets among these rows (the 'test set' code), so "
               "a difference between two rows is not a paired comparison; `python -m core compare A B "
               "--paired` compares two models on the images both were tested on. " if len(codes) > 1 else ". ")
            + "CPU latency: single image, 1 thread, median; from the card where it has one (its "
            "benchmark.what says which pass: cards recorded before 2026-12-03 timed the fp32 "
            "forward alone), else measured now on the served pass (bf16 on CPUs with it). " + COPIES_NOTE]
    return "\n".join(lines + foot + ([""] + notes if notes else [])) + "\n"


def to_text(rows: list[dict]) -> str:
    """An aligned plain-text table for the terminal."""
    table = [list(COLUMNS)] + [display_row(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines + ["", COPIES_NOTE])


# ----------------------------------------------------------------------------- CLI
def record_latency(rows: list[dict]) -> None:
    """Store each freshly measured latency in its card, so the app can show it without timing."""
    import platform
    for r in rows:
        if r["latency_ms"] is None or r["latency_from"] == "card":
            continue
        path = Path(r["dir"]) / "card.json"
        card = json.loads(path.read_text())
        card["benchmark"] = {"latency_ms": round(r["latency_ms"], 2), "threads": 1,
                             "what": f"{LATENCY_WHAT}, CPU ({r['latency_from']})",
                             "machine": platform.processor()
                             or platform.machine(), "command": "python -m core compare --record"}
        from .evaluation import write_json
        write_json(path, card)   # atomic: a stopped run must not leave a truncated card


def cmd_compare(args) -> int:
    from .cli import output_problem
    for flag, path in (("--md", args.md), ("--json", args.json)):  # before minutes of timing
        # a missing folder is made below; an existing one is probed for a write now
        if path and (Path(path).is_dir() or Path(path).parent.is_dir()) and (why := output_problem(flag, path)):
            raise ValueError(why)
    # a flag silently ignored reads as obeyed
    if args.paired and (unused := [f for f, on in (("--md", args.md), ("--record", args.record), ("--no-latency",
                                   args.no_latency), ("--repeats", args.repeats is not None)) if on]):
        raise ValueError(f"{', '.join(unused)}: not used by --paired")
    if not args.paired and args.with_copies:
        raise ValueError("--with-copies is for --paired only")
    if not args.paired and args.no_latency and args.repeats is not None:
        raise ValueError("--repeats times the latency, which --no-latency skips")
    args.repeats = REPEATS if args.repeats is None else args.repeats
    missing = [d for d in args.dirs if not Path(d).exists()]   # weights/* holds the file DEFAULT: passed over
    if missing:
        raise ValueError(f"no such folder: {', '.join(missing)}")
    if args.paired:
        dirs = model_dirs(args.dirs)
        if len(dirs) != 2:
            same = len(args.dirs) == 2 and Path(args.dirs[0]).resolve() == Path(args.dirs[1]).resolve()
            raise ValueError("--paired was given the same model twice" if same else
                             f"--paired compares exactly two model folders (with a card.json); found {len(dirs)}"
                             + (f" in {' '.join(args.dirs)}" if dirs else ""))
        res = paired(*dirs, with_copies=args.with_copies)
        print(paired_text(res))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 0
    rows = compare_rows(args.dirs, latency=not args.no_latency, repeats=args.repeats)
    if not rows:
        raise ValueError(f"no card.json in any of: {' '.join(args.dirs)}")
    print(to_text(rows))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(to_markdown(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.record:
        record_latency(rows)
    for r in rows:
        if r["latency_from"] and r["latency_from"].startswith("not measured"):
            print(f"{r['name']}: latency {r['latency_from']}", file=sys.stderr)
    return 0


def add_cli(sub) -> None:
    from .cli import integer_at_least
    c = sub.add_parser("compare", help="one row per trained model (dirs with a card.json)")
    c.add_argument("dirs", nargs="+", help="model directories, or folders of them")
    c.add_argument("--md", help="also write the table as Markdown")
    c.add_argument("--json", help="also write the rows as JSON")
    c.add_argument("--no-latency", action="store_true", help="do not measure CPU latency")
    c.add_argument("--repeats", type=integer_at_least(1), help=f"timed forwards per model (default {REPEATS})")
    c.add_argument("--paired", action="store_true",
                   help="two models on the test images both were tested on: accuracies, discordant "
                        "images, exact McNemar p (per source)")
    c.add_argument("--with-copies", action="store_true",
                   help="--paired: keep test images with a copy in either model's training split")
    c.add_argument("--record", action="store_true",
                   help="write each measured latency into the model's card (card['benchmark'])")
    c.set_defaults(fn=cmd_compare)
