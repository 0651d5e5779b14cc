"""train.py end to end: checkpoint resume on generated data; a short run on the shared data
followed by `python -m core evaluate` and `predict --json` on what it wrote."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import core.engine as E
import core.training as TR
from core.cli import main as cli_main
from core.labels import normalise_label

from conftest import make_blob_dataset as make_dataset

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
C4 = ["glioma", "meningioma", "pituitary", "notumor"]


pytestmark = pytest.mark.usefixtures("private_cache")  # conftest: a per-test hash cache


def run_train(args, cache_dir, timeout=600):
    env = {**os.environ, "BT_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "train.py", *map(str, args), "--no-progress"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"train.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def train_validating(args, monkeypatch, losses=None) -> list[dict]:
    """train.py's main in this process (the hash cache is the private_cache fixture's), with
    validation watched: returns, per validated epoch, a copy of the state of the model that was
    validated. ``losses``: each epoch's validation loss is replaced by the next of these, so that
    which epoch is best is known in advance."""
    import train
    real, seen = E.evaluate_split, []
    scripted = None if losses is None else iter(losses)

    def watched(model, *a, **k):
        va = real(model, *a, **k)
        seen.append({n: v.detach().clone() for n, v in model.state_dict().items()})
        if scripted is not None:
            va["loss"] = next(scripted)
        return va

    monkeypatch.setattr(E, "evaluate_split", watched)
    assert train.main([*map(str, args), "--no-progress"]) == 0
    monkeypatch.setattr(E, "evaluate_split", real)
    return seen




# ----------------------------------------------------------------------------- resume
def test_resume_continues_from_the_checkpoint(tmp_path):
    data, out, cache = tmp_path / "data", tmp_path / "run", tmp_path / "cache"
    make_dataset(data)
    common = ["--data", data, "--out", out, "--arch", "simple_cnn", "--img", 32,
              "--batch-size", 8, "--workers", 1, "--seed", 0]
    log1 = run_train([*common, "--epochs", 2], cache)
    assert "epoch 2/2" in log1
    hist1 = json.loads((out / "history.json").read_text())
    split1 = json.loads((out / "split.json").read_text())["files"]
    ck1 = E.load_checkpoint(out / "checkpoint.pt")   # weights_only=True
    assert [h["epoch"] for h in hist1] == [1, 2] and ck1["epoch"] == 1
    card1 = json.loads((out / "card.json").read_text())
    assert card1["training"]["epochs_run"] == 2

    assert not (out / "best.pt").exists()          # a finished run keeps only what it ships
    from safetensors.torch import load_file
    shipped1 = load_file(out / "model.safetensors")
    # Make sure the resumed epoch does not beat the best so far, so that the run has to fall
    # back on the best weights of the first run (the path where best.pt is gone).
    E.save_checkpoint(out / "checkpoint.pt", **{**ck1, "best": float("-inf")})

    log2 = run_train([*common, "--epochs", 3, "--resume"], cache)
    assert "resumed after epoch 2 of" in log2
    assert "epoch 3/3" in log2 and "epoch 1/3" not in log2 and "epoch 2/3" not in log2
    hist2 = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist2] == [1, 2, 3]
    assert hist2[:2] == hist1                       # the first two epochs were not re-run
    assert hist2[2]["train"]["time_s"] > 0 and np.isfinite(hist2[2]["train"]["loss"])
    ck2 = E.load_checkpoint(out / "checkpoint.pt")
    assert ck2["epoch"] == 2 and ck2["history"] == hist2
    # Epoch 3 trained the checkpointed model further (it did not start from scratch).
    moved = [k for k in ck1["model"] if not torch.equal(ck1["model"][k], ck2["model"][k])]
    assert moved
    assert ck2["optimizer"]["state"][0]["step"] > ck1["optimizer"]["state"][0]["step"]
    assert json.loads((out / "split.json").read_text())["files"] == split1
    card2 = json.loads((out / "card.json").read_text())
    assert card2["training"]["epochs_run"] == 3 and card2["classes"] == C4
    # the card says which epoch ships, and that the 2-epoch cycle was stretched to 3 on resume
    assert card1["training"]["best_epoch"] in (1, 2) and card1["training"]["stopped_early"] is False
    assert card2["training"]["best_epoch"] == card1["training"]["best_epoch"]   # epoch 3 beat nothing
    assert card2["training"]["schedule_splices"] == [{"epochs_before": 2, "epochs_after": 3, "at_epoch": 2}]
    assert card2["resume_commands"] and card1.get("resume_commands") is None
    # No epoch improved on the (forced) best: the shipped weights are still the first run's.
    shipped2 = load_file(out / "model.safetensors")
    assert shipped2.keys() == shipped1.keys()
    assert all(torch.equal(shipped1[k], shipped2[k]) for k in shipped1)


def test_init_continues_from_a_finished_run_on_its_split(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data)
    common = ["--data", data, "--arch", "simple_cnn", "--img", 32, "--batch-size", 8,
              "--workers", 1, "--epochs", 1]
    run_train([*common, "--out", tmp_path / "parent", "--seed", 0], cache)
    # Another seed would split differently; the child must still use the parent's split.
    log = run_train([*common, "--out", tmp_path / "child", "--seed", 1,
                     "--init", tmp_path / "parent", "--average-init"], cache)
    assert "initialised from" in log and "weight average with" in log
    split = lambda d: json.loads((tmp_path / d / "split.json").read_text())["files"]
    assert split("child") == split("parent")
    import hashlib
    init = json.loads((tmp_path / "child" / "card.json").read_text())["training"]["init"]
    parent_card = json.loads((tmp_path / "parent" / "card.json").read_text())
    assert init["from"] == str(tmp_path / "parent") and init["command"] == parent_card["command"]
    assert init["weights_sha256"] == hashlib.sha256(
        (tmp_path / "parent" / "model.safetensors").read_bytes()).hexdigest()
    # The average is shipped exactly when validation prefers it.
    avg = json.loads((tmp_path / "child" / "card.json").read_text())["training"]["weight_average"]
    assert (avg["shipped"] == "average") == (avg["val_average"]["loss"] < avg["val_best"]["loss"])

    # Another architecture cannot continue from it: a plain error, exit 2, no traceback.
    env = {**os.environ, "BT_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "train.py", "--data", str(data), "--arch", "cnn_bn",
                        "--img", "32", "--epochs", "1", "--workers", "1", "--no-progress",
                        "--out", str(tmp_path / "other"), "--init", str(tmp_path / "parent")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "simple_cnn" in r.stderr and "cnn_bn" in r.stderr
    assert not (tmp_path / "other" / "split.json").exists()   # a refused run writes nothing

    # Resuming the finished child trains nothing more: it must not average the average again.
    from safetensors.torch import load_file
    before = load_file(tmp_path / "child" / "model.safetensors")
    run_train([*common, "--out", tmp_path / "child", "--seed", 1, "--init", tmp_path / "parent",
               "--average-init", "--resume"], cache)
    after = load_file(tmp_path / "child" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    card = json.loads((tmp_path / "child" / "card.json").read_text())
    assert card["training"]["weight_average"]["shipped"] == avg["shipped"]
    assert card["split"]["from"] == str(tmp_path / "parent")


def test_teacher_distils_into_another_arch_on_its_split_and_a_leaking_teacher_is_refused(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data)
    # A near-black slice, listed first and left out of training: the teacher's logits are made for
    # the unfiltered list, so the student's rows must skip it (the mapping: the test below).
    from PIL import Image
    black = np.zeros((64, 64), np.uint8); black[30:33, 30:33] = 200  # an all-zero file is skipped as blank
    Image.fromarray(black).save(data / "glioma" / "aaa_black.png")
    common = ["--data", data, "--batch-size", 8, "--workers", 1, "--epochs", 1]
    run_train([*common, "--arch", "simple_cnn", "--img", 40, "--out", tmp_path / "teacher", "--seed", 0], cache)
    # another architecture and input size, on the teacher's split
    log = run_train([*common, "--arch", "cnn_bn", "--img", 32, "--out", tmp_path / "student",
                     "--split-from", tmp_path / "teacher", "--teacher", tmp_path / "teacher",
                     "--distill", 0.7, "--distill-t", 3, "--distill-online"], cache)
    assert "teacher" in log and "training images in" in log
    dropped = json.loads((tmp_path / "teacher" / "split.json").read_text())["dropped_small_head"]
    assert [rel for _, rel in dropped] == ["glioma/aaa_black.png"]
    assert "1 files are not in the recorded split" in log  # so the student leaves it out too
    card = json.loads((tmp_path / "student" / "card.json").read_text())
    rec = card["training"]["distillation"]
    teacher_card = json.loads((tmp_path / "teacher" / "card.json").read_text())
    assert rec["teacher_sha256"] == teacher_card["weights_sha256"] and rec["teacher_input"] == 40
    assert rec["images"] == card["split"]["sizes"]["train"]
    assert (rec["weight"], rec["temperature"]) == (0.7, 3.0) and rec["online"]
    history = json.loads((tmp_path / "student" / "history.json").read_text())
    assert history[0]["train"]["distill_loss"] >= 0

    # Another seed splits otherwise: the teacher trained on some of this run's held-out images.
    env = {**os.environ, "BT_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "train.py", *map(str, common), "--arch", "cnn_bn", "--img", "32",
                        "--seed", "3", "--no-progress", "--out", str(tmp_path / "leaky"),
                        "--teacher", str(tmp_path / "teacher")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "training images of that model" in r.stderr
    assert not (tmp_path / "leaky" / "model.safetensors").exists()
    r = subprocess.run([sys.executable, "train.py", *map(str, common), "--distill-online", "--out",
                        str(tmp_path / "alone")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--distill-online needs --teacher" in r.stderr, r.stderr


def test_distillation_maps_the_teachers_rows_onto_the_kept_samples(tmp_path, monkeypatch):
    import argparse
    keep = torch.tensor([False, True, True, False, True, True])   # of six files, four kept
    train_rows = torch.tensor([0, 2, 3])                            # training rows among the kept

    def fake(teacher, samples, rows, *a, **k):  # each row's logits hold its index in the full list
        out = torch.full((len(samples), 4), float("nan"))
        out[rows] = rows.float()[:, None].expand(-1, 4)
        return out, {"teacher_sha256": "x", "images": len(rows), "time_s": 0.0,
                     "train_accuracy_of_teacher": 1.0}, None

    monkeypatch.setattr(E, "teacher_logits", fake)
    (tmp_path / "card.json").write_text(json.dumps({"preprocessing": {"size": 32}}))
    args = argparse.Namespace(teacher=str(tmp_path), distill=0.5, distill_t=2.0, distill_online=False, workers=1)
    (logits, w, t), _ = TR.distillation(args, list(range(6)), keep, train_rows, C4, {}, {"size": 32},
                                           torch.device("cpu"), "fp32", lambda *a, **k: None)
    assert logits.shape == (4, 4) and (w, t) == (0.5, 2.0)
    assert logits[train_rows, 0].tolist() == [1.0, 4.0, 5.0]        # kept rows 0, 2, 3 = files 1, 4, 5
    assert logits[1].isnan().all()                                  # kept row 1 (file 2) is not trained on


def test_distillation_alone_teaches_the_teachers_answer_not_the_label():
    from core.models import create_model
    torch.manual_seed(0)
    images = (torch.rand(16, 1, 32, 32) * 255).to(torch.uint8)
    masks = torch.zeros(16, 4, dtype=torch.bool); masks[:, 0] = True        # every label: class 0
    teacher = torch.full((16, 4), -4.0); teacher[:, 2] = 4.0                 # the teacher: class 2

    class Says(torch.nn.Module):  # a teacher that reads the batch: class 1 for every image
        def forward(self, x):
            return torch.tensor([-4.0, 4.0, -4.0, -4.0]).expand(len(x), 4)

    spec = {"size": 32, "mean": 0.2, "std": 0.25}
    for source, want in ((teacher, 2), (Says(), 1)):
        model = create_model("simple_cnn", 4)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(15):
            E.train_one_epoch(model, images, masks, torch.arange(16), opt, None, spec, torch.device("cpu"),
                              batch_size=8, progress=False, aug_strength=0.0, teacher=E.Distill(source, 1.0, 2.0))
        pred = E.predict_logits(model, images, spec, torch.device("cpu")).argmax(1)
        assert (pred == want).all()
    s = torch.randn(5, 4)
    assert E.distill_loss(s, s.clone(), 2.0).abs() < 1e-6 < E.distill_loss(s, -s, 2.0)


def test_average_states_means_floats_and_keeps_counters():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    avg = E.average_states(a, b)
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and avg["n"].item() == 9
    # The parent's weights load on the CPU; the run's may sit on an accelerator.
    on_other = E.average_states(a, {k: v.to("meta") for k, v in b.items()})
    assert on_other["w"].device.type == "meta"


def test_init_weights_loads_exactly_and_refuses_a_leaking_parent(tmp_path):
    from safetensors.torch import save_file
    from core.models import create_model
    parent = create_model("simple_cnn", 4)
    save_file({k: v.contiguous() for k, v in parent.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "card.json").write_text(json.dumps({"arch": "simple_cnn", "classes": C4}))
    (tmp_path / "split.json").write_text(json.dumps({"files": {"a": {"train": ["x.jpg"], "test": ["y.jpg"]}}}))
    child = create_model("simple_cnn", 4)
    rec = E.init_weights(child, tmp_path, "simple_cnn", C4, {"a": {"train": ["x.jpg"], "test": ["y.jpg"]}})
    assert all(torch.equal(v, parent.state_dict()[k]) for k, v in child.state_dict().items())
    assert len(rec["weights_sha256"]) == 64
    with pytest.raises(ValueError, match="training images of that model"):
        E.init_weights(child, tmp_path, "simple_cnn", C4, {"a": {"train": ["y.jpg"], "val": ["x.jpg"]}})
    with pytest.raises(ValueError, match="this run trains"):
        E.init_weights(child, tmp_path, "simple_cnn", ["no", "yes"], {})


def test_ema_run_validates_and_ships_the_average(tmp_path, monkeypatch):
    data, out, cache = tmp_path / "data", tmp_path / "run", tmp_path / "cache"
    make_dataset(data)
    common = ["--data", data, "--out", out, "--arch", "simple_cnn", "--img", 32,
              "--batch-size", 8, "--workers", 1, "--seed", 0, "--ema", 0.9]
    validated = train_validating([*common, "--epochs", 2], monkeypatch)
    ck = E.load_checkpoint(out / "checkpoint.pt")
    assert ck["ema"]["updates"] > 0 and len(validated) == 2
    # The average differs from the raw weights ...
    assert any(not torch.equal(ck["model"][k], ck["ema"]["model"][k]) for k in ck["model"])
    # ... and it is what validation judged: the last epoch's validated model is the
    # checkpoint's average, not its raw weights.
    assert validated[-1].keys() == ck["ema"]["model"].keys()
    assert all(torch.equal(v, ck["ema"]["model"][k]) for k, v in validated[-1].items())
    # The run shipped (in fp16) the average it validated in the epoch the card records as best.
    from safetensors.torch import load_file
    shipped = load_file(out / "model.safetensors")
    card = json.loads((out / "card.json").read_text())
    losses = [h["val"]["loss"] for h in json.loads((out / "history.json").read_text())]
    best_epoch = card["training"]["best_epoch"]
    assert best_epoch == 1 + int(np.argmin(losses))
    kept = validated[best_epoch - 1]
    assert shipped.keys() == kept.keys()
    assert all(torch.equal(shipped[k], kept[k].to(shipped[k].dtype)) for k in shipped)
    assert card["training"]["weight_ema"] == 0.9
    run_train([*common, "--epochs", 3, "--resume"], cache)
    ck3 = E.load_checkpoint(out / "checkpoint.pt")
    assert ck3["ema"]["updates"] > ck["ema"]["updates"]   # the average continued, not restarted


def test_model_ema_follows_the_model_with_warmup():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = E.ModelEma(net, decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net[1].num_batches_tracked += 7
    w0 = ema.module[0].weight.clone()
    ema.update(net)  # first update: decay min(0.5, 2/11) -> moves 9/11 of the way
    assert torch.allclose(ema.module[0].weight, w0 + 9 / 11, atol=1e-6)
    assert int(ema.module[1].num_batches_tracked) == 7
    assert not any(p.requires_grad for p in ema.module.parameters())


# ----------------------------------------------------------------------------- real data
def link_dir(dst: Path, picks: dict[str, list[Path]]) -> Path:
    for cls, files in picks.items():
        (dst / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            (dst / cls / f.name).symlink_to(f)
    return dst


@pytest.mark.skipif(not (DATA / "brain-tumor-mri" / "Training").is_dir()
                    or not (DATA / "br35h").is_dir(), reason="shared data not present")
def test_short_run_on_shared_data_then_evaluate_and_predict(tmp_path, capsys):
    bench, br35h = DATA / "brain-tumor-mri" / "Training", DATA / "br35h"
    out, cache = tmp_path / "model", tmp_path / "cache"
    log = run_train(["--data", bench, "--data", br35h, "--limit", 40, "--epochs", 1, "--img", 48,
                     "--batch-size", 16, "--workers", 1, "--out", out], cache)
    assert "80 images from 2 source(s)" in log
    card = json.loads((out / "card.json").read_text())
    assert card["classes"] == C4                       # br35h 'yes' trains the fine classes
    assert {s["name"] for s in card["sources"]} == {"brain-tumor-mri", "br35h"}
    assert card["input"]["size"] == 48 and card["preprocessing"]["size"] == 48
    assert sum(card["split"]["sizes"].values()) == 80
    split = json.loads((out / "split.json").read_text())["files"]
    assert set(split) == {"brain-tumor-mri", "br35h"}
    for src, root in (("brain-tumor-mri", bench), ("br35h", br35h)):
        for rels in split[src].values():
            assert all((root / r).is_file() for r in rels)
    eval_json = json.loads((out / "eval.json").read_text())
    assert eval_json["n"] == card["split"]["sizes"]["test"]

    # evaluate: a small class-per-folder directory of benchmark files (symlinks, no copies).
    picks = {c: sorted((bench / c).glob("*.jpg"))[:3] for c in C4}
    ev_dir = link_dir(tmp_path / "eval4", picks)
    ev_path = tmp_path / "ev4.json"
    assert cli_main(["evaluate", str(ev_dir), "--weights", str(out), "--json", str(ev_path)]) == 0
    ev = json.loads(ev_path.read_text())
    assert {"classes", "n", "accuracy", "macro_f1", "per_class", "confusion", "tumour_missed",
            "normal_flagged", "predictions"} <= set(ev)
    assert ev["classes"] == C4 and ev["n"] == 12
    for c in C4:
        assert set(ev["per_class"][c]) == {"precision", "recall", "f1", "specificity", "support"}
        assert ev["per_class"][c]["support"] == 3
    assert np.array(ev["confusion"]).sum() == 12 and np.array(ev["confusion"]).sum(1).tolist() == [3] * 4
    preds = ev["predictions"]
    assert {p["file"] for p in preds} == {f"{c}/{f.name}" for c, fs in picks.items() for f in fs}
    for p in preds:
        assert {"file", "label", "pred", "probs"} <= set(p)
        assert p["label"] == normalise_label(p["file"].split("/")[0])
        assert p["pred"] in C4 and sum(p["probs"].values()) == pytest.approx(1, abs=1e-4)
    # The summary numbers agree with the per-image records.
    assert ev["accuracy"] == pytest.approx(np.mean([p["pred"] == p["label"] for p in preds]))
    assert ev["tumour_missed"] == sum(p["label"] != "notumor" and p["pred"] == "notumor" for p in preds)
    assert ev["normal_flagged"] == sum(p["label"] == "notumor" and p["pred"] != "notumor" for p in preds)

    # A yes/no folder against the 4-class model: tumour vs no tumour.
    yn = link_dir(tmp_path / "yesno", {"yes": sorted((br35h / "yes").glob("*"))[:4],
                                        "no": sorted((br35h / "no").glob("*"))[:3]})
    yn_path = tmp_path / "evyn.json"
    assert cli_main(["evaluate", str(yn), "--weights", str(out), "--json", str(yn_path)]) == 0
    evyn = json.loads(yn_path.read_text())
    assert evyn["n"] == 7 and evyn["n_tumour"] == 4 and evyn["n_normal"] == 3
    assert {p["label"] for p in evyn["predictions"]} == {"tumor", "notumor"}
    assert evyn["tumour_missed"] == sum(p["label"] == "tumor" and p["pred"] == "notumor"
                                        for p in evyn["predictions"])
    capsys.readouterr()

    # predict --json: one line per file, a bad file gives ok:false and exit code 1.
    files = [picks["glioma"][0], picks["notumor"][0]]
    assert cli_main(["predict", "--json", "--weights", str(out), *map(str, files)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["file"] for x in lines] == [str(f) for f in files]
    for x in lines:
        assert x["ok"] is True and x["pred"] in C4
        assert x["tumour_probability"] == pytest.approx(
            sum(x["probs"][c] for c in C4[:3]), abs=1e-5)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    assert cli_main(["predict", "--json", "--weights", str(out), str(files[0]), str(bad)]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["ok"] is True and lines[1] == {"file": str(bad), "ok": False,
                                                    "error": lines[1]["error"]}
    assert lines[1]["error"]


def test_tta_below_refits_on_served_outputs_and_the_predictor_serves_them(tmp_path):
    """--tta-below on a finished run (resumed: nothing more is trained) writes the rule to the card,
    refits calibration on the served outputs, and `Predictor` applies the same rule."""
    data, out, cache = tmp_path / "data", tmp_path / "run", tmp_path / "cache"
    make_dataset(data)
    common = ["--data", data, "--out", out, "--arch", "simple_cnn", "--img", 32, "--batch-size", 8,
              "--workers", 1, "--epochs", 1]
    run_train(common, cache)
    from safetensors.torch import load_file
    before = load_file(out / "model.safetensors")
    plain_card = json.loads((out / "card.json").read_text())
    assert plain_card["tta"] is None
    run_train([*common, "--resume", "--tta-below", 0.99], cache)
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    card = json.loads((out / "card.json").read_text())
    rule = card["tta"]
    assert rule["kind"] == "mirror" and rule["below_confidence"] == 0.99
    # the resumed run starts from the shipped fp16 weights, so the plain temperature is refitted
    # on almost the same logits
    assert rule["selection_temperature"] == pytest.approx(plain_card["calibration"]["temperature"], rel=0.01)
    assert 0.0 <= rule["val_share"] <= 1.0

    from core.inference import Predictor
    from core.reader import read_scan
    pred = Predictor(out)
    assert pred.tta == rule
    files = sorted(p for p in data.rglob("*.png"))[:6]
    x = torch.cat([pred.input_tensor(read_scan(f)) for f in files])
    pred.precision = "fp32"
    with torch.no_grad():
        z, zf = pred.model(x), pred.model(torch.flip(x, dims=[3]))
    plain_conf = torch.softmax(z / rule["selection_temperature"], 1).amax(1)
    want = torch.where((plain_conf < 0.99)[:, None], (z + zf) / 2 * rule.get("scale", 1.0), z)
    got = pred.probabilities(x)
    assert np.allclose(got, torch.softmax(want / pred.temperature, 1).numpy(), atol=1e-5)


def test_warmup_epochs_are_neither_best_nor_counted_by_early_stopping(tmp_path, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "run"
    make_dataset(data)
    epochs, patience = 14, 2
    warm = int(TR.WARMUP * epochs)
    assert warm == patience == 2
    # Scripted validation losses: the warm-up epochs have the lowest (as a fine-tune's do), and
    # they are as many as --patience, so counting them would stop the run before any best epoch.
    # After them epoch 4 is best, and epochs 5 and 6 are worse: the run stops there.
    losses = [0.05, 0.06, 0.50, 0.40, 0.45, 0.46] + [0.90] * (epochs - 6)
    real, judged = TR.judge_epoch, []

    def watched(epoch, loss, best, bad, warmup_epochs, counts=True):
        verdict = real(epoch, loss, best, bad, warmup_epochs, counts=counts)
        judged.append({"epoch": epoch, "warmup_epochs": warmup_epochs, "is_best": verdict[0]})
        return verdict

    monkeypatch.setattr(TR, "judge_epoch", watched)
    validated = train_validating(["--data", data, "--out", out, "--arch", "simple_cnn", "--img", 32,
                                  "--batch-size", 8, "--workers", 1, "--epochs", epochs,
                                  "--patience", patience], monkeypatch, losses)
    hist = json.loads((out / "history.json").read_text())
    assert [h["val"]["loss"] for h in hist] == losses[:6]   # stopped after 2 epochs without a better one
    assert len(validated) == 6
    assert [j["warmup_epochs"] for j in judged] == [warm] * 6
    assert [j["epoch"] for j in judged if j["is_best"]] == [2, 3]   # never a warm-up epoch
    ck = E.load_checkpoint(out / "checkpoint.pt")
    assert ck["best"] == 0.40 and ck["bad"] == patience
    training = json.loads((out / "card.json").read_text())["training"]
    assert training["best_epoch"] == 4 and training["stopped_early"] is True and training["kept"] == "best"
    assert training["epochs_run"] == 6
    # the shipped weights are those of epoch 4 (in fp16), not of the warm-up's lowest loss
    from safetensors.torch import load_file
    shipped = load_file(out / "model.safetensors")
    assert all(torch.equal(shipped[k], validated[3][k].to(shipped[k].dtype)) for k in shipped)


def test_keep_last_ships_the_final_epoch_and_never_stops_early(tmp_path, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "run"
    make_dataset(data)
    # the lowest validation loss is epoch 2, and three worse epochs follow (patience 2): --keep best
    # would stop after epoch 4 and ship epoch 2; --keep last runs all 5 and ships epoch 5
    losses = [0.5, 0.1, 0.6, 0.7, 0.8]
    validated = train_validating(["--data", data, "--out", out, "--arch", "simple_cnn", "--img", 32,
                                  "--batch-size", 8, "--workers", 1, "--epochs", 5, "--patience", 2,
                                  "--keep", "last"], monkeypatch, losses)
    assert len(validated) == 5
    training = json.loads((out / "card.json").read_text())["training"]
    assert training["kept"] == "last" and training["best_epoch"] == 5 and training["stopped_early"] is False
    from safetensors.torch import load_file
    shipped = load_file(out / "model.safetensors")
    assert all(torch.equal(shipped[k], validated[4][k].to(shipped[k].dtype)) for k in shipped)
    assert not all(torch.equal(shipped[k], validated[1][k].to(shipped[k].dtype)) for k in shipped)


def test_judge_epoch_skips_the_warmup_then_tracks_the_best():
    from core.training import judge_epoch
    best, bad, kept = float("inf"), 0, []
    # a fine-tune: lowest loss in epoch 0 (warm-up), then worse, then better than epoch 1
    for epoch, loss in enumerate([0.10, 0.30, 0.25, 0.26, 0.27, 0.20]):
        is_best, best, bad = judge_epoch(epoch, loss, best, bad, warmup_epochs=1)
        kept.append(is_best)
    assert kept == [False, True, True, False, False, True] and best == 0.20 and bad == 0
    # progressive resizing's small epochs do not count towards patience
    assert judge_epoch(3, 0.5, 0.2, 1, 1, counts=False) == (False, 0.2, 1)
    assert judge_epoch(3, 0.5, 0.2, 1, 1) == (False, 0.2, 2)


def test_average_init_always_averages_a_finished_fine_tune_with_its_parent(tmp_path):
    """WiSE-FT after the fact: --finish-from a fine-tune with --average-init-always ships exactly the
    mean of its weights and its parent's, whatever validation says, and records the rule; the
    averaged run cannot be averaged again, and the flag needs --init."""
    from safetensors.torch import load_file
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data)
    common = ["--data", data, "--arch", "simple_cnn", "--img", 32, "--batch-size", 8,
              "--workers", 1, "--epochs", 1]
    run_train([*common, "--out", tmp_path / "parent", "--lr", 0.01], cache)
    child = [*common, "--seed", 1, "--init", tmp_path / "parent"]
    run_train([*child, "--out", tmp_path / "child"], cache)
    log = run_train([*child, "--out", tmp_path / "wise", "--finish-from", tmp_path / "child",
                     "--average-init-always"], cache)
    assert "epoch 1/" not in log and "shipping the average (always)" in log
    parent, tuned, wise = (load_file(tmp_path / d / "model.safetensors") for d in ("parent", "child", "wise"))
    for k in wise:
        if wise[k].is_floating_point():
            assert torch.allclose(wise[k], (parent[k] + tuned[k]) / 2, atol=1e-6), k
    assert any(not torch.equal(parent[k], tuned[k]) for k in parent if parent[k].is_floating_point())
    avg = json.loads((tmp_path / "wise" / "card.json").read_text())["training"]["weight_average"]
    assert avg["shipped"] == "average" and avg["rule"] == "always" and avg["with"] == str(tmp_path / "parent")

    env = {**os.environ, "BT_CACHE": str(cache)}
    def refused(*extra):
        r = subprocess.run([sys.executable, "train.py", *map(str, extra), "--no-progress"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        return r.stderr
    # Refused before --out is touched: a finished model there stays where it is.
    import shutil
    shutil.copytree(tmp_path / "child", tmp_path / "kept")
    before = sorted(p.name for p in (tmp_path / "kept").iterdir())
    assert "three to one" in refused(*child, "--out", tmp_path / "kept", "--finish-from", tmp_path / "wise",
                                     "--average-init-always")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == before
    # Only with the parent it was continued from: not another model, nor a run that had none.
    run_train([*common, "--out", tmp_path / "other", "--lr", 0.02, "--seed", 3, "--split-from", tmp_path / "parent"], cache)
    assert "whose weights are not those in" in refused(*common, "--seed", 1, "--init", tmp_path / "other", "--out",
                                                       tmp_path / "x", "--finish-from", tmp_path / "child",
                                                       "--average-init-always")
    assert "records no --init" in refused(*common, "--lr", 0.01, "--init", tmp_path / "child", "--out", tmp_path / "x",
                                          "--finish-from", tmp_path / "parent", "--average-init-always")
    # --average-init (validation chooses) works there too
    run_train([*child, "--out", tmp_path / "chosen", "--finish-from", tmp_path / "child", "--average-init"], cache)
    avg = json.loads((tmp_path / "chosen" / "card.json").read_text())["training"]["weight_average"]
    assert avg["rule"] == "lower validation loss"
    assert (avg["shipped"] == "average") == (avg["val_average"]["loss"] < avg["val_best"]["loss"])
    assert "--average-init-always needs --init" in refused(*common, "--out", tmp_path / "x", "--average-init-always")
    assert "not both" in refused(*child, "--out", tmp_path / "x", "--average-init", "--average-init-always")


# ----------------------------------------------------------------------------- --finish-from
def test_finish_from_cards_a_run_trained_elsewhere_without_training(tmp_path):
    """A run trained on another machine (a GPU, on packed images) is calibrated, evaluated and
    carded here on this data: same weights, its history, a record of where it was trained; a run
    with other options, altered weights or no card is refused in one sentence."""
    import hashlib
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data)
    common = ["--data", data, "--arch", "simple_cnn", "--img", 32, "--batch-size", 8,
              "--workers", 1, "--epochs", 2, "--lr", 0.01]
    there = tmp_path / "there"
    run_train([*common, "--out", there], cache)
    log = run_train([*common, "--out", tmp_path / "here", "--finish-from", there, "--split-from", there], cache)
    assert "epoch 1/" not in log                                    # nothing trained here
    sha = lambda d: hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert sha(tmp_path / "here") == sha(there)
    card_there = json.loads((there / "card.json").read_text())
    card = json.loads((tmp_path / "here" / "card.json").read_text())
    t = card["training"]
    assert t["trained_elsewhere"]["from"] == str(there)
    assert t["trained_elsewhere"]["weights_sha256"] == card_there["weights_sha256"] == card["weights_sha256"]
    assert t["epochs_run"] == card_there["training"]["epochs_run"]
    assert t["train_time_s"] == card_there["training"]["train_time_s"]
    assert json.loads((tmp_path / "here" / "history.json").read_text()) == \
        json.loads((there / "history.json").read_text())
    assert "calibrated and evaluated on" in t["device"]
    assert card["metrics"] and (tmp_path / "here" / "eval.json").is_file()

    def refused(extra, src, base=common, split_from=there):
        env = {**os.environ, "BT_CACHE": str(cache)}
        split = ["--split-from", str(split_from)] if split_from else []
        r = subprocess.run([sys.executable, "train.py", *map(str, base), *map(str, extra), "--no-progress",
                            "--out", str(tmp_path / "refused"), "--finish-from", str(src), *split],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "refused" / "card.json").exists()
        return r.stderr

    assert "other settings (lr)" in refused(["--lr", 0.02], there)
    altered = tmp_path / "altered"
    import shutil
    shutil.copytree(there, altered)
    raw = bytearray((altered / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (altered / "model.safetensors").write_bytes(bytes(raw))
    assert "the ones its card describes" in refused([], altered)
    (altered / "card.json").unlink()
    assert "not a run's folder" in refused([], altered)   # no card and no trained.json
    assert "other settings (limit)" in refused(["--limit", 39], there)
    assert "other sources or source weights" in refused([], there, base=["--data", f"{data}=2", *common[2:]])
    assert "without --resume or torchrun" in refused(["--resume"], there)
    assert "nothing to teach" in refused(["--teacher", there], there)
    # A run of an older train.py (no options recorded) is refused for that reason.
    old_card = tmp_path / "old_card"
    shutil.copytree(there, old_card)
    c = json.loads((old_card / "card.json").read_text())
    del c["training"]["options"]
    (old_card / "card.json").write_text(json.dumps(c))
    assert "does not record every option" in refused([], old_card)
    # A damaged split record or history: one sentence.
    for name, junk in (("split.json", {"files": [1, 2]}), ("history.json", {"epoch": 1})):
        bad = tmp_path / f"bad_{name}"
        shutil.copytree(there, bad)
        (bad / name).write_text(json.dumps(junk))
        assert "not a run's folder" in refused([], bad)
    # The same images read under another source root (other relative names) are not "this run's".
    moved_root = tmp_path / "moved_root"
    shutil.copytree(data, moved_root / "inner")
    cfg = tmp_path / "moved.toml"
    cfg.write_text(f'data = [{{ path = "{moved_root}", name = "{data.name}" }}]\n')
    assert "are not in it" in refused([], there, base=["--config", cfg, *common[2:]], split_from=None)
    # A split on which its training images are tested here is refused.
    run_train([*common, "--out", tmp_path / "reseeded", "--seed", 7, "--epochs", 1], cache)
    env = {**os.environ, "BT_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "train.py", *map(str, common), "--no-progress", "--out",
                        str(tmp_path / "refused"), "--finish-from", str(there), "--split-from",
                        str(tmp_path / "reseeded")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "another role in this run's split" in r.stderr, r.stderr


def test_finish_from_cards_a_run_stopped_before_its_card(tmp_path, monkeypatch):
    """A run stopped by a time limit after some epochs (no card): its best epoch's weights are
    salvaged (core.engine.salvage_best) and carded from trained.json, which says so."""
    import train
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_dataset(data)
    monkeypatch.setenv("BT_CACHE", str(cache))
    common = ["--data", data, "--arch", "simple_cnn", "--img", 32, "--batch-size", 8,
              "--workers", 1, "--epochs", 3, "--lr", 0.01, "--no-progress"]
    there = tmp_path / "there"

    def stopped(*a, **k):
        raise KeyboardInterrupt  # the time limit, after the last epoch and before the card
    monkeypatch.setattr(TR, "finish", stopped)
    assert train.main([*map(str, common), "--out", str(there)]) == 130   # a sentence, not a traceback
    monkeypatch.undo()
    assert not (there / "card.json").exists() and (there / "trained.json").is_file()
    salvaged = E.salvage_best(there)
    assert salvaged == there / "salvaged.safetensors"
    trained = json.loads((there / "trained.json").read_text())
    best_epoch = trained["best_epoch"]
    assert {"init", "weight_average", "options", "sources"} <= trained.keys()  # a continued run says so too
    run_train([*common, "--out", tmp_path / "here", "--finish-from", there, "--split-from", there], cache)
    card = json.loads((tmp_path / "here" / "card.json").read_text())
    t = card["training"]
    assert t["trained_elsewhere"]["salvaged"] == "salvaged.safetensors"
    assert t["best_epoch"] == best_epoch and t["epochs_run"] == 3
    assert not (tmp_path / "here" / "trained.json").exists()   # the card says it now
    from safetensors.torch import load_file
    a, b = load_file(salvaged), load_file(tmp_path / "here" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_operating_point_is_picked_on_tumour_and_normal_rows_only(tmp_path, monkeypatch):
    """A folder that is neither a tumour nor 'no tumour' (here 'cat') becomes a class of its own;
    its validation rows must not count as tumours when the threshold is picked."""
    data = tmp_path / "data"
    make_dataset(data, per_class=12)
    (data / "pituitary").rename(data / "cat")
    seen = {}
    real = E.pick_threshold

    def watched(t_prob, is_t, *a, **k):
        seen["n"], seen["tumours"] = len(is_t), int(np.sum(is_t))
        return real(t_prob, is_t, *a, **k)

    monkeypatch.setattr(E, "pick_threshold", watched)
    out = tmp_path / "run"
    train_validating(["--data", data, "--out", out, "--arch", "simple_cnn", "--img", 32, "--epochs", 1,
                      "--batch-size", 8, "--workers", 1, "--seed", 0], monkeypatch)
    (roles,) = json.loads((out / "split.json").read_text())["files"].values()   # one source
    labels = [normalise_label(Path(f).parts[0]) for f in roles["val"]]
    assert "cat" in json.loads((out / "card.json").read_text())["classes"]
    assert labels.count("cat") > 0
    assert seen["n"] == len(labels) - labels.count("cat")
    assert seen["tumours"] == sum(lab in ("glioma", "meningioma") for lab in labels)


def test_copies_trained_on_leaves_out_a_held_out_sources_train_split(tmp_path):
    """train.py marks eval.json's test records with a copy in training (before, only the separate
    mark-copies did, so a fresh run's copies were scored as new scans); a source with weight 0 is
    held out, and its train split trained nothing."""
    from PIL import Image
    from core.data import Sample
    from core.evaluation import copies_trained_on, mark_records
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((64, 64), Image.BICUBIC)
    other = Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((64, 64), Image.BICUBIC)
    for name, im in (("a/glioma/x.png", img), ("b/glioma/x.png", img), ("b/glioma/y.png", other)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        im.save(tmp_path / name)
    samples = [Sample(str(tmp_path / "a/glioma/x.png"), "glioma/x.png", "glioma", "glioma", "a", split="train"),
               Sample(str(tmp_path / "b/glioma/x.png"), "glioma/x.png", "glioma", "glioma", "b", split="test"),
               Sample(str(tmp_path / "b/glioma/y.png"), "glioma/y.png", "glioma", "glioma", "b", split="test")]
    assert copies_trained_on(samples, [{"name": "a", "weight": 1.0}, {"name": "b", "weight": 1.0}]) == {("b", "glioma/x.png")}
    assert copies_trained_on(samples, [{"name": "a", "weight": 0.0}, {"name": "b", "weight": 1.0}]) == set()
    ev = {"predictions": [{"source": "b", "file": "glioma/x.png"}, {"source": "b", "file": "glioma/y.png"}]}
    assert mark_records(ev, {("b", "glioma/x.png")}, log=lambda *_: None) == {"b": {"copy_in_training": 1, "n": 2}}
    assert [r["copy_in_training"] for r in ev["predictions"]] == [True, False]


def test_a_training_run_marks_its_test_records_for_copies(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_dataset(data)
    train_validating(["--data", data, "--out", tmp_path / "m", "--arch", "simple_cnn", "--img", 32, "--epochs", 1,
                      "--batch-size", 8, "--workers", 1], monkeypatch)
    ev = json.loads((tmp_path / "m" / "eval.json").read_text())
    assert ev["predictions"] and all(r["copy_in_training"] is False for r in ev["predictions"])   # blobs: none alike
    assert sum(c["n"] for c in ev["copies_in_training"]["per_source"].values()) == len(ev["predictions"])


def test_a_failed_copy_mark_does_not_end_a_finished_run(tmp_path, monkeypatch, capsys):

    def fail(*_):
        raise ValueError("3 files of the split are missing")
    monkeypatch.setattr(TR, "copies_trained_on", fail)
    data = tmp_path / "data"
    make_dataset(data)
    train_validating(["--data", data, "--out", tmp_path / "m", "--arch", "simple_cnn", "--img", 32, "--epochs", 1,
                      "--batch-size", 8, "--workers", 1], monkeypatch)
    ev = json.loads((tmp_path / "m" / "eval.json").read_text())
    assert (tmp_path / "m" / "card.json").is_file() and not any("copy_in_training" in r for r in ev["predictions"])
    assert "not marked for copies in training (3 files of the split are missing)" in capsys.readouterr().out


def test_a_low_resolution_best_epoch_never_ships(tmp_path, monkeypatch, capsys):
    """Progressive resizing: early stopping starts afresh at full size, and so does best.pt. Epoch 2
    (16 px) had the lowest loss; with no full-size epoch finite, the run shipped it, tested at 32 px."""
    import train
    data = tmp_path / "data"
    make_dataset(data)
    common = ["--data", data, "--arch", "simple_cnn", "--img", 32, "--small-img", 16,
              "--small-img-epochs", 2, "--batch-size", 8, "--workers", 1, "--epochs", 4]
    scripted = iter([1.0, 0.5, 0.9, 0.8])
    real = E.evaluate_split

    def scripted_loss(*a, **k):
        return {**real(*a, **k), "loss": next(scripted)}
    monkeypatch.setattr(E, "evaluate_split", scripted_loss)
    assert train.main([*map(str, common), "--out", str(tmp_path / "ok"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "ok" / "card.json").read_text())["training"]["best_epoch"] == 4

    scripted = iter([1.0, 0.5, float("nan"), float("nan")])
    assert train.main([*map(str, common), "--out", str(tmp_path / "nan"), "--no-progress"]) == 2
    assert "no epoch after the warm-up improved" in capsys.readouterr().err
    assert not (tmp_path / "nan" / "card.json").exists()


def test_a_calibration_left_undone_is_said_in_the_card(tmp_path, monkeypatch, capsys):
    import warnings
    import train
    data = tmp_path / "data"
    make_dataset(data)

    def no_optimum(logits, masks):
        warnings.warn("temperature scaling has no optimum to find (all right)", E.CalibrationWarning)
        warnings.warn("another library's warning", UserWarning)   # shown, never a calibration note
        return 1.0
    monkeypatch.setattr(E, "fit_temperature", no_optimum)
    with pytest.warns(UserWarning, match="another library's warning"):   # passed on, not swallowed
        assert train.main(["--data", str(data), "--out", str(tmp_path / "run"), "--arch", "simple_cnn", "--img",
                           "32", "--batch-size", "8", "--workers", "1", "--epochs", "1", "--no-progress"]) == 0
    cal = json.loads((tmp_path / "run" / "card.json").read_text())["calibration"]
    assert cal["temperature"] == 1.0 and "no optimum" in cal["note"] and "library" not in cal["note"]
    from core.inference import calibration_text
    assert "not fitted: temperature scaling has no optimum" in calibration_text({"calibration": cal})
    assert "warning: temperature scaling has no optimum" in capsys.readouterr().err
