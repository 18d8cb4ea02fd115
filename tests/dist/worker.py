"""A distributed test worker: runs many ROSE/DeepSpeed cases in one launch (a launch costs ~20 s).

Launched by tests/test_zero.py through torchrun (or any DeepSpeed-compatible launcher):

    torchrun --nproc_per_node N tests/dist/worker.py CASES.json OUT_DIR

For every case it trains a tiny BERT for a few steps through rose_ds.initialize / rose_ds.train_step
and writes, per rank, the mask of every step, the losses and the bytes each phase sent through
deepspeed.comm; rank 0 also writes the consolidated fp32 weights. The test compares them with a
dense single-process RoseAdamW run.
"""

import gc
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
import torch  # noqa: E402
from models import case_batch, case_model, random_batch  # noqa: E402

import rose_ds  # noqa: E402
import rose_ds.zero  # noqa: E402
from rose_ds import RoseConfig, RoseLosses  # noqa: E402
from rose_ds.training import causal_lm  # noqa: E402
from rose_ds.training import checkpoint as ckpt  # noqa: E402
from rose_ds import methods  # noqa: E402
from rose_ds.methods import MethodConfig  # noqa: E402

# deepspeed.init_distributed JIT-compiles the 'deepspeed_shm_comm' C++ op on CPU (35 s to 4 min on a
# fresh machine); only inference all-reduce uses it, never training, so the tests skip building it.
rose_ds.zero.skip_shm_comm_build()

LR, BETAS, EPS, WD = 2e-3, (0.9, 0.98), 1e-6, 0.01
FISHER_BATCHES = 3  # ChildTuning-D cases: global batches of the Fisher pass
COLLECTIVES = [
    "all_reduce", "inference_all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "broadcast",
    "all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced", "reduce_scatter_tensor",
    "all_to_all_single", "all_to_all", "gather", "scatter",
]  # fmt: skip


def _nbytes(arg):
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_nbytes(a) for a in arg)
    return 0


class ByteCounter:
    """Counts, by phase, the bytes of every collective DeepSpeed issues: it wraps the methods of the
    communication backend (deepspeed.comm's ``cdb``), through which all of deepspeed.comm goes. A
    collective counts the size of its largest tensor argument (the full buffer: the output of a
    gather, the input of a reduce-scatter)."""

    def __init__(self):
        self.phase = "other"
        self.bytes = {}
        backend = deepspeed.comm.comm.cdb
        for name in COLLECTIVES:
            fn = getattr(backend, name, None)
            if fn is not None:
                setattr(backend, name, self._wrap(fn))

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            size = max([_nbytes(a) for a in list(args) + list(kwargs.values())] + [0])
            self.bytes[self.phase] = self.bytes.get(self.phase, 0) + size
            return fn(*args, **kwargs)

        return counted


def stand_in_losses(model, inputs, labels, two_passes=True):
    """Dropout is off in parity cases (each rank's dropout cannot be replayed by a dense run), so
    the KL robust loss would be 0: a sample-additive stand-in gives a real robust gradient."""
    n = labels.shape[0]
    if not two_passes:
        z = model(**inputs).logits
        return RoseLosses(torch.nn.functional.cross_entropy(z, labels), None, z, None)
    z1, z2 = model(**inputs).logits, model(**inputs).logits
    task = 0.5 * torch.nn.functional.cross_entropy(z1, labels) + 0.5 * torch.nn.functional.cross_entropy(z2, labels)
    return RoseLosses(task, ((z1 - 0.1 - 0.3 * z2) ** 2).sum(), z1, z2)


def small_stand_in_losses(model, inputs, labels, two_passes=True):
    """stand_in_losses with the robust loss 1e-4 times smaller: a robust gradient far below the task
    gradient, as a KL between two dropout passes gives, where bf16 accumulation loses it first."""
    losses = stand_in_losses(model, inputs, labels, two_passes)
    return losses if losses.robust is None else losses._replace(robust=losses.robust * 1e-4)


LOSSES = {"stand_in": stand_in_losses, "small_stand_in": small_stand_in_losses, "rose": rose_ds.rose_losses,
          "causal": rose_ds.causal_lm_losses}  # fmt: skip


def ds_config(case, world):
    zero = {"stage": case["stage"]}
    if case.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if case["stage"] == 3:
        # partition every parameter: below this threshold ZeRO-3 keeps tiny tensors whole on every rank
        zero["stage3_param_persistence_threshold"] = 0
        if case.get("sub_group_size"):
            zero["sub_group_size"] = case["sub_group_size"]
    cfg = {
        "train_micro_batch_size_per_gpu": case["micro_bs"],
        "gradient_accumulation_steps": case["gas"],
        "zero_optimization": zero,
        "gradient_clipping": case.get("clip", 0.0),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if case.get("dtype") == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def run_case(case, out, counter):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = case_model(case)
    rose = RoseConfig(**case["rose"])
    config = ds_config(case, world)
    config.update(case.get("ds_extra", {}))
    if "expect_error" in case:
        try:
            rose_ds.initialize(model, config, rose=rose, lr=LR)
        except rose_ds.UnsupportedConfigError as err:
            (out / f"rank{rank}.json").write_text(json.dumps({"error": str(err)}))
            return
        raise AssertionError(f"{case['name']}: rose_ds.initialize accepted an unsupported configuration")
    resume = Path(case["resume_from"]) if "resume_from" in case else None
    if resume is not None:  # a checkpoint of another world size: converted, then loaded by name
        tag = ckpt.prepare_load(resume, ckpt.read_record(resume), world, config)
    method = MethodConfig(**case.get("method", {}))
    # a frozen model: every parameter handed over, frozen ones included, as RoseAdamW(model.named_parameters())
    groups = [{"params": list(model.named_parameters()), "weight_decay": WD}] if case.get("frozen") else None
    engine, _, _, _ = rose_ds.initialize(model, config, rose=rose, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                         method=method, param_groups=groups)  # fmt: skip
    opt = rose_ds.rose_optimizer(engine)
    if method.fixed_mask and "resume_from" not in case:  # ChildTuning-D's Fisher pass over this rank's rows
        mb = case["micro_bs"]
        fisher_batches = []
        for j in range(FISHER_BATCHES):
            inputs, labels = case_batch(case, 100 + j, world * mb)
            rows = slice(rank * mb, (rank + 1) * mb)
            fisher_batches.append(({k: v[rows] for k, v in inputs.items()}, labels[rows]))
        decoder = case.get("loss") == "causal"
        rose_ds.childtuning_d(engine, fisher_batches, rose_ds.causal_lm_losses if decoder else rose_ds.rose_losses)
    first_step = 0
    if resume is not None:
        ckpt.load(engine, resume, tag)
        first_step = engine.global_steps
    loss_fn = LOSSES[case.get("loss", "stand_in")]
    if case.get("loss") == "causal":  # the causal-LM objective's losses (R-Drop's token term included)
        loss_fn = causal_lm.OBJECTIVE.loss_fn(method)
    elif method.name in ("rdrop", "r3f"):
        loss_fn = methods.loss_fn(method)
    mb, gas = case["micro_bs"], case["gas"]
    record = {"masks": [], "losses": [], "bytes": [], "statistics": [], "resumed_at": first_step,
              "resumed_optimizer_steps": sorted({int(s["step"]) for s in opt.state.values() if "step" in s})}  # fmt: skip
    torch.manual_seed(1234 + rank)  # dropout differs per rank, as in real data parallelism
    for step in range(first_step, first_step + case["steps"]):
        inputs, labels = case_batch(case, step, world * gas * mb)
        counter.bytes = {}
        for k in range(gas):
            rows = slice((k * world + rank) * mb, (k * world + rank + 1) * mb)
            micro = {key: v[rows] for key, v in inputs.items()}
            two = rose_ds.selection.needs_robust_gradient(rose)
            recompute = rose_ds.make_recompute(loss_fn, engine, micro, labels[rows], two)
            counter.phase = "forward"
            losses = loss_fn(engine, micro, labels[rows], two_passes=two)
            counter.phase = "backward"  # at ZeRO-3 this includes the recomputed forward of ROSE-First
            losses = rose_ds.backward(engine, losses, recompute)
            counter.phase = "step"
            engine.step()
        record["masks"].append(dict(opt.last_mask))
        stats = opt.last_statistics
        record["statistics"].append(None if stats is None else stats.tolist())
        record["losses"].append(float(losses.task))
        record["bytes"].append(dict(counter.bytes))
    counter.phase = "other"
    weights = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:  # frozen: never changes, and has no fp32 master copy
            continue
        if case["stage"] == 0:
            weights[name] = p.detach().float().clone()
        else:
            weights[name] = deepspeed.utils.safe_get_full_fp32_param(p).detach().float().clone()
    if case.get("save"):
        ckpt.save(engine, out / "checkpoints", {}, {"model": ckpt.model_signature(engine.module),
                                                    "world_size": world, "zero_stage": case["stage"]}, None)  # fmt: skip
    record["num_eligible"] = len(opt.eligible_names)
    record["numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: full size
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save(weights, out / "weights.pt")
    engine.destroy()
    del engine, opt, model
    gc.collect()


def main():
    cases = json.loads(Path(sys.argv[1]).read_text())
    root = Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    counter = ByteCounter()
    for case in cases:
        out = root / case["name"]
        out.mkdir(parents=True, exist_ok=True)
        try:
            run_case(case, out, counter)
        except Exception as err:  # recorded per case so one failure does not hide the others
            (out / f"error{dist.get_rank()}.txt").write_text(f"{type(err).__name__}: {err}")
            raise
        dist.barrier()
    rank = dist.get_rank()
    rose_ds.zero.shutdown()  # exiting with the process group alive can abort a rank
    # what is left running once the group is gone (tests/test_zero.py: no gloo thread may be)
    threads = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    (root / f"threads{rank}.json").write_text(json.dumps(threads))



if __name__ == "__main__":
    main()
