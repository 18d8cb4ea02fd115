"""Robustness of fine-tuned models: attacks, flatness, and the results table of docs/RESULTS.md.

    python launch/robustness.py attack runs/finetune --attack pwws --examples 200   # one saved model
    python launch/robustness.py evaluate runs/robustness    # every run in runs/robustness/train/
    python launch/robustness.py report runs/robustness      # the table and the plots

``attack`` attacks the first ``--examples`` validation examples of a run of launch/finetune.py (the
same split the run evaluated on, rebuilt from its ``run_config.json``) with ``rose_ds.attacks``.
``evaluate`` does, for every run folder under ``DIR/train``: both attacks, the sharpness
(``rose_ds.analysis.sharpness``) on the first ``--eval_samples`` validation examples and, for the
first seed of each ROSE mode (runs without ``--method``), the 1-D/2-D loss surfaces; one
``DIR/robustness/<run>.json`` per run (finished runs are skipped, so it resumes). ``report`` writes
``DIR/results.md``, ``DIR/results.json``, ``DIR/results.png`` (per-metric means with seed spread)
and ``DIR/landscape.png``; with ``--previous OLD/results.json`` it adds the seeds of the earlier table that
``DIR`` has no record of (a table finished on another machine: runs folders do not travel, a results.json
holds every seed's values). Single-sentence tasks only (the attacks edit one text). One process, CPU or
the accelerator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from rose_ds import analysis, attacks
from rose_ds.training import RecipeError
from rose_ds.training import data as rose_data
from rose_ds.training.args import FinetuneArgs

ATTACKS = ("deepwordbug", "pwws")
ROSE_NAMES = {"none": "vanilla", "first": "ROSE-First", "second": "ROSE-Second", "ensemble": "ROSE-Ensemble"}
METHOD_NAMES = {"rdrop": "R-Drop", "r3f": "R3F", "childtuning-f": "ChildTuning-F", "childtuning-d": "ChildTuning-D"}
# table rows, in order: the ROSE variants, then each method alone and with each ROSE variant on top
METHODS = dict(ROSE_NAMES)
for _key, _title in METHOD_NAMES.items():
    METHODS[_key] = _title
    METHODS.update({f"{_key}+{mode}": f"{_title} + {ROSE_NAMES[mode]}" for mode in ("first", "second", "ensemble")})


def variant(args) -> str:
    """A run's row: its ROSE mode, or its --method alone (mode none) or with the mode: 'rdrop+ensemble'."""
    if args.method == "none":
        return args.rose_mode
    return args.method if args.rose_mode == "none" else f"{args.method}+{args.rose_mode}"


# (key in a run's results, column title, higher is better)
METRICS = (
    ("clean_accuracy", "clean acc.", True),
    ("adv_accuracy", "AdvGLUE SST-2 acc.", True),
    ("deepwordbug_accuracy_under_attack", "DeepWordBug acc. under attack", True),
    ("deepwordbug_attack_success_rate", "DeepWordBug success rate", False),
    ("pwws_accuracy_under_attack", "PWWS acc. under attack", True),
    ("pwws_attack_success_rate", "PWWS success rate", False),
    ("pwws_avg_perturbed_words", "PWWS perturbed words", True),
    ("sharpness", "sharpness", False),
    ("kept_fraction", "kept fraction", None),
    ("train_loss", "final train loss", None),
)


def fail(message: str) -> None:
    sys.exit(f"robustness.py: error: {message}")


def load_run(run_dir: Path):
    """The exported model, tokenizer, run arguments, raw validation texts/labels and tokenized validation."""
    config_file = run_dir / "run_config.json"
    if not config_file.is_file() or not (run_dir / "model.safetensors").is_file():
        fail(f"{run_dir} holds no finished launch/finetune.py run (run_config.json and model.safetensors)")
    run = json.loads(config_file.read_text())
    try:
        args = FinetuneArgs(**run["args"])
    except RecipeError as err:
        fail(f"{config_file}: {err}")
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(run_dir, use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    spec = rose_data.TASKS.get(args.task_name)
    adv_file = args.adv_file or (str(rose_data.SHARED_ADVGLUE) if rose_data.SHARED_ADVGLUE.is_file() else None)
    if args.train_file:
        if args.text_pair_column:
            fail("the attacks edit single texts; this run was trained on text pairs")
        raw = rose_data.load_local(args.train_file, args.validation_file, (args.text_column,), args.label_column)[0]
        column = args.text_column
    elif args.task_name == "rotten_tomatoes":
        raw, column = rose_data.load_rotten_tomatoes(adv_file, seed=args.seed), "sentence"
    else:
        if len(spec.text_columns) > 1:
            fail(f"the attacks edit single texts; {args.task_name} is a pair task")
        raw, column = rose_data.load_glue(args.task_name), spec.text_columns[0]
    validation = raw["validation"]
    try:
        tokenized = rose_data.load_task(args, tokenizer).validation
    except RecipeError as err:
        fail(str(err))
    return model, tokenizer, args, validation[column], validation["label"], tokenized


def attack_run(run_dir: Path, attack: str, examples: int, seed: int, batch_size: int = 64) -> dict:
    model, tokenizer, args, texts, labels, _ = load_run(run_dir)
    victim = attacks.Victim(model, tokenizer, batch_size=batch_size, max_length=args.max_seq_length,
                            device=get_accelerator().current_device_name())  # fmt: skip
    synonyms = attacks.Synonyms(attacks.load_wordnet()) if attack == "pwws" else None
    start = time.perf_counter()
    summary, results = attacks.run_attack(victim, attack, texts[:examples], labels[:examples], seed=seed,
                                          synonyms=synonyms)  # fmt: skip
    summary["seconds"] = time.perf_counter() - start
    return {"summary": summary, "results": results}


def batches_of(tokenized, tokenizer, samples: int | None, batch_size: int = 64) -> list[dict]:
    subset = tokenized.select(range(min(samples or len(tokenized), len(tokenized))))
    collate = DataCollatorWithPadding(tokenizer)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate)
    device = get_accelerator().current_device_name()
    return [{k: v.to(device) for k, v in batch.items()} for batch in loader]


def evaluate_runs(root: Path, examples: int, surface: int, eval_samples: int | None, seed: int, rho: float,
                  samples: int, span: float, only: list[str] | None = None) -> None:  # fmt: skip
    runs = sorted(p for p in (root / "train").iterdir() if p.is_dir())
    if not runs:
        fail(f"no runs in {root / 'train'}; train them first (launch/reproduce.sh)")
    # surfaces for the first seed of each ROSE mode (not of the --method runs: 6 min each on 2 cores, and
    # the methods' rows compare accuracies), whichever runs this process is given
    first_seed = min(json.loads((r / "run_config.json").read_text())["args"]["seed"] for r in runs
                     if (r / "run_config.json").is_file())  # fmt: skip
    if only:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            fail(f"--runs {unknown[0]}: no such run in {root / 'train'}")
        runs = [r for r in runs if r.name in only]
    out_dir = root / "robustness"
    out_dir.mkdir(exist_ok=True)
    wordnet = attacks.Synonyms(attacks.load_wordnet())
    for run_dir in runs:
        out = out_dir / f"{run_dir.name}.json"
        if out.is_file():
            continue
        if not (run_dir / "model.safetensors").is_file():  # still training (or failed): evaluated on a re-run
            print(f"{run_dir.name}: not finished, skipped", flush=True)
            continue
        start = time.perf_counter()
        model, tokenizer, args, texts, labels, tokenized = load_run(run_dir)
        device = get_accelerator().current_device_name()
        model.to(device).eval()
        evaluation = json.loads((run_dir / "eval_results.json").read_text())
        record = {"run": run_dir.name, "method": variant(args), "seed": args.seed, "learning_rate": args.learning_rate,
                  "max_steps": args.max_steps, "clean_accuracy": evaluation["eval_accuracy"],
                  "adv_accuracy": evaluation.get("eval_adv_accuracy"), "attack_examples": examples}  # fmt: skip
        for attack in ATTACKS:
            victim = attacks.Victim(model, tokenizer, max_length=args.max_seq_length, device=device)
            summary, results = attacks.run_attack(victim, attack, texts[:examples], labels[:examples], seed=seed,
                                                  synonyms=wordnet)  # fmt: skip
            record.update({f"{attack}_{k}": v for k, v in summary.items()})
            record[f"{attack}_examples_shown"] = [r for r in results if r["status"] == "succeeded"][:3]
            print(f"{run_dir.name} {attack}: accuracy under attack {summary['accuracy_under_attack']:.3f}, "
                  f"success rate {summary['attack_success_rate']:.3f}", flush=True)  # fmt: skip
        batches = batches_of(tokenized, tokenizer, eval_samples)
        sharp = analysis.sharpness(model, batches, rho=rho, samples=samples, seed=seed)
        record.update(sharpness=sharp["sharpness"], sharpness_std=sharp["sharpness_std"], base_loss=sharp["base_loss"],
                      sharpness_rho=rho, sharpness_samples=samples,
                      sharpness_examples=sum(len(b["labels"]) for b in batches))  # fmt: skip
        if args.seed == first_seed and surface > 1 and args.method == "none":
            record["landscape"] = analysis.landscape(model, batches, steps=surface, span=span, seed=seed)
        record["seconds"] = time.perf_counter() - start
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(out)  # a finished record or none: a killed evaluation is redone
        print(f"{run_dir.name}: sharpness {record['sharpness']:.4f}, {record['seconds']:.0f} s", flush=True)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _number(mean: float, std: float, n: int, digits: int, sign: str = "") -> str:
    """``mean ± std``; one seed has no spread to show, so only its value."""
    text = f"{mean:{sign}.{digits}f}"
    return text if n < 2 else f"{text} ± {std:.{digits}f}"


def report(root: Path, previous: Path | None = None) -> dict:
    if not root.is_dir():
        fail(f"{root}: no such folder; give the experiment folder (launch/reproduce.sh's OUT)")
    records = [json.loads(p.read_text()) for p in sorted((root / "robustness").glob("*.json"))]
    if not records and previous is None:
        fail(f"no results in {root / 'robustness'}; run `robustness.py evaluate {root}` first")
    for record in records:  # from the training log: how much ROSE froze, and how far training got
        run_dir = root / "train" / record["run"]
        logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        logs = [x for x in logs if "loss" in x]
        record["kept_fraction"] = statistics.fmean(x["kept_fraction"] for x in logs)
        record["train_loss"] = statistics.fmean(x["loss"] for x in logs[-5:])
        if record["method"].rpartition("+")[2] in set(ROSE_NAMES) - {"none"}:  # a run with ROSE masks
            record["kinds"] = kinds_of_run(run_dir)
    if previous is not None:
        records += earlier_records(previous, {(r["method"], r["seed"]) for r in records})
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    table: dict[str, dict] = {}
    for method in methods:
        rows = sorted((r for r in records if r["method"] == method), key=lambda r: r["seed"])
        table[method] = {"seeds": [r["seed"] for r in rows]}
        for key, _, _ in METRICS:
            values = [r[key] for r in rows if r.get(key) is not None]
            table[method][key] = {"values": values, "mean": _mean_std(values)[0], "std": _mean_std(values)[1]}
        table[method]["kinds"] = [{"seed": r["seed"], **r["kinds"]} for r in rows if "kinds" in r]
    # Paired by seed: a method and vanilla share the seed's data split, order and initialisation.
    for method in methods:
        for key, _, _ in METRICS:
            base = {r["seed"]: r[key] for r in records if r["method"] == "none" and r.get(key) is not None}
            diffs = [r[key] - base[r["seed"]] for r in records if r["method"] == method and r["seed"] in base]
            if method != "none" and diffs:
                table[method][key]["diff_vs_vanilla"] = dict(zip(("mean", "std"), _mean_std(diffs)))
    # Paired by seed: what ROSE adds on top of each method ("rdrop+ensemble" against "rdrop").
    on_top = []
    for method in methods:
        base_method = method.partition("+")[0]
        if "+" not in method or base_method not in methods:
            continue
        cells = []
        for key, _, _ in METRICS:
            base = {r["seed"]: r[key] for r in records if r["method"] == base_method and r.get(key) is not None}
            diffs = [r[key] - base[r["seed"]] for r in records if r["method"] == method and r["seed"] in base]
            if diffs:
                table[method][key]["diff_vs_method"] = dict(zip(("mean", "std"), _mean_std(diffs)))
            scale = 1 if key.endswith(("words", "sharpness", "loss")) else 100
            digits = {"sharpness": 4, "train_loss": 3}.get(key, 2)
            mean, std = _mean_std(diffs) if diffs else (0.0, 0.0)
            cells.append(_number(mean * scale, std * scale, len(diffs), digits, "+") if diffs else "-")
        on_top.append(f"| {METHODS[method]} vs {METHODS[base_method]} | " + " | ".join(cells) + " |")
    lines = ["| method | seeds | " + " | ".join(title for _, title, _ in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]  # fmt: skip
    for method in methods:
        cells = []
        for key, _, _ in METRICS:
            cell = table[method][key]
            scale = 1 if key.endswith(("words", "sharpness", "loss")) else 100
            digits = {"sharpness": 4, "train_loss": 3}.get(key, 2)
            n = len(cell["values"])
            text = _number(cell["mean"] * scale, cell["std"] * scale, n, digits)
            if "diff_vs_vanilla" in cell:
                d = cell["diff_vs_vanilla"]
                text += f" ({_number(d['mean'] * scale, d['std'] * scale, n, digits, '+')})"
            cells.append(text)
        lines.append(f"| {METHODS[method]} | {len(table[method]['seeds'])} | " + " | ".join(cells) + " |")
    note = (
        "Mean ± standard deviation over seeds; accuracies, rates and the kept fraction (mean c of the eligible "
        "tensors over the logged steps) in %, sharpness as a loss increase, train loss the mean of the last 5 "
        "logged values. In parentheses: the paired difference to vanilla (same seed), mean ± std over seeds. "
        "A row of one seed shows its value (no spread)."
    )
    kinds = kept_by_kind(table, methods)
    kinds_note = ("Kept (mean c, %) per kind of eligible tensor over all steps, layers and seeds (those whose "
                  "training folder the report has read); changes per step: the fraction of eligible tensors whose c "
                  "differs from the previous step (%).")  # fmt: skip
    if on_top:
        header = "| ROSE on top of a method | " + " | ".join(title for _, title, _ in METRICS) + " |"
        on_top = [
            header,
            "|---|" + "---|" * len(METRICS),
            *on_top,
            "",
            "Paired differences (same seed), mean ± std over seeds, in the units of the main table.",
        ]
        note += "\n\n" + "\n".join(on_top)
    (root / "results.md").write_text("\n".join(lines) + "\n\n" + note + "\n\n" + kinds + "\n\n" + kinds_note + "\n")
    (root / "results.json").write_text(json.dumps(table, indent=1))
    _plot_metrics(table, methods, root / "results.png")
    landscapes = {METHODS[r["method"]]: r["landscape"] for r in records if "landscape" in r}
    if landscapes:
        analysis.plot_landscapes(landscapes, root / "landscape.png")
    print("\n".join(lines) + "\n\n" + kinds)
    return table


KINDS = (("attention.self.query", "query"), ("attention.self.key", "key"), ("attention.self.value", "value"),
         ("attention.output.dense", "attn. out"), ("intermediate.dense", "FFN in"), ("output.dense", "FFN out"),
         ("LayerNorm", "LayerNorm"))  # fmt: skip


def _kind(name: str) -> str:
    return next((label for key, label in KINDS if key in name), "other")


def kinds_of_run(run_dir: Path) -> dict[str, float]:
    """How often each kind of eligible tensor was updated in one run (mean c over its steps and layers), and
    how often a mask changed, from the mask history the program keeps in trainer_state.json."""
    state = json.loads((run_dir / "trainer_state.json").read_text())
    history = torch.tensor(state["mask_history"], dtype=torch.float64)  # steps x tensors
    per_kind: dict[str, list[float]] = {}
    for j, name in enumerate(state["eligible_tensors"]):
        per_kind.setdefault(_kind(name), []).append(float(history[:, j].mean()))
    kinds = {label: statistics.fmean(values) for label, values in per_kind.items()}
    kinds["changes per step"] = float((history[1:] != history[:-1]).double().mean())
    return kinds


def kept_by_kind(table: dict, methods: list[str]) -> str:
    """The per-kind table over the seeds that have a kind summary: does ROSE select dynamically, or always
    the same? (Every seed has the same tensors of each kind, so the mean of the seeds' means is the mean
    over all tensors.)"""
    labels = [label for _, label in KINDS] + ["changes per step"]
    rows = []
    for method in methods:
        seeds = table[method]["kinds"]
        if not seeds:
            continue
        cells = [f"{100 * statistics.fmean(s[label] for s in seeds):.{1 if label == labels[-1] else 0}f}"
                 if all(label in s for s in seeds) else "-" for label in labels]  # fmt: skip
        rows.append(f"| {METHODS[method]} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(["| method | seeds | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels), *rows])


def earlier_records(path: Path, have: set[tuple[str, int]]) -> list[dict]:
    """The per-seed values of an earlier ``results.json`` as records, for the (row, seed) pairs not in
    ``have``: a table can be finished on another machine, whose runs folder holds only the new seeds."""
    try:
        table = json.loads(path.read_text())
        rows = [(method, row["seeds"], row) for method, row in table.items() if method in METHODS]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        fail(f"--previous {path}: not a results.json written by `robustness.py report` ({error})")
    records = []
    for method, seeds, row in rows:
        kinds = {k["seed"]: k for k in row.get("kinds", [])}
        for i, seed in enumerate(seeds):
            if (method, seed) in have:
                continue
            record = {"method": method, "seed": seed, "from": str(path)}
            # a metric some seed lacked (None) has fewer values than seeds: which is whose is then unknown
            record.update({key: row[key]["values"][i] for key, _, _ in METRICS
                           if key in row and len(row[key]["values"]) == len(seeds)})  # fmt: skip
            if seed in kinds:
                record["kinds"] = {k: v for k, v in kinds[seed].items() if k != "seed"}
            records.append(record)
    return records


def _plot_metrics(table: dict, methods: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(METRICS) / 2, 8.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, (len(METRICS) + 1) // 2).ravel()
    for ax, (key, title, higher) in zip(axes, METRICS):
        for i, method in enumerate(methods):
            cell = table[method][key]
            ax.bar(i, cell["mean"], yerr=cell["std"], capsize=3, color=f"C{i}")
            ax.scatter([i] * len(cell["values"]), cell["values"], color="black", s=8, zorder=3)
        # vertical names: with the methods' rows there are up to 12 bars per panel
        ax.set_xticks(range(len(methods)), [METHODS[m] for m in methods], rotation=90, fontsize=7)
        better = "" if higher is None else f" ({'higher' if higher else 'lower'} is better)"
        ax.set_title(title + better, fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("attack", help="attack one saved run", allow_abbrev=False)
    one.add_argument("run", type=Path, help="a launch/finetune.py --output_dir")
    one.add_argument("--attack", choices=ATTACKS, default="pwws", help="which attack")
    one.add_argument("--examples", type=int, default=200, help="attack the first N validation examples")
    one.add_argument("--seed", type=int, default=0, help="seed of the character edits")
    one.add_argument("--output", type=Path, default=None, help="also write the summary and every result as JSON")
    every = sub.add_parser("evaluate", help="attacks and flatness of every run in DIR/train", allow_abbrev=False)
    every.add_argument("root", type=Path, help="the experiment folder (launch/reproduce.sh's OUT)")
    every.add_argument("--examples", type=int, default=200, help="attack the first N validation examples")
    every.add_argument("--surface", type=int, default=11, help="loss-surface grid points per axis (0: none)")
    every.add_argument("--eval_samples", type=int, default=256, help="validation examples for the flatness")
    every.add_argument("--rho", type=float, default=0.1, help="relative size of the sharpness perturbation")
    every.add_argument("--sharpness_samples", type=int, default=10, help="random directions averaged for sharpness")
    every.add_argument("--span", type=float, default=0.5, help="loss surfaces cover [-span, span] on each axis")
    every.add_argument("--seed", type=int, default=0, help="seed of the edits and the random directions")
    every.add_argument("--runs", nargs="+", default=None, help="only these run folders (e.g. to share the work "
                       "between processes); default: all")  # fmt: skip
    rep = sub.add_parser("report", help="the table and plots from DIR/robustness", allow_abbrev=False)
    rep.add_argument("root", type=Path, help="the experiment folder")
    rep.add_argument("--previous", type=Path, default=None, help="an earlier results.json: its seeds of a row "
                     "that DIR has no record of are added (finish a table on another machine)")  # fmt: skip
    cli = parser.parse_args(argv)
    for name in ("examples", "surface", "eval_samples", "sharpness_samples", "rho", "span"):
        value = getattr(cli, name, 1)
        if value is not None and value <= 0 and not (name == "surface" and value == 0):
            fail(f"--{name} must be > 0 (got {value})")
    torch.manual_seed(0)
    if cli.command == "attack":
        result = attack_run(cli.run, cli.attack, cli.examples, cli.seed)
        print(json.dumps(result["summary"], indent=1))
        if cli.output:
            cli.output.write_text(json.dumps(result, indent=1))
    elif cli.command == "evaluate":
        evaluate_runs(cli.root, cli.examples, cli.surface, cli.eval_samples, cli.seed, cli.rho, cli.sharpness_samples,
                      cli.span, cli.runs)  # fmt: skip
    else:
        report(cli.root, cli.previous)


if __name__ == "__main__":
    main()
