"""The served path's rules for screen captures: do they refuse marked slices and layouts, and no
scan of the sources?

- **Marks drawn in colour**: `core.reader` measures, for a colour file, the share of the head's core
  (the head box with an eighth cut from each side) in strong colour (chroma above
  `core.reader.MARK_CHROMA`), and `core.inference.marks_reason` refuses a mostly grey scan above
  `MARKS_SHARE_LIMIT`.
- **Several slices in one image**: `core.inference.panels_reason` refuses a scan that a plain band
  splits into lit parts of comparable size (`core.reader.panel_divider`).

Counted, as for a model without a gate (each rule alone):
- **every scan of the model's sources**, read as served (`read_scan`): how many each rule refuses
  (none should be: they are single grey MRI slices, some saved in RGB with coloured banners at
  their edges), and the highest colour shares;
- **the model's first test scans of each source** (by `shift_eval`'s per-file seed), with a reader's marks
  (`bench/screen_captures.py`'s measured line, ellipse with its statistics and arrow, at random
  places in the lit slice) in each colour, and laid out as `screen_captures`' 2 x 2 panels and as
  a side-by-side pair with a black gutter, each saved as PNG and as JPEG (quality 90 and 75) and read
  back as served: the share refused.

    PYTHONPATH=. python bench/capture_rules.py                   # the default's sources (2.5 min)
    PYTHONPATH=. python bench/capture_rules.py --per-source 100 --json runs/capture_rules.json
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header, positive  # noqa: E402
from bench.screen_captures import _annotate, encoded, panels_2x2, to_pil  # noqa: E402
from bench.shift_eval import file_seed  # noqa: E402
from core import data as D  # noqa: E402
from core.inference import (MARKS_SHARE_LIMIT, default_weights, load_card, marks_reason,  # noqa: E402
                            panels_reason)
from core.ood import read_split_file, source_roots  # noqa: E402
from core import reader as R  # noqa: E402
from core.reader import ScanError, read_scan  # noqa: E402

COLOURS = {"yellow": (255, 255, 0), "green": (0, 255, 0), "cyan": (0, 255, 255), "red": (255, 0, 0),
           "orange": (255, 165, 0), "magenta": (255, 0, 255), "blue": (0, 0, 255), "pale yellow": (255, 255, 160)}
SAVES = ("png", "jpeg 90", "jpeg 75")


def share_of(path: str) -> tuple[str, float | None, bool, bool]:
    """(path, the served scan's colour_marks share, refused as marks, refused as a layout); share
    None when the reader refuses the file."""
    try:
        scan = read_scan(path)
    except ScanError:
        return path, None, False, False
    return path, scan.info.get("colour_marks", 0.0), marks_reason(scan) is not None, panels_reason(scan) is not None


def side_by_side(a: np.ndarray) -> np.ndarray:
    """The slice beside a darker windowing of itself, a black gutter between: two series compared."""
    gap = np.zeros((a.shape[0], max(2, a.shape[1] // 60)), np.float32)
    return np.concatenate([a, gap, np.clip(a, 0, 1) ** 1.5], axis=1)


def capture_refusals(path: str) -> dict[str, bool]:
    """"capture / save" -> whether the served copy of ``path`` so drawn is refused by its rule."""
    grey = read_scan(path).pixels
    out = {}
    for name, rgb in COLOURS.items():
        im = to_pil(grey).convert("RGB")
        _annotate(im, grey, np.random.default_rng(file_seed(path)), rgb)
        for save in SAVES:
            out[f"{name} marks / {save}"] = marks_reason(read_scan(encoded(im, save), "m.png")) is not None
    for name, layout in (("2x2 panels", panels_2x2(grey, np.random.default_rng(file_seed(path)))),
                         ("side by side", side_by_side(grey))):
        for save in SAVES:
            out[f"{name} / {save}"] = panels_reason(read_scan(encoded(to_pil(layout), save), "p.png")) is not None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="model whose sources and test split are used (default: weights/DEFAULT)")
    p.add_argument("--per-source", type=positive, default=100, help="test scans drawn per source (default 100)")
    p.add_argument("--workers", type=positive, default=2)
    p.add_argument("--json", help="write the counts here")
    args = p.parse_args(argv)
    run = header("cpu")
    wdir = Path(args.weights or default_weights())
    roots = source_roots(load_card(wdir), None)
    role = D.split_roles(read_split_file(wdir / "split.json"))
    result: dict = {**run, "weights": str(wdir), "marks_share_limit": MARKS_SHARE_LIMIT,
                    "panel_rule": {k: getattr(R, k) for k in ("PANEL_FLAT", "PANEL_LIT", "PANEL_SIDE", "PANEL_BALANCE",
                                                              "PANEL_MIN_BAND", "MARK_CHROMA")},
                    "sources": {}, "captures": {}}
    with ProcessPoolExecutor(args.workers) as ex:
        for src, root in roots.items():
            samples = D.discover(root, src).samples
            rows = [r for r in ex.map(share_of, [s.path for s in samples], chunksize=32) if r[1] is not None]
            marks = sorted((Path(p).name, v) for p, v, no, _ in rows if no)
            layouts = sorted(Path(p).name for p, _, _, no in rows if no)
            coloured = sum(r[1] > 0 for r in rows)
            top = sorted(((r[1], Path(r[0]).name) for r in rows if r[1] > 0), reverse=True)[:3]
            result["sources"][src] = {"scans": len(rows), "unreadable": len(samples) - len(rows),
                                      "with_colour_marks_share": coloured, "refused_as_marks": marks,
                                      "refused_as_layouts": layouts, "highest": top}
            print(f"{src}: {len(rows)} scans; {coloured} with strong colour in the head's core, highest "
                  f"{top}; refused as marks {len(marks)}, as layouts {len(layouts)}")
            test = sorted((s.path for s in samples if role.get((src, s.rel)) == "test"), key=file_seed)
            test = test[:args.per_source]
            drawn = list(ex.map(capture_refusals, test))
            if drawn:
                rates = {k: round(float(np.mean([r[k] for r in drawn])), 4) for k in drawn[0]}
                result["captures"][src] = {"n": len(drawn), "refused": rates}
                print(f"  {len(drawn)} test scans drawn, refused: " + ", ".join(f"{k} {v:.1%}" for k, v in rates.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
