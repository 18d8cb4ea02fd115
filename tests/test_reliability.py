"""Crash-safe resume (issue 7): SIGKILL of one rank at a random step and a kill in the middle of a
checkpoint write, then ``--resume auto``: the finished run must equal an uninterrupted one bit for bit
(weights, optimizer moments and master weights, ROSE masks, logged losses)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
STEPS = 12  # 8 optimizer steps per epoch: the run crosses an epoch boundary (and its evaluation)
COMMON = ["--adv_file", "none", "--max_train_samples", "64", "--max_eval_samples", "16",
          "--per_device_train_batch_size", "4", "--max_steps", str(STEPS), "--logging_steps", "1",
          "--save_steps", "1", "--save_total_limit", "2", "--rose_mode", "ensemble", "--rose_upper", "70",
          "--learning_rate", "1e-3", "--seed", "7", "--max_seq_length", "64"]  # fmt: skip
PORTS = iter(range(29700, 29800))


def _make_model(path, hidden):
    """A randomly initialised 2-layer BERT with the embedded MiniLM tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rose_ds.training.data import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=2 * hidden, num_labels=2)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """Hidden 128: a save takes long enough (about 60 MB) to be interrupted, a step is quick."""
    return _make_model(tmp_path_factory.mktemp("model") / "bert-128", 128)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    return env


def _command(model, out, config, nproc=2, extra=()):
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(next(PORTS)),
            str(ROOT / "launch" / "finetune.py"), "--deepspeed", f"ds_configs/{config}", "--model_name_or_path",
            str(model), "--output_dir", str(out), *COMMON, *extra]  # fmt: skip


def _run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def _children(pid):
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _tree(pid):
    """pid and all its descendants (torchrun's workers are not in its process group)."""
    found = [pid]
    try:
        for child in _children(pid):
            found += _tree(child)
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def _signal_tree(launcher, sig):
    for pid in _tree(launcher.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _rank_pid(launcher, rank):
    for pid in _children(launcher.pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under torchrun {launcher.pid}")


def _logged_steps(out):
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _wait_dead(launcher):
    try:
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:  # hung: kill it and its workers
            _signal_tree(launcher, signal.SIGKILL)
            launcher.wait()
    return launcher.stdout.read()


def _tensors(obj, prefix=""):
    """Every tensor inside nested dicts/lists of a loaded checkpoint file, by path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    found = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    for key, value in items:
        found.update(_tensors(value, f"{prefix}/{key}"))
    return found


def _assert_same_run(out, ref):
    """Weights, optimizer files, masks and logged losses of two finished runs: equal bit for bit."""
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    final = f"global_step{STEPS}"
    files = sorted(p.name for p in (ref / final).glob("*.pt") if not p.name.startswith("rng_state"))
    assert files and files == sorted(p.name for p in (out / final).glob("*.pt") if not p.name.startswith("rng_state"))
    for name in files:
        # trusted files written by this test's own runs: DeepSpeed's checkpoints need full unpickling
        x = _tensors(torch.load(out / final / name, weights_only=False, map_location="cpu"))
        y = _tensors(torch.load(ref / final / name, weights_only=False, map_location="cpu"))
        assert x.keys() == y.keys() and x, name
        assert all(torch.equal(x[k], y[k]) for k in x), (name, [k for k in x if not torch.equal(x[k], y[k])][:5])
    state, ref_state = (json.loads((d / "trainer_state.json").read_text()) for d in (out, ref))
    assert state["mask_history"] == ref_state["mask_history"] and len(state["mask_history"]) == STEPS
    assert any(c < 1 for mask in state["mask_history"] for c in mask)  # selection really froze tensors

    def losses(d):
        return [{k: v for k, v in json.loads(line).items() if k != "examples_per_second"}
                for line in (d / "metrics.jsonl").read_text().splitlines()]  # fmt: skip

    assert losses(out) == losses(ref) and len(losses(ref)) == STEPS


@pytest.fixture(scope="module")
def reference(small_model, tmp_path_factory):
    """Uninterrupted runs, per ZeRO config."""
    runs = {}

    def get(config):
        if config not in runs:
            out = tmp_path_factory.mktemp("ref") / config
            _run(_command(small_model, out, config))
            runs[config] = out
        return runs[config]

    return get


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_sigkill_of_one_rank_then_resume_equals_the_uninterrupted_run(small_model, reference, tmp_path, config):
    kill_after = random.Random().randint(2, STEPS - 2)  # a random step; printed on failure
    out = tmp_path / "run"
    launcher = _start(_command(small_model, out, config))
    while _logged_steps(out) < kill_after and launcher.poll() is None:
        time.sleep(0.02)
    assert launcher.poll() is None, _wait_dead(launcher)
    os.kill(_rank_pid(launcher, 1), signal.SIGKILL)
    log = _wait_dead(launcher)
    assert launcher.returncode != 0, log[-2000:]
    proc = _run(_command(small_model, out, config, extra=["--resume", "auto"]))
    assert "resumed from" in proc.stdout, (kill_after, proc.stdout[-2000:])
    assert f"finished {STEPS} steps" in proc.stdout
    _assert_same_run(out, reference(config))


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(small_model, reference, tmp_path):
    out = tmp_path / "run"
    launcher = _start(_command(small_model, out, "zero2.json"))
    partial = None
    while partial is None and launcher.poll() is None:
        # the third save or later: two complete checkpoints exist, save_total_limit is 2
        found = next((p for p in out.glob(".tmp-global_step*") if int(p.name.split("step")[1]) >= 3), None)
        if found is not None:
            _signal_tree(launcher, signal.SIGSTOP)  # freeze every process, then look
            if found.is_dir():  # not yet renamed: the save is still being written
                _signal_tree(launcher, signal.SIGKILL)
                partial = found
            else:
                _signal_tree(launcher, signal.SIGCONT)  # finished meanwhile: try the next save
        time.sleep(0.001)
    log = _wait_dead(launcher)
    assert partial is not None, log[-2000:]
    killed_at = int(partial.name.split("step")[1])
    assert partial.is_dir()  # the partial save is still there, and ignored
    previous = f"global_step{killed_at - 1}"
    assert (out / "latest").read_text().strip() == previous
    assert (out / previous / "rose_ds_checkpoint.json").is_file()
    # the older checkpoint survives too: pruning waits for the new one to be complete
    assert (out / f"global_step{killed_at - 2}" / "rose_ds_checkpoint.json").is_file()
    proc = _run(_command(small_model, out, "zero2.json", extra=["--resume", "auto"]))
    assert f"resumed from {out / previous} at step {killed_at - 1}" in proc.stdout
    assert not list(out.glob(".tmp-*"))
    assert sorted(p.name for p in out.glob("global_step*")) == sorted(
        [f"global_step{STEPS - 1}", f"global_step{STEPS}"]
    )
    _assert_same_run(out, reference("zero2.json"))


def _status(pid):
    """(resident MB, open file descriptors, live child processes) of one process."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))  # fmt: skip
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd")), len(_children(pid))


def _soak_launch(cmd, out, samples):
    """Runs one launch while sampling every worker each 0.25 s: {rank: [(step, MB, fds, children)]}."""
    launcher = _start(cmd)
    seen = set()
    try:
        while launcher.poll() is None:
            try:
                workers = _children(launcher.pid)
                seen.update(p for w in workers for p in _tree(w))
                step = _logged_steps(out)
                for pid in workers:
                    rank = int(next(e for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                                    if e.startswith(b"RANK="))[5:])  # fmt: skip
                    samples.setdefault(rank, []).append((step, *_status(pid)))
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                pass  # a worker starting or exiting between two reads
            time.sleep(0.25)
    finally:
        log = _wait_dead(launcher)
    assert launcher.returncode == 0, log[-3000:]
    # every process the launch started is gone (exited and reaped: not even a zombie is left)
    assert seen and not [pid for pid in seen if Path(f"/proc/{pid}").exists()], "processes left after the launch"
    return log


@pytest.mark.slow
def test_soak_hundreds_of_steps_with_saves_and_a_resume_leak_nothing(tmp_path):
    """300 optimizer steps on 2 ranks (37 epochs, an evaluation after each, a save every 25 steps
    keeping 2) in two launches, the second resuming the first: resident memory flat, no file
    descriptors or child processes piling up, and nothing left running after each launch."""
    model = _make_model(tmp_path / "bert-32", 32)
    out = tmp_path / "run"
    args = ["--save_steps", "25", "--logging_steps", "1"]
    samples: dict[int, list] = {}
    _soak_launch(_command(model, out, "zero2.json", extra=[*args, "--max_steps", "150"]), out, samples)
    first = {rank: list(s) for rank, s in samples.items()}
    samples.clear()
    log = _soak_launch(_command(model, out, "zero2.json", extra=[*args, "--max_steps", "300", "--resume", "auto"]),
                       out, samples)  # fmt: skip
    assert "resumed from" in log and "finished 300 steps" in log
    assert sorted(p.name for p in out.glob("global_step*")) == ["global_step275", "global_step300"]
    report = []
    for launch, data, last in (("first", first, 150), ("resumed", samples, 300)):
        for rank, rows in sorted(data.items()):
            # after warm-up (allocator pools and caches filled) and before the finish, which happens once: the
            # export and training.png (matplotlib's font files) open a few files while the process ends
            steady = [r for r in rows if 20 <= r[0] < last]
            half = len(steady) // 2
            early, late = steady[:half], steady[half:]
            assert len(early) >= 10, f"too few samples ({len(steady)})"
            mb_early, mb_late = max(r[1] for r in early), max(r[1] for r in late)
            fds_early, fds_late = max(r[2] for r in early), max(r[2] for r in late)
            report.append(f"{launch} rank {rank}: RSS {mb_early:.0f} -> {mb_late:.0f} MB, fds {fds_early} -> "
                          f"{fds_late}, children max {max(r[3] for r in rows)}")  # fmt: skip
            assert mb_late <= mb_early * 1.05 + 10, report[-1]
            assert fds_late <= fds_early + 2, report[-1]
            assert max(r[3] for r in late) <= max(r[3] for r in early), report[-1]
    print("\n".join(report))


@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_the_program_resumes_a_two_rank_run_on_three(small_model, reference, tmp_path, config):
    """launch/finetune.py end to end: a 2-rank run's last checkpoint, resumed with --resume auto on 3 ranks,
    is converted once (DeepSpeed universal checkpoint) and trains on from its step and its place in the epoch."""
    out = tmp_path / "run"
    shutil.copytree(reference(config), out)
    cmd = _command(small_model, out, config, nproc=3, extra=["--resume", "auto"])
    proc = _run([*cmd[: cmd.index("--max_steps") + 1], str(STEPS + 3), *cmd[cmd.index("--max_steps") + 2 :]])
    assert f"resumed from {out / f'global_step{STEPS}'} at step {STEPS} (world size 2 -> 3)" in proc.stdout
    assert f"finished {STEPS + 3} steps" in proc.stdout
    # (global_step12 and its universal/ conversion are pruned by --save_total_limit 2 by now)
    assert sorted(p.name for p in out.glob("global_step*")) == [f"global_step{STEPS + 2}", f"global_step{STEPS + 3}"]
    record = json.loads((out / f"global_step{STEPS + 3}" / "rose_ds_checkpoint.json").read_text())
    assert record["world_size"] == 3 and record["global_step"] == STEPS + 3
    state = json.loads((out / "trainer_state.json").read_text())
    assert len(state["mask_history"]) == STEPS + 3 and state["global_step"] == STEPS + 3
