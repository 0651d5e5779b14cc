"""Review O: a card's gate missing from its folder, probabilities printed apart from the threshold,
false_alarms' unreadable thumbnails, train.py's unused --ood."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import edited_weights

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- 1. gate listed, file missing
def test_a_model_folder_without_the_gate_its_card_lists_is_refused(tmp_path):
    from core.inference import Predictor
    src, dst = REPO / "weights" / "mobilenet_v3_small", tmp_path / "copied"
    assert (src / "ood.safetensors").is_file()   # the shipped folder does carry it
    dst.mkdir()
    for name in ("card.json", "model.safetensors"):   # what the app calls a model folder
        shutil.copy(src / name, dst / name)
    with pytest.raises(ValueError, match=r"lists an out-of-distribution gate but .*ood\.safetensors is missing"):
        Predictor(dst)


def test_a_small_card_listing_a_gate_it_lacks_is_refused(random_weights, tmp_path):
    from core.inference import Predictor
    folder = edited_weights(random_weights, tmp_path / "m", {"ood": {"method": "cnn+colour"}})
    with pytest.raises(ValueError, match="fit-ood"):
        Predictor(folder)
    assert Predictor(random_weights).gate is None   # a card with no gate still serves, unchecked


# ----------------------------------------------------------------------------- 2. never "0.500" at 0.5
BELOW = [0.49999999999999994, float(np.float32(0.49999997)), np.float32(0.49999997)]


@pytest.mark.parametrize("tp", BELOW)
def test_a_probability_just_below_the_threshold_never_prints_as_it(tp):
    from core import report as R
    row = {"file": "a.png", "ok": True, "pred": "notumor", "tumour_probability": tp, "threshold": 0.5,
           "in_distribution": True}
    d = R.tp_digits(tp, 0.5)
    assert f"{tp:.{d}f}" != f"{0.5:.{d}f}" and float(f"{tp:.{d}f}") < 0.5
    text = R.text_line(row)
    shown = text.split("tumour probability ")[1].split(")")[0]
    assert float(shown) < 0.5 and not shown.startswith("0.500"), text
    col = R.tp_column_format([row])
    assert float(col % tp) < 0.5 and col % tp != col % 0.5
    tp_cell, t_cell = R._tp_cells(row, True)   # the CSV
    assert tp_cell != t_cell and float(tp_cell) < 0.5


def test_the_pdf_digits_write_a_near_threshold_probability_apart():
    from core import report as R
    ctx = R.ReportContext(model="m", version="v", arch="a", weights_sha256="", classes=["notumor", "tumor"],
                          threshold=0.5, threshold_source="model card", calibration="", disclaimer="",
                          method="", date="", ood_check=False)
    tp = 0.49999999999999994
    d = R._tp_digits(tp, ctx)
    assert f"{tp:.{d}f}" != f"{0.5:.{d}f}"


def test_digits_apart_keeps_its_short_answers():
    from core.metrics import apart, digits_apart
    assert digits_apart(0.5, 0.5) == 3 and digits_apart(0.967, 0.9671) == 4
    assert digits_apart(float("nan"), 0.5) == 3
    assert apart(0.96, 0.95, 1, True) == ("96.0%", "95.0%")


# ----------------------------------------------------------------------------- 3. false_alarms' rows
def _scan(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    img = np.zeros((64, 64), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    img[(yy - 32) ** 2 + (xx - 32) ** 2 < 26 ** 2] = 120
    img[rng.integers(10, 50, 40), rng.integers(10, 50, 40)] = 255
    Image.fromarray(img).save(path)
    return str(path)


def test_false_alarms_pairs_each_error_with_its_own_thumbnail(tmp_path):
    from bench.false_alarms import describe, line, rows_of, thumbs
    a, b = _scan(tmp_path / "a.png", 1), _scan(tmp_path / "b.png", 2)
    paths = [a, str(tmp_path / "missing.png"), b]
    found = [{"file": Path(p).name, "pred": "glioma", "tumour_probability": 0.9} for p in paths]
    mine, kept = thumbs(paths)
    assert kept == [0, 2] and len(mine) == 2
    rows = rows_of(len(paths), kept)
    assert rows == [0, None, 1]

    class S:   # training samples: the same two images, so each error's nearest is itself
        def __init__(self, rel): self.source, self.rel = "train", rel
    train, tr_kept = [S("b.png"), S("a.png")], [0, 1]
    tr = np.stack([mine[1], mine[0]])
    out = describe(found, rows, mine @ tr.T, [0, 1], train, tr_kept)
    assert [o["nearest_train"] for o in out] == ["train/a.png", None, "train/b.png"]
    assert [o["unreadable"] for o in out] == [False, True, False]
    assert "could not be read" in line(out[1]) and "train/a.png" in line(out[0])


def test_false_alarms_thumbs_of_nothing_readable_is_an_empty_table(tmp_path):
    from bench.false_alarms import thumbs
    rows, kept = thumbs([str(tmp_path / "gone.png")])
    assert kept == [] and rows.shape[0] == 0 and (rows @ rows.T).shape == (0, 0)


# ----------------------------------------------------------------------------- 4. train.py --ood
def test_train_offers_no_ood_option_it_would_ignore(tmp_path, capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(tmp_path), "--ood"])
    assert "--ood" in capsys.readouterr().err
    assert "--ood" not in train.get_args_parser().format_help()
    assert "fit-ood" in train.__doc__   # where the gate comes from instead
