"""Does ROSE work once training has converged? The paper's protocol with a budget chosen by convergence.

    python launch/converged.py                          # every stage, resuming where it stopped
    python launch/converged.py budget select            # only these stages
    python launch/converged.py --stop_after 150         # start no training run after 150 minutes

Stages, in order (each finished piece is kept; a killed training run resumes from its last checkpoint):

1. ``budget``: vanilla (``--rose_mode none``), seed 1, each learning rate of ``--lrs``, for ``--epochs``
   epochs with the clean validation accuracy every ``--eval_steps`` steps. The budget is taken from the
   curve of the learning rate with the best accuracy: the first evaluation after which no later one is
   better by more than ``--tolerance`` (accuracy, as a fraction). Every method then trains that many steps.
2. ``select``: on seed 1 and clean validation accuracy only, at the budget: vanilla's learning rate from
   ``--lrs``; for each ROSE variant, its learning rate from ``--lrs`` at its published ``upper``, then its
   ``upper`` from ``--uppers`` at that learning rate (a coordinate search, stated in the record).
3. ``final``: every mode of ``--modes`` with its chosen settings, for every seed of ``--seeds`` (seed 1 is the
   selection run itself), with the validation curve every ``--eval_steps`` steps and the AdvGLUE accuracy at the end.
4. ``evaluate``: both attacks on the first ``--examples`` validation examples and the sharpness of every
   final run (``launch/robustness.py evaluate``).
5. ``report``: the table (``launch/robustness.py report``, with the seeds an earlier machine finished taken
   from ``RECORD/results.json``) and the learning curves (``RECORD/curves.png``).

Nothing is chosen on AdvGLUE, attacks or sharpness. ``--record`` (default ``docs/converged``) holds what
travels between machines and sessions: ``plan.json`` (the curves, every selection run's accuracy, the
choices, the seconds each run took) and the report; commit it as pieces land. Runs go to
``--out/select/`` (budget and selection) and ``--out/train/`` (final).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("budget", "select", "final", "evaluate", "report")
# The published SST-2 (RoBERTa-base) upper of each ROSE variant: where the learning-rate search stands.
PUBLISHED_UPPER = {"first": 60, "second": 30, "ensemble": 40}
NAMES = {"none": "vanilla", "first": "ROSE-First", "second": "ROSE-Second", "ensemble": "ROSE-Ensemble"}


def fail(message: str) -> None:
    sys.exit(f"converged.py: error: {message}")


class Experiment:
    """The run folders, the record and the training command; ``plan`` is ``RECORD/plan.json``."""

    def __init__(self, cli: argparse.Namespace):
        self.cli = cli
        self.plan_file = cli.record / "plan.json"
        self.plan = json.loads(self.plan_file.read_text()) if self.plan_file.is_file() else {}
        settings = {k: getattr(cli, k) for k in ("train_samples", "epochs", "eval_steps", "lrs", "uppers", "tolerance",
                                                  "batch_size", "max_seq_length")}  # fmt: skip
        if self.plan.get("settings", settings) != settings:
            fail(f"{self.plan_file} was made with {self.plan['settings']}; pass the same settings "
                 f"or another --record")  # fmt: skip
        self.plan["settings"] = settings
        self.plan.setdefault("runs", {})
        self.started = time.time()

    def save(self) -> None:
        self.cli.record.mkdir(parents=True, exist_ok=True)
        tmp = self.plan_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.plan, indent=1) + "\n")
        tmp.replace(self.plan_file)

    def out_of_time(self) -> bool:
        limit = self.cli.stop_after
        return limit is not None and time.time() - self.started > 60 * limit

    def train(self, name: str, folder: Path, mode: str, seed: int, lr: float, upper: int, steps: int, *,
              eval_steps: int | None = None) -> dict | None:  # fmt: skip
        """Trains one run (or resumes it from its last checkpoint) and records its clean validation curve,
        final accuracy and seconds in the plan; returns the record, or None when out of time."""
        if name in self.plan["runs"]:
            return self.plan["runs"][name]
        done = (folder / "model.safetensors").is_file() and (folder / "trainer_state.json").is_file()
        if not done:
            if self.out_of_time():
                return None
            self._launch(folder, mode, seed, lr, upper, steps, eval_steps)
        state = json.loads((folder / "trainer_state.json").read_text())
        results = json.loads((folder / "all_results.json").read_text())
        evals = [r for r in state["log_history"] if "eval_accuracy" in r]
        record = {
            "mode": mode, "seed": seed, "learning_rate": lr, "upper": upper if mode != "none" else None,
            "steps": state["global_step"], "eval_accuracy": results["eval_accuracy"],
            # (the end of training evaluates once more: one point a step)
            "curve": [list(x) for x in {r["step"]: r["eval_accuracy"] for r in evals}.items()],
            "seconds": results.get("train_runtime"),
        }  # fmt: skip
        self.plan["runs"][name] = record
        self.save()
        for checkpoint in folder.glob("global_step*"):  # the exported model is what is evaluated
            shutil.rmtree(checkpoint, ignore_errors=True)
        return record

    def _launch(self, folder: Path, mode, seed, lr, upper, steps, eval_steps) -> None:
        cli = self.cli
        resume = any(folder.glob("global_step*/"))
        args = [
            "--deepspeed", "ds_configs/zero2.json", "--output_dir", str(folder), "--rose_mode", mode,
            *(["--rose_upper", str(upper)] if mode != "none" else []), "--learning_rate", str(lr), "--seed", str(seed),
            "--per_device_train_batch_size", str(cli.batch_size), "--max_seq_length", str(cli.max_seq_length),
            "--logging_steps", "10", "--save_steps", str(cli.save_steps), "--save_total_limit", "1",
            "--eval_steps", str(eval_steps or 0),
            *(["--resume_from_checkpoint", "auto"] if resume else ["--overwrite_output_dir"]),
            "--max_steps", str(steps), "--warmup_steps", str(steps // 10),
            *(["--max_train_samples", str(cli.train_samples)] if cli.train_samples else []),
            *cli.finetune_args,
        ]  # fmt: skip
        folder.parent.mkdir(parents=True, exist_ok=True)
        if cli.nproc > 1:
            cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(cli.nproc), "--master_port",
                   str(cli.master_port), "launch/finetune.py", *args]  # fmt: skip
        else:
            cmd = [sys.executable, "launch/finetune.py", *args]
        print(f"== {folder.name}: {mode} seed {seed} lr {lr} upper {upper}", flush=True)
        with open(folder.with_suffix(".log"), "a") as log:
            code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            fail(f"training {folder} failed (exit {code}); see {folder.with_suffix('.log')}")

    def epoch_steps(self) -> int:
        """Optimizer steps per epoch: the training split as the program draws it (each rank's share of a
        ``DistributedSampler``, whole batches)."""
        if "epoch_steps" not in self.plan:
            from rose_ds.training.data import SHARED_ADVGLUE, load_rotten_tomatoes

            # the program's own default: the shared AdvGLUE file where there is one, else the hub
            adv = str(SHARED_ADVGLUE) if SHARED_ADVGLUE.is_file() else None
            examples = len(load_rotten_tomatoes(adv, seed=1)["train"])
            if self.cli.train_samples:
                examples = min(examples, self.cli.train_samples)
            self.plan["epoch_steps"] = -(-examples // self.cli.nproc) // self.cli.batch_size
            self.plan["train_examples"] = examples
        return self.plan["epoch_steps"]


# ------------------------------------------------------------------------------------------- stages
def stop_of(curve: list[list[float]], tolerance: float) -> int:
    """The first evaluation step after which no later accuracy beats the best so far by more than
    ``tolerance``: where the curve stops improving."""
    best = float("-inf")
    for i, (step, acc) in enumerate(curve):
        best = max(best, acc)
        if all(later <= best + tolerance for _, later in curve[i + 1 :]):
            return int(step)
    raise ValueError("an empty curve")


def budget(exp: Experiment) -> bool:
    cli, plan = exp.cli, exp.plan
    steps = cli.epochs * exp.epoch_steps()
    curves = {}
    for lr in cli.lrs:
        run = exp.train(f"budget-lr{lr}", cli.out / "select" / f"budget-lr{lr}", "none", 1, lr, 0, steps,
                        eval_steps=cli.eval_steps)  # fmt: skip
        if run is None:
            return False
        curves[lr] = run["curve"]
    lr = max(cli.lrs, key=lambda x: (max(a for _, a in curves[x]), -x))  # ties: the smaller rate
    plan["budget"] = {"steps": stop_of(curves[lr], cli.tolerance), "from_learning_rate": lr,
                      "curve_steps": steps, "epochs": cli.epochs, "tolerance": cli.tolerance,
                      "best_accuracy": max(a for _, a in curves[lr])}  # fmt: skip
    exp.save()
    b = plan["budget"]
    print(f"budget: {b['steps']} steps ({b['steps'] / exp.epoch_steps():.2f} epochs; vanilla lr {lr}, "
          f"best clean accuracy {b['best_accuracy']:.4f})", flush=True)  # fmt: skip
    return True


def select(exp: Experiment) -> bool:
    cli, plan = exp.cli, exp.plan
    if "budget" not in plan:
        fail("no budget yet: run the budget stage first")
    steps = plan["budget"]["steps"]
    chosen = plan.setdefault("chosen", {})

    def run(mode, lr, upper):
        return exp.train(selection_name(mode, lr, upper), cli.out / "select" / selection_name(mode, lr, upper),
                         mode, 1, lr, upper, steps, eval_steps=cli.eval_steps)  # fmt: skip

    for mode in cli.modes:
        if mode in chosen:
            continue
        upper = PUBLISHED_UPPER.get(mode, 0)
        by_lr = {lr: run(mode, lr, upper) for lr in cli.lrs}
        if None in by_lr.values():
            return False
        lr = max(cli.lrs, key=lambda x: (by_lr[x]["eval_accuracy"], -x))
        candidates = {upper: by_lr[lr]}
        if mode != "none":
            for u in cli.uppers:
                candidates[u] = candidates.get(u) or run(mode, lr, u)
                if candidates[u] is None:
                    return False
        best = max(candidates, key=lambda u: (candidates[u]["eval_accuracy"], u == upper, -u))
        chosen[mode] = {
            "learning_rate": lr,
            "upper": best if mode != "none" else None,
            "eval_accuracy": candidates[best]["eval_accuracy"],
            "run": selection_name(mode, lr, best),
        }
        exp.save()
        print(f"{NAMES[mode]}: learning rate {lr}, upper {chosen[mode]['upper']} "
              f"(clean accuracy {chosen[mode]['eval_accuracy']:.4f})", flush=True)  # fmt: skip
    return True


def selection_name(mode: str, lr: float, upper: int) -> str:
    return f"{mode}-lr{lr}" + (f"-upper{upper}" if mode != "none" else "")


def final(exp: Experiment) -> bool:
    cli, plan = exp.cli, exp.plan
    missing = [m for m in cli.modes if m not in plan.get("chosen", {})]
    if missing:
        fail(f"no settings chosen for {', '.join(missing)} yet: run the select stage first")
    previous = finished_elsewhere(cli.record / "results.json")
    for seed in cli.seeds:
        for mode in cli.modes:
            if (mode, seed) in previous:
                continue
            c = plan["chosen"][mode]
            name, folder = f"{mode}-seed{seed}", cli.out / "train" / f"{mode}-seed{seed}"
            if seed == 1 and not folder.exists() and (cli.out / "select" / c["run"]).is_dir():
                folder.parent.mkdir(parents=True, exist_ok=True)
                folder.symlink_to(Path("..") / "select" / c["run"])  # the selection run is this run
            run = exp.train(name, folder, mode, seed, c["learning_rate"], c["upper"] or 0, plan["budget"]["steps"],
                            eval_steps=cli.eval_steps)  # fmt: skip
            if run is None:
                return False
            if folder.is_symlink():  # one run, counted once in the compute
                run["same_run_as"] = c["run"]
                exp.save()
    return True


def finished_elsewhere(results: Path) -> set[tuple[str, int]]:
    """(mode, seed) of the rows an earlier report holds: trained and evaluated on another machine."""
    if not results.is_file():
        return set()
    table = json.loads(results.read_text())
    return {(mode, seed) for mode, row in table.items() if mode in NAMES for seed in row["seeds"]}


def evaluate(exp: Experiment) -> bool:
    cli = exp.cli
    if not (cli.out / "train").is_dir():
        print("evaluate: no final runs on this machine", flush=True)
        return True
    cmd = [sys.executable, "launch/robustness.py", "evaluate", str(cli.out), "--examples", str(cli.examples),
           "--surface", str(cli.surface)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("EVAL_THREADS", str(os.cpu_count())))
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        fail("launch/robustness.py evaluate failed (its message is above)")
    return True


def report(exp: Experiment) -> bool:
    cli, plan = exp.cli, exp.plan
    previous = cli.record / "results.json"
    if (cli.out / "robustness").is_dir():
        cmd = [sys.executable, "launch/robustness.py", "report", str(cli.out),
               *(["--previous", str(previous)] if previous.is_file() else [])]  # fmt: skip
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            fail("launch/robustness.py report failed (its message is above)")
        cli.record.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", "results.json", "results.png", "landscape.png"):
            if (cli.out / name).is_file():
                shutil.copyfile(cli.out / name, cli.record / name)
    plot_curves(plan, cli.record / "curves.png")
    runs = [r for r in plan["runs"].values() if "same_run_as" not in r]
    total = sum(r["seconds"] or 0 for r in runs)
    plan["compute"] = {"training_seconds": total, "runs": len(runs)}
    exp.save()
    print(f"training compute so far: {total / 3600:.2f} h over {len(runs)} runs; {cli.record}", flush=True)
    return True


def plot_curves(plan: dict, path: Path) -> None:
    """Clean validation accuracy against steps: the budget curves, then each method's final runs (mean
    over the seeds that have a curve), with the chosen budget marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = plan["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, run in sorted(runs.items()):
        if name.startswith("budget-") and run["curve"]:
            axes[0].plot(*zip(*run["curve"]), label=f"vanilla lr {run['learning_rate']:g}")
    for mode, title in NAMES.items():
        curves = [r["curve"] for n, r in runs.items() if n.startswith(f"{mode}-seed") and r["curve"]]
        if curves:
            steps = [s for s, _ in curves[0]]
            mean = [statistics.fmean(c[i][1] for c in curves if len(c) > i) for i in range(len(steps))]
            axes[1].plot(steps, mean, label=f"{title} ({len(curves)} seeds)")
    if "budget" in plan:
        for ax in axes:
            ax.axvline(plan["budget"]["steps"], color="grey", linestyle=":", label="budget")
    axes[0].set_title("budget: vanilla, seed 1")
    axes[1].set_title("final runs at the budget, mean over seeds")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("clean validation accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("stages", nargs="*", default=[], help=f"stages to run, of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "converged", help="run folders")
    parser.add_argument("--record", type=Path, default=ROOT / "docs" / "converged",
                        help="plan.json and the report: what travels between machines (commit it)")  # fmt: skip
    parser.add_argument("--train_samples", type=int, default=None, help="train on the first N examples (default: all)")
    parser.add_argument("--epochs", type=int, default=3, help="length of the budget curves, in epochs (>= 2)")
    parser.add_argument("--eval_steps", type=int, default=100, help="clean validation every N optimizer steps")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.005,
        help="an accuracy gain (fraction) below which the curve counts as no longer improving",
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-5, 5e-5, 1e-4], help="learning rates searched")
    parser.add_argument("--uppers", type=int, nargs="+", default=[30, 40, 60, 70, 80, 90], help="uppers searched")
    parser.add_argument("--modes", nargs="+", choices=list(NAMES), default=list(NAMES), help="methods compared")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the final runs")
    parser.add_argument("--examples", type=int, default=200, help="attacked validation examples per run")
    parser.add_argument("--surface", type=int, default=7, help="loss-surface grid points per axis (0: none)")
    parser.add_argument("--batch_size", type=int, default=8, help="micro-batch per process")
    parser.add_argument("--max_seq_length", type=int, default=64, help="tokens per example")
    parser.add_argument("--save_steps", type=int, default=100, help="checkpoint every N steps (a killed run resumes)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (deepspeed --num_gpus)")
    parser.add_argument("--master_port", type=int, default=29599, help="rendezvous port of the runs")
    parser.add_argument(
        "--stop_after",
        type=float,
        default=None,
        metavar="MINUTES",
        help="start no training run after this many minutes (the session's end)",
    )
    parser.add_argument("--finetune_args", type=shlex.split, default=[],
                        help='more launch/finetune.py flags for every run, as one string: "--rose_k 0.2"')  # fmt: skip
    cli = parser.parse_args(argv)
    unknown = [s for s in cli.stages if s not in STAGES]
    if unknown:
        fail(f"stage {unknown[0]!r}: choose from {', '.join(STAGES)}")
    if cli.epochs < 2:
        fail(f"--epochs {cli.epochs}: the budget curve must cover at least 2 epochs")
    if 1 not in cli.seeds:
        fail(f"--seeds {cli.seeds}: seed 1 is the selection seed and must be among them")
    exp = Experiment(cli)
    os.environ.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), DS_ACCELERATOR="cpu",
                      HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")  # fmt: skip
    steps = {"budget": budget, "select": select, "final": final, "evaluate": evaluate, "report": report}
    for stage in [s for s in STAGES if s in (cli.stages or STAGES)]:
        if not steps[stage](exp):
            print(f"stopped in {stage} after {cli.stop_after} minutes; run the same command again to go on", flush=True)
            return


if __name__ == "__main__":
    main()
