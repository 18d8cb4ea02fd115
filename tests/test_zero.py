"""ROSE on DeepSpeed ZeRO 0-3 against the dense single-process RoseAdamW, as real multi-process jobs.

One torchrun launch per world size runs every case of that world size (tests/dist/worker.py); each
test then compares one case's per-rank masks and consolidated fp32 weights with a dense run of
RoseAdamW on the same global batches.
"""

import functools
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import (
    DECODERS,
    FROZEN,
    assert_adapters_trained,
    case_batch,
    case_model,
    frozen_bert,
    random_batch,
    tiny_bert,
)

from rose_ds import RoseAdamW, RoseConfig, methods, radix
from rose_ds.methods import MethodConfig
from rose_ds.selection import needs_robust_gradient
from rose_ds.training import causal_lm
from rose_ds.zero import decay_param_groups

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from worker import BETAS, EPS, FISHER_BATCHES, LOSSES, LR, WD  # noqa: E402

WORKER = Path(__file__).parent / "dist" / "worker.py"
MODES = ["none", "first", "second", "ensemble"]
ROSE = {m: {"mode": m, "upper": 70} for m in MODES}
STEPS = 5


def _case(name, **kw):
    case = {"name": name, "gas": 1, "micro_bs": 4, "steps": STEPS, "rose": ROSE["ensemble"]}
    case.update(kw)
    return case


# World-size scaling: 4 and 8 ranks (8 processes on 2 cores: for correctness, not speed) run ROSE-Ensemble at
# every stage and the selection-traffic cases, beside the whole grid on 1-3 ranks.
SCALING_WORLDS = (4, 8)


def parity_cases(world):
    modes, gases = (["ensemble"], (1,)) if world in SCALING_WORLDS else (MODES, (1, 2))
    return [
        _case(f"w{world}-s{stage}-{mode}-gas{gas}", stage=stage, gas=gas, rose=ROSE[mode])
        for stage, mode, gas in itertools.product(range(4), modes, gases)
    ]


EXTRA_CASES = {
    2: [
        *[_case(f"offload-s{s}-gas{g}", stage=s, gas=g, offload=True) for s in (1, 2, 3) for g in (1, 2)],
        *[_case(f"clip-s{s}", stage=s, clip=0.05) for s in range(4)],
        _case("subgroups-s3", stage=3, sub_group_size=100),
        *[_case(f"bf16-s{s}", stage=s, dtype="bf16") for s in range(4)],
        *[_case(f"bf16-s{s}-gas2", stage=s, dtype="bf16", gas=2) for s in (1, 2, 3)],
        _case(
            "refuse-bf16-optimizer",
            stage=1,
            dtype="bf16",
            ds_extra={"data_types": {"grad_accum_dtype": "fp32"}},
            expect_error="BF16_Optimizer is not supported",
        ),
        *[_case(f"dropout-s{s}", stage=s, loss="rose", dropout=0.1) for s in range(4)],
    ],
}
# bf16 with gradient accumulation, the configurations that once hid wrong results: fp32 accumulation
# (DeepSpeed then accumulates in a compact fp32 partition, and at stage 1 with offload in
# param.grad_accum), and bf16 accumulation at stage 3 (where the robust gradient was once the bf16
# difference of two accumulated buffers). A robust gradient 1e-4 times the stand-in's, far below the
# task gradient as a dropout KL's is, is where such mistakes show.
ACC32 = {"data_types": {"grad_accum_dtype": "fp32"}}
BF16_ACCUMULATION = [
    *[_case(f"bf16-small-s{s}-gas2", stage=s, dtype="bf16", gas=2, loss="small_stand_in") for s in (1, 2, 3)],
    *[_case(f"bf16acc32-small-s{s}-gas{g}", stage=s, dtype="bf16", gas=g, loss="small_stand_in", ds_extra=ACC32)
      for s in (2, 3) for g in (1, 2)],
    *[_case(f"bf16acc32-small-offload-s{s}-gas2", stage=s, dtype="bf16", gas=2, loss="small_stand_in", offload=True,
            ds_extra=ACC32) for s in (1, 2)],
]  # fmt: skip
EXTRA_CASES[2] += BF16_ACCUMULATION
# 3 ranks: partitions that split tensors unevenly and a padded last rank, for the compact partition's layout
BF16_W3 = [_case(f"bf16acc32-small-w3-s{s}-gas2", stage=s, dtype="bf16", gas=2, loss="small_stand_in", ds_extra=ACC32)
           for s in (2, 3)]  # fmt: skip
EXTRA_CASES.setdefault(3, []).extend(BF16_W3)
# Every tensor kept (ROSE-First, upper 100) must be plain AdamW (mode none) to the bit, whatever the
# precision: the task gradient DeepSpeed accumulates is never touched by the robust backward.
KEEP_ALL = [c["name"] for c in BF16_ACCUMULATION if c["gas"] == 2]
for _c in BF16_ACCUMULATION:
    if _c["name"] in KEEP_ALL:
        for _mode, _upper in (("first", 100), ("none", 70)):
            EXTRA_CASES[2].append({**_c, "name": f"keepall-{_c['name']}-{_mode}", "steps": 3,
                                   "rose": {"mode": _mode, "upper": _upper}})  # fmt: skip
# Frozen parameters (FROZEN: the first parameter and two eligible tensors) handed to the optimizer with
# the rest, as RoseAdamW(model.named_parameters()): the step count, selection and state ignore them.
FROZEN_CASES = [
    *[_case(f"frozen-s{s}-second", stage=s, frozen=True, rose={"mode": "second", "upper": 70, "warmup_steps": 2})
      for s in range(4)],
    _case("frozen-s2-ensemble", stage=2, frozen=True),
    _case("frozen-s3-first-gas2", stage=3, frozen=True, gas=2, rose={"mode": "first", "upper": 70}),
]  # fmt: skip
EXTRA_CASES[2] += FROZEN_CASES
# Element granularity: the band over all ranks' element scores (rose_ds.radix), never gathered.
ELEMENT = [(s, m, "global") for s in range(4) for m in ("first", "second", "ensemble")]
ELEMENT += [(s, "ensemble", "tensor") for s in (2, 3)]
for _s, _m, _scope in ELEMENT:
    EXTRA_CASES[2].append(_case(f"element-s{_s}-{_m}-{_scope}", stage=_s, rose={"mode": _m, "upper": 70,
                                "granularity": "element", "scope": _scope}))  # fmt: skip
for _s in (1, 2, 3):  # gradient accumulation: the robust gradient of the whole accumulated batch, per element
    EXTRA_CASES[2].append(_case(f"element-s{_s}-ensemble-global-gas2", stage=_s, gas=2, rose={"mode": "ensemble",
                                "upper": 70, "granularity": "element"}))  # fmt: skip
EXTRA_CASES[2].append(_case("element-offload-s2", stage=2, offload=True, rose={"mode": "ensemble", "upper": 70,
                            "granularity": "element"}))  # fmt: skip
EXTRA_CASES.setdefault(3, []).append(_case("element-w3-s3-ensemble-global", stage=3, rose={"mode": "ensemble",
                                           "upper": 70, "granularity": "element"}))  # fmt: skip
# Real dropout on one rank: a dense run draws the same masks, so even the ZeRO-3 recomputation of
# the forward passes (same random state) is checked against the dense RoseAdamW.
EXTRA_CASES[1] = [_case(f"dropout-w1-s{s}", stage=s, loss="rose", dropout=0.1) for s in (0, 2, 3)]
TRAFFIC = [(w, s, m, h) for w in (1, 2, 3) for s in (2, 3) for m in ("none", "second", "first") for h in (32, 64)]
TRAFFIC += [(w, 3, m, h) for w in SCALING_WORLDS for m in ("none", "second", "first") for h in (32, 64)]
TRAFFIC += [(w, s, "element", h) for w in (2, 3) for s in (2, 3) for h in (32, 64)]
ROSE["element"] = {"mode": "ensemble", "upper": 70, "granularity": "element"}
for w, s, m, h in TRAFFIC:
    EXTRA_CASES.setdefault(w, []).append(_case(f"traffic-w{w}-s{s}-{m}-h{h}", stage=s, rose=ROSE[m], hidden=h, steps=3))


# Decoders (tiny Llama, Qwen2, GPT-2 from config) with token-level ROSE (rose_ds.causal_lm_losses) and real
# dropout, every mode at ZeRO 0-3: masked prompts and padding make the ranks' micro-batches supervise
# different token counts; the dense run replays each rank's rows with its random stream.
DECODER_CASES = [(f, s, m, 1) for f in DECODERS for s in range(4) for m in ("first", "second", "ensemble")]
DECODER_CASES += [("llama", s, "none", 1) for s in (0, 3)] + [("llama", s, "ensemble", 2) for s in (1, 2, 3)]
DECODER_CASES += [("gpt2", 3, "first", 2), ("qwen2", 2, "second", 2)]
for _f, _s, _mode, _g in DECODER_CASES:
    _rose = {"mode": _mode, "upper": 70, **({"eligibility": "gpt2"} if _f == "gpt2" else {})}
    EXTRA_CASES[2].append(_case(f"decoder-{_f}-s{_s}-{_mode}-gas{_g}", stage=_s, gas=_g, model=_f, loss="causal",
                                dropout=0.1, rose=_rose, seed=5))  # fmt: skip
# composed methods on decoders: R-Drop's per-token term (also where ROSE needs no robust loss) and
# ChildTuning-F's gradient masks
DECODER_METHODS = [("llama", 2, "ensemble", "rdrop"), ("gpt2", 3, "second", "rdrop"), ("qwen2", 1, "none", "rdrop"),
                   ("llama", 3, "ensemble", "childtuning-f"), ("qwen2", 0, "first", "childtuning-f"),
                   ("llama", 3, "ensemble", "childtuning-d"), ("gpt2", 2, "second", "childtuning-d"),
                   ("llama", 2, "ensemble", "r3f"), ("gpt2", 3, "first", "r3f"),
                   ("qwen2", 1, "second", "r3f")]  # fmt: skip
for _f, _s, _mode, _m in DECODER_METHODS:
    _rose = {"mode": _mode, "upper": 70, **({"eligibility": "gpt2"} if _f == "gpt2" else {})}
    EXTRA_CASES[2].append(_case(f"decoder-{_f}-s{_s}-{_mode}-{_m}", stage=_s, model=_f, loss="causal", dropout=0.1,
                                rose=_rose, seed=5, method={"name": _m, "rdrop_alpha": 0.5, "r3f_eps": 0.05,
                                                            "seed": 3}))  # fmt: skip

# LoRA (rank 4 on every linear layer, the adapters eligible, one selection unit per adapted module) on
# tiny Llama and GPT-2, every mode at ZeRO 0-3, against the dense run of the same LoRA model; and
# gradient checkpointing, against the same run without it (the ZeRO-3 recompute included)
LORA_CASES = [(f, s, m) for f in ("llama", "gpt2") for s in range(4) for m in ("first", "second", "ensemble")]
for _f, _s, _mode in LORA_CASES:
    EXTRA_CASES[2].append(_case(f"lora-{_f}-s{_s}-{_mode}", stage=_s, model=_f, loss="causal", dropout=0.1, lora=True,
                                rose={"mode": _mode, "upper": 40, "eligibility": "lora"}, seed=5))  # fmt: skip
EXTRA_CASES[2].append(
    _case(
        "lora-llama-s2-ensemble-gas2",
        stage=2,
        gas=2,
        model="llama",
        loss="causal",
        dropout=0.1,
        lora=True,
        rose={"mode": "ensemble", "upper": 40, "eligibility": "lora"},
        seed=5,
    )
)
GC_CASES = [(f, s) for f in ("llama", "gpt2") for s in range(4)]
for _f, _s in GC_CASES:
    _twin = next(c for c in EXTRA_CASES[2] if c["name"] == f"decoder-{_f}-s{_s}-ensemble-gas1")
    EXTRA_CASES[2].append({**_twin, "name": f"gc-{_twin['name']}", "grad_ckpt": True})
for _f in ("llama", "gpt2"):
    _twin = next(c for c in EXTRA_CASES[2] if c["name"] == f"lora-{_f}-s3-ensemble")
    EXTRA_CASES[2].append({**_twin, "name": f"gc-{_twin['name']}", "grad_ckpt": True})


# Methods composed with ROSE (R-Drop, R3F, ChildTuning-F) with real dropout and noise: the dense run
# replays each rank's random stream on that rank's rows (dense_run_per_rank).
METHOD_CASES = [(m, s, "ensemble", 1) for m in ("rdrop", "r3f", "childtuning-f") for s in range(4)]
METHOD_CASES += [(m, 2, mode, 1) for m in ("rdrop", "r3f", "childtuning-f") for mode in ("none", "first", "second")]
METHOD_CASES += [("rdrop", 1, "ensemble", 2), ("r3f", 3, "ensemble", 2), ("childtuning-f", 2, "first", 2)]
for _m, _s, _mode, _g in METHOD_CASES:
    EXTRA_CASES[2].append(
        _case(
            f"method-{_m}-s{_s}-{_mode}-gas{_g}",
            stage=_s,
            gas=_g,
            loss="rose",
            dropout=0.1,
            rose={"mode": _mode, "upper": 70},
            method={"name": _m, "r3f_eps": 0.05, "seed": 3},
        )
    )
EXTRA_CASES[2].append(
    _case(
        "method-childtuning-f-s3-element",
        stage=3,
        loss="rose",
        dropout=0.1,
        rose=ROSE["element"],
        method={"name": "childtuning-f", "seed": 3},
    )
)
# ChildTuning-D: the Fisher pass (3 global batches, dropout off) and its fixed mask, every stage and mode
for _s in range(4):
    EXTRA_CASES[2].append(
        _case(
            f"method-childtuning-d-s{_s}-ensemble-gas1",
            stage=_s,
            loss="rose",
            dropout=0.1,
            rose={"mode": "ensemble", "upper": 70},
            method={"name": "childtuning-d"},
        )
    )
for _mode in ("none", "first", "second"):
    EXTRA_CASES[2].append(
        _case(
            f"method-childtuning-d-s2-{_mode}-gas1",
            stage=2,
            loss="rose",
            dropout=0.1,
            rose={"mode": _mode, "upper": 70},
            method={"name": "childtuning-d"},
        )
    )
EXTRA_CASES[2].append(
    _case(
        "method-childtuning-d-s3-ensemble-gas2",
        stage=3,
        gas=2,
        loss="rose",
        dropout=0.1,
        rose={"mode": "ensemble", "upper": 70},
        method={"name": "childtuning-d"},
    )
)
EXTRA_CASES[2].append(
    _case(
        "method-childtuning-d-offload-s2",
        stage=2,
        offload=True,
        loss="rose",
        dropout=0.1,
        rose={"mode": "ensemble", "upper": 70},
        method={"name": "childtuning-d"},
    )
)

# World-size change: 3 steps saved on 2 ranks (micro-batch 3) and on 3 ranks (micro-batch 2), same global
# batch of 6; resumed for 2 more steps on 3 and on 2 ranks through DeepSpeed's universal checkpoint.
RESIZE = [(2, 3), (3, 2)]
for _stage in (1, 2, 3):
    for _saved, _ in RESIZE:
        EXTRA_CASES.setdefault(_saved, []).append(
            _case(f"resize-s{_stage}-save-w{_saved}", stage=_stage, micro_bs=6 // _saved, steps=3, save=True)
        )


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resume_cases(world: int, root: str) -> list[dict]:
    """Resumes, on ``world`` ranks, the checkpoints the other world size saved."""
    saved = next(s for s, w in RESIZE if w == world)
    return [
        _case(f"resize-s{stage}-w{saved}-to-w{world}", stage=stage, micro_bs=6 // world, steps=2,
              resume_from=str(launch(saved, root) / f"resize-s{stage}-save-w{saved}" / "checkpoints" / "global_step3"))
        for stage in (1, 2, 3)
    ]  # fmt: skip


def launch(world: int, root: str, resume: bool = False) -> Path:
    """Runs all cases of one world size in one torchrun job, once; returns the output directory."""
    return _launch(world, root, bool(resume))  # one cache key however it is called (a miss relaunches minutes)


@functools.cache
def _launch(world: int, root: str, resume: bool) -> Path:
    out = Path(root) / f"world{world}{'-resume' if resume else ''}"
    out.mkdir(parents=True, exist_ok=True)
    cases = resume_cases(world, root) if resume else parity_cases(world) + EXTRA_CASES.get(world, [])
    (out / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(world),
        "--master_port",
        str(_free_port()),
        str(WORKER),
        str(out / "cases.json"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        errors = sorted(out.glob("*/error*.txt"))
        detail = errors[0].read_text() if errors else proc.stderr[-3000:]
        raise RuntimeError(f"worker failed ({errors[0].parent.name if errors else 'launch'}): {detail}")
    return out


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("zero"))

    def get(world, name):
        case_dir = launch(world, root, name.startswith("resize-") and "-to-" in name) / name
        ranks = [json.loads((case_dir / f"rank{r}.json").read_text()) for r in range(world)]
        weights = case_dir / "weights.pt"
        return ranks, torch.load(weights) if weights.exists() else None

    get.folder = lambda world: launch(world, root)
    return get


def dense_run(case, world, statistics=None):
    """The single-process RoseAdamW on the same global batches (what every ZeRO run must equal); fills
    ``statistics`` with each step's ``last_statistics`` when given a list."""
    build = frozen_bert if case.get("frozen") else tiny_bert
    model = build(dropout=case.get("dropout", 0.0), seed=case.get("seed", 0), hidden=case.get("hidden", 32))
    rose = RoseConfig(**case["rose"])
    groups = model.named_parameters() if case.get("frozen") else decay_param_groups(model, WD)
    opt = RoseAdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, rose=rose)
    two = rose.mode in ("first", "ensemble")
    loss_fn = LOSSES[case.get("loss", "stand_in")]
    torch.manual_seed(1234)  # the worker's dropout seed on rank 0
    masks = []
    for step in range(case["steps"]):
        inputs, labels = random_batch(step, batch_size=world * case["gas"] * case["micro_bs"])
        losses = loss_fn(model, inputs, labels, two_passes=two)
        if two:
            opt.capture_robust_grads(losses.robust)
        losses.task.backward()
        if case.get("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        opt.step()
        opt.zero_grad()
        masks.append(dict(opt.last_mask))
        if statistics is not None:
            statistics.append(opt.last_statistics)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return masks, weights


def dense_run_per_rank(case, world):
    """The single-process run of a data-parallel step with real randomness: each rank's rows run with that
    rank's random stream (dropout, R3F's noise), and the losses are averaged as the ranks' gradients are."""
    model = case_model(case)
    rose, method = RoseConfig(**case["rose"]), MethodConfig(**case.get("method", {}))
    opt = RoseAdamW(decay_param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, rose=rose,
                    method=method)  # fmt: skip
    two = needs_robust_gradient(rose)
    loss_fn = causal_lm.OBJECTIVE.loss_fn(method) if case.get("model") in DECODERS else methods.loss_fn(method)
    if method.fixed_mask:  # ChildTuning-D: the Fisher pass, each global batch's gradient averaged over ranks
        model.eval()
        params = [dict(model.named_parameters())[n] for n in opt.eligible_names]
        fisher = [torch.zeros_like(p) for p in params]
        for j in range(FISHER_BATCHES):
            inputs, labels = case_batch(case, 100 + j, world * case["micro_bs"])
            if case.get("model") in DECODERS:  # the mean of the ranks' token means
                mb = case["micro_bs"]
                rows = [slice(r * mb, (r + 1) * mb) for r in range(world)]
                loss = sum(loss_fn(model, {k: v[s] for k, v in inputs.items()}, labels[s], two_passes=False).task
                           for s in rows) / world  # fmt: skip
            else:
                loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)  # = the mean of ranks' means
            for f, g in zip(fisher, torch.autograd.grad(loss, params)):
                f.add_(g.square())
        model.train()
        opt.set_childtuning_d_fisher(fisher)
    streams = []
    for r in range(world):
        torch.manual_seed(1234 + r)  # the worker's dropout seed on rank r
        streams.append(torch.get_rng_state())
    masks, mb, gas = [], case["micro_bs"], case["gas"]
    for step in range(case["steps"]):
        inputs, labels = case_batch(case, step, world * gas * mb)
        for k in range(gas):
            for r in range(world):
                rows = slice((k * world + r) * mb, (k * world + r + 1) * mb)
                torch.set_rng_state(streams[r])
                losses = loss_fn(model, {key: v[rows] for key, v in inputs.items()}, labels[rows], two_passes=two)
                streams[r] = torch.get_rng_state()
                if two:
                    opt.capture_robust_grads(losses.robust / (world * gas))
                (losses.task / (world * gas)).backward()
        opt.step()
        opt.zero_grad()
        masks.append(dict(opt.last_mask))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return masks, weights


def assert_matches_dense(case, world, results, weight_rtol=1e-5):
    ranks, weights = results(world, case["name"])
    for r, record in enumerate(ranks):
        assert record["masks"] == ranks[0]["masks"], f"rank {r} selected differently from rank 0"
    per_rank = "method" in case or case.get("model") in DECODERS
    masks, dense = (dense_run_per_rank if per_rank else dense_run)(case, world)
    for step, (got, want) in enumerate(zip(ranks[0]["masks"], masks, strict=True)):
        assert got == want, f"step {step + 1}: mask differs from the dense run"
    a = torch.cat([weights[n].reshape(-1) for n in dense])
    b = torch.cat([dense[n].reshape(-1) for n in dense])
    err = ((a - b).norm() / b.norm()).item()
    assert err <= weight_rtol, f"consolidated weights differ from the dense run by {err:.2e} (relative)"
    return masks


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gas", [1, 2])
def test_parity_with_dense(results, world, stage, mode, gas):
    case = next(c for c in parity_cases(world) if c["name"] == f"w{world}-s{stage}-{mode}-gas{gas}")
    masks = assert_matches_dense(case, world, results)
    values = {v for m in masks for v in m.values()}
    assert values == {1.0} if mode == "none" else values != {1.0}


@pytest.mark.parametrize("world", SCALING_WORLDS)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_four_and_eight_ranks_select_identically_and_match_dense(results, world, stage):
    """ROSE-Ensemble on 4 and 8 ranks at ZeRO 0-3: every rank's mask at every step is rank 0's, and both
    masks and consolidated weights equal the dense single-process run on the same global batches."""
    masks = assert_matches_dense(parity_cases(world)[stage], world, results)
    assert {v for m in masks for v in m.values()} != {1.0}


@pytest.mark.parametrize(
    "name", [c["name"] for c in EXTRA_CASES[2] if c["name"].startswith(("offload", "clip", "sub"))]
)
def test_offload_clipping_and_subgroups(results, name):
    case = next(c for c in EXTRA_CASES[2] if c["name"] == name)
    assert_matches_dense(case, 2, results)


@pytest.mark.parametrize("name", [c["name"] for c in EXTRA_CASES[2] if c["name"].startswith("element")])
def test_element_granularity_matches_dense(results, name):
    case = next(c for c in EXTRA_CASES[2] if c["name"] == name)
    masks = assert_matches_dense(case, 2, results)
    assert any(0 < v < 1 for m in masks[1:] for v in m.values())  # elements, not whole tensors, were frozen


@pytest.mark.parametrize("name", [c["name"] for c in EXTRA_CASES[2] if c["name"].startswith("method")])
def test_methods_composed_with_rose_match_dense(results, name):
    """R-Drop, R3F and ChildTuning-F with every ROSE mode, ZeRO 0-3, accumulation: same masks as the dense
    run at every step, on every rank, and the same weights."""
    case = next(c for c in EXTRA_CASES[2] if c["name"] == name)
    masks = assert_matches_dense(case, 2, results)
    if case["rose"]["mode"] != "none":
        assert any(v < 1 for m in masks for v in m.values())


@pytest.mark.parametrize("name", [c["name"] for c in EXTRA_CASES[2] if c["name"].startswith("decoder")])
def test_decoders_with_token_level_rose_match_dense(results, name):
    """Tiny Llama, Qwen2 and GPT-2 causal LMs, token-level ROSE with real dropout, every mode at ZeRO 0-3
    on 2 ranks: the same masks as the dense run at every step, on every rank, and the same weights."""
    case = next(c for c in EXTRA_CASES[2] if c["name"] == name)
    masks = assert_matches_dense(case, 2, results)
    if case["rose"]["mode"] != "none":
        assert any(v < 1 for m in masks for v in m.values())


def test_element_granularity_on_three_ranks_at_zero3(results):
    assert_matches_dense(EXTRA_CASES[3][-1], 3, results)


BF16 = ["bf16-s0", "bf16-s1", "bf16-s2", "bf16-s3", "bf16-s1-gas2", "bf16-s2-gas2", "bf16-s3-gas2"]
BF16 += [c["name"] for c in BF16_ACCUMULATION]


@pytest.mark.parametrize("name", BF16)
def test_bf16_runs_with_identical_masks_on_every_rank(results, name):
    case = next(c for c in EXTRA_CASES[2] if c["name"] == name)
    ranks, weights = results(2, case["name"])
    assert ranks[0]["masks"] == ranks[1]["masks"]
    assert any(v < 1 for m in ranks[0]["masks"] for v in m.values())
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)
    # bf16 forward/backward: close to the fp32 dense run, not equal
    _, dense = dense_run(case, 2)
    a = torch.cat([weights[n].reshape(-1) for n in dense])
    b = torch.cat([dense[n].reshape(-1) for n in dense])
    assert ((a - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.parametrize(("world", "name"), [(2, n) for n in BF16] + [(3, c["name"]) for c in BF16_W3])
def test_bf16_robust_statistics_are_the_fp32_ones_within_bf16_rounding(results, world, name):
    """At step 1 both runs hold the same weights, so the robust squared norms differ only by bf16's own
    rounding of the forward and backward passes: 8 significant bits (2^-9 = 0.2 % per operation) through
    some six rounded products each way, doubled by squaring, measured 0.9-1.7 % on every configuration
    here, with or without accumulation (1 micro-batch: nothing accumulated, the floor). 3 % is allowed.
    The mistakes this guards against were off by 72 % (stage 3: the bf16 difference of two accumulated
    buffers) and by a factor of 1e7 (stage 2: a compact fp32 partition never exchanged)."""
    case = next(c for c in EXTRA_CASES[world] if c["name"] == name)
    ranks, _ = results(world, name)
    assert all(r["statistics"] == ranks[0]["statistics"] for r in ranks)
    dense: list = []
    dense_run(case, world, dense)
    # DeepSpeed averages gradients over ranks and micro-batches; the dense sum-form robust loss does not
    scale = (world * case["gas"]) ** 2
    got = torch.tensor(ranks[0]["statistics"][0][0], dtype=torch.float64)
    want = dense[0][0] / scale
    assert ((got - want).abs() / want).max().item() < 3e-2


@pytest.mark.parametrize("name", KEEP_ALL)
def test_keep_all_band_is_plain_adamw_to_the_bit_under_bf16_accumulation(results, name):
    (_, kept), (_, plain) = results(2, f"keepall-{name}-first"), results(2, f"keepall-{name}-none")
    for key in plain:
        assert torch.equal(kept[key], plain[key]), f"{key}: ROSE-First keeping every tensor is not AdamW"


@pytest.mark.parametrize("name", [c["name"] for c in FROZEN_CASES])
def test_frozen_parameters_match_dense_at_every_stage(results, name):
    case = next(c for c in FROZEN_CASES if c["name"] == name)
    masks = assert_matches_dense(case, 2, results)
    assert all(set(m) == set(masks[0]) and not set(m) & set(FROZEN) and len(m) == 14 for m in masks)
    if case["rose"]["mode"] == "second":  # the step count moves: masking starts after the 2 warm-up steps
        assert set(masks[0].values()) == set(masks[1].values()) == {1.0}
        assert all(0.0 in m.values() for m in masks[2:])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_real_dropout_passes_select_identically_on_every_rank(results, stage):
    ranks, _ = results(2, f"dropout-s{stage}")
    assert ranks[0]["masks"] == ranks[1]["masks"]
    assert {v for m in ranks[0]["masks"] for v in m.values()} >= {0.5, 1.0}


def _bytes(results, world, stage, mode, hidden, phase):
    """Bytes sent in one phase, summed over the run's steps; the model's size; #eligible tensors."""
    ranks, _ = results(world, f"traffic-w{world}-s{stage}-{mode}-h{hidden}")
    per_step = [b.get(phase, 0) for b in ranks[0]["bytes"]]
    return sum(per_step), per_step, ranks[0]["num_eligible"], ranks[0]["numel"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [2, 3])
def test_element_selection_traffic_does_not_grow_with_the_model(results, world, stage):
    for hidden in (32, 64):
        _, none, n_elig, numel = _bytes(results, world, stage, "none", hidden, "step")
        _, element, _, _ = _bytes(results, world, stage, "element", hidden, "step")
        model = tiny_bert(hidden=hidden)
        opt = RoseAdamW(decay_param_groups(model, WD), rose=RoseConfig(**ROSE["element"]))
        p = sum(dict(model.named_parameters())[n].numel() for n in opt.eligible_names)
        assert p >> 4 >= radix.MIN_SAMPLE  # large enough for the sampled bracket
        # step 1 takes the first-order band (no momentum yet), later steps both, each within the sampled
        # bracket's bound whatever the size (a missed bracket would add the full radix select's rounds);
        # then the kept counts
        bands = [e - n - 2 * n_elig * 8 for e, n in zip(element, none, strict=True)]
        bound = radix.sampled_traffic_bound(2)
        assert 0 < bands[0] <= bound and all(bound / 2 < b <= 2 * bound for b in bands[1:]), (hidden, p, numel, bands)


@pytest.mark.parametrize("world, stage", [(w, s) for w in (1, 2, 3) for s in (2, 3)] + [(w, 3) for w in SCALING_WORLDS])
def test_selection_traffic_is_three_floats_per_eligible_tensor(results, world, stage):
    sizes = []
    for hidden in (32, 64):
        _, none, n_elig, numel = _bytes(results, world, stage, "none", hidden, "step")
        _, second, _, _ = _bytes(results, world, stage, "second", hidden, "step")
        _, first, _, _ = _bytes(results, world, stage, "first", hidden, "step")
        # every step: one all-reduce of 3 x #eligible float64 values, whatever the model and world size
        for n, s2, s1 in zip(none, second, first, strict=True):
            assert s2 - n == 3 * n_elig * 8 == s1 - n
        # ROSE-Second adds nothing to the forward and backward passes
        for phase in ("forward", "backward"):
            assert (
                _bytes(results, world, stage, "second", hidden, phase)[0]
                == _bytes(results, world, stage, "none", hidden, phase)[0]
            )
        if stage == 2:
            # ROSE-First's only full-size addition at stages 0-2: reducing the robust gradient
            assert (
                _bytes(results, world, stage, "first", hidden, "backward")[0]
                == 2 * _bytes(results, world, stage, "none", hidden, "backward")[0]
            )
            assert _bytes(results, world, stage, "first", hidden, "forward")[0] == 0
        sizes.append(numel)
    assert sizes[1] > 2 * sizes[0]  # the two models really differ in size


def test_bf16_optimizer_wrapper_is_refused_at_start(results):
    ranks, _ = results(2, "refuse-bf16-optimizer")
    assert all("BF16_Optimizer is not supported" in r["error"] and "\n" not in r["error"] for r in ranks)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_real_dropout_on_one_rank_matches_dense(results, stage):
    masks = assert_matches_dense(next(c for c in EXTRA_CASES[1] if c["name"] == f"dropout-w1-s{stage}"), 1, results)
    assert {v for m in masks for v in m.values()} >= {0.5, 1.0}


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize(("saved", "world"), RESIZE)
def test_world_size_change_keeps_moments_steps_and_selection(results, stage, saved, world):
    """Saved on ``saved`` ranks after 3 steps, resumed on ``world`` ranks for 2 more: the resumed run
    starts at step 3 with Adam's step count 3 and makes, at steps 4 and 5, exactly the selection of an
    uninterrupted dense RoseAdamW, with weights equal to it (moments restored: Adam's update depends on
    them at every element)."""
    name = f"resize-s{stage}-w{saved}-to-w{world}"
    ranks, weights = results(world, name)
    assert all(r["resumed_at"] == 3 and r["resumed_optimizer_steps"] == [3] for r in ranks)
    assert all(r["masks"] == ranks[0]["masks"] for r in ranks)
    masks, dense = dense_run(_case("dense", stage=stage, micro_bs=6, steps=5), 1)
    assert ranks[0]["masks"] == masks[3:]
    assert any(v < 1 for m in masks[3:] for v in m.values())
    a = torch.cat([weights[n].reshape(-1) for n in dense])
    b = torch.cat([dense[n].reshape(-1) for n in dense])
    assert ((a - b).norm() / b.norm()).item() <= 1e-5


@pytest.mark.parametrize("world", [1, 2, 3, *SCALING_WORLDS])
def test_shutdown_leaves_no_gloo_thread(results, world):
    """After dozens of engines (ZeRO-3 ones among them) and rose_ds.shutdown(), nothing of the process group
    runs any more: a gloo thread alive at interpreter exit aborts a rank now and then (DeepSpeed keeps
    every ZeRO-3 model, and so the group, referenced from a module-level list unless shutdown empties it)."""
    folder = results.folder(world)
    for rank in range(world):
        threads = json.loads((folder / f"threads{rank}.json").read_text())
        assert not [t for t in threads if "gloo" in t], threads


@pytest.mark.parametrize("name", [c["name"] for c in EXTRA_CASES[2] if c["name"].startswith("lora")])
def test_lora_matches_dense_and_trains_the_adapters(results, name):
    """A LoRA model at ZeRO 0-3, every mode: the dense run's masks on every rank at every step, its weights;
    an adapted module's A and B always share their mask value; and the adapters train (per tensor they
    would not: B starts at zero, so A's gradient is zero and ROSE keeps A, freezes B, at every step)."""
    case = next(c for c in EXTRA_CASES[2] if c["name"] == name)
    masks = assert_matches_dense(case, 2, results)
    assert any(v < 1 for m in masks for v in m.values())
    for m in masks:
        assert all(v == m[n.replace("lora_A", "lora_B")] for n, v in m.items() if "lora_A" in n)
    _, weights = results(2, name)
    initial = {n: p.detach() for n, p in case_model(case).named_parameters() if p.requires_grad}
    assert_adapters_trained(weights, initial)


@pytest.mark.parametrize("name", [c["name"] for c in EXTRA_CASES[2] if c["name"].startswith("gc-")])
def test_gradient_checkpointing_changes_nothing(results, name):
    """Gradient checkpointing (non-reentrant: the recomputed forward replays the dropout masks) at ZeRO 0-3,
    LoRA at ZeRO-3 included: every rank's masks and the weights are those of the same run without it."""
    ranks, weights = results(2, name)
    twin_ranks, twin_weights = results(2, name.removeprefix("gc-"))
    assert [r["masks"] for r in ranks] == [r["masks"] for r in twin_ranks]
    assert [r["losses"] for r in ranks] == [r["losses"] for r in twin_ranks]
    assert weights.keys() == twin_weights.keys()
    assert all(torch.equal(weights[n], twin_weights[n]) for n in weights)
