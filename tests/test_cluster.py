"""Every way users launch, run for real: the project's sbatch scripts on a throwaway SLURM cluster
(slurmctld + two slurmd fake nodes on this host, tests/local_slurm.py), and mpirun, torchrun and a
two-"node" deepspeed hostfile launch without ssh outside SLURM (`deepspeed --num_gpus 2` on one node
is in test_finetune.py).

Every launch runs the same 2-rank fine-tune (same seed, data and config), so besides "it finished, on
both nodes, with metrics and a checkpoint", each must reach bit-identical results: the launcher changes
how ranks are found, nothing else.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_slurm import LocalSlurm, missing

ROOT = Path(__file__).resolve().parents[1]
ADV = ROOT.parent / "shared" / "data" / "advglue" / "dev.json"
VENV_BIN = str(Path(sys.executable).parent)
FINETUNE = ["--max_train_samples", "96", "--max_eval_samples", "48", "--per_device_train_batch_size", "8",
            "--logging_steps", "1", "--max_steps", "2", "--save_steps", "2", "--adv_file", str(ADV)]  # fmt: skip
# The #SBATCH lines ask for 8 GPUs per node and many CPUs; the fake nodes have neither.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]

pytestmark = pytest.mark.skipif(not ADV.is_file(), reason="AdvGLUE dev set ../shared/data/advglue/dev.json absent")
needs_cluster = pytest.mark.skipif(missing() is not None, reason=str(missing()))
needs_mpi = pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun not installed "
                               "(tests/install_cluster_packages.sh installs Debian openmpi-bin)")  # fmt: skip


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               PATH=f"{VENV_BIN}:{os.environ['PATH']}")  # fmt: skip
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        env.pop(key, None)
    env.update(extra)
    return env


def _outcome(run_dir: Path) -> dict:
    """What a finished 2-rank run left behind: checked here, compared across launchers by the caller."""
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["world_size"] == 2
    assert (run_dir / "global_step2").is_dir() and (run_dir / "latest").read_text().strip() == "global_step2"
    assert (run_dir / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    return {
        "launcher": config["launcher"],
        "nodes": [r["node"] for r in config["ranks"]],
        "losses": [m["loss"] for m in metrics],
        "kept": [m["kept_fraction"] for m in metrics],
        "eval": json.loads((run_dir / "eval_results.json").read_text()),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The plain single-node run every other launch must reproduce: torchrun --nproc_per_node 2."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    proc = subprocess.run([f"{VENV_BIN}/torchrun", "--nproc_per_node", "2", "--master_port", "29561",
                           "launch/finetune.py", "--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out),
                           *FINETUNE], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcome = _outcome(out)
    assert outcome["launcher"] == "torchrun"
    return outcome


def _same_run(outcome: dict, reference: dict) -> None:
    for key in ("losses", "kept", "eval"):
        assert outcome[key] == reference[key], key


# ------------------------------------------------------------------------------------------ outside SLURM
@needs_mpi
def test_mpirun_uses_deepspeeds_mpi_discovery(tmp_path, reference):
    out = tmp_path / "run"
    cmd = ["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "-x", "MASTER_PORT=29562",
           "-x", "PATH", "-x", "OMP_NUM_THREADS", "-x", "DS_ACCELERATOR", "-x", "HF_HUB_OFFLINE",
           sys.executable, "launch/finetune.py", "--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out),
           *FINETUNE]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    outcome = _outcome(out)
    assert outcome["launcher"] == "mpi"
    _same_run(outcome, reference)


def test_deepspeed_launcher_two_nodes_by_hostfile_without_ssh(tmp_path, reference):
    """The multi-node deepspeed launch as users run it where nodes cannot ssh: one launcher per node,
    each with its --node_rank, sharing a hostfile. Both "nodes" are this host."""
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    base = [f"{VENV_BIN}/deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--master_addr", "127.0.0.1",
            "--master_port", "29564"]  # fmt: skip
    script = ["launch/finetune.py", "--deepspeed", "ds_configs/zero2.json", "--output_dir", str(out), *FINETUNE]
    nodes = [subprocess.Popen(base + [f"--node_rank={n}"] + script, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in (0, 1)]  # fmt: skip
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    outcome = _outcome(out)
    assert outcome["launcher"] == "deepspeed"
    _same_run(outcome, reference)


# ------------------------------------------------------------------------------------------ SLURM
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    started = time.monotonic()
    cluster = LocalSlurm(root / "cluster", nodes=2).start()
    print(f"local SLURM cluster up in {time.monotonic() - started:.1f} s")
    try:
        yield cluster, root
    finally:
        cluster.stop()


def _wait(env: dict, job: str, timeout: float = 600) -> str:
    """Polls the job until it ends and returns its `scontrol show job` record (`sbatch --wait` polls in
    growing intervals, adding ~10 s per job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        states = {w.split("=")[1] for w in info.split() if w.startswith("JobState=")}  # array: one per task
        if states and states <= {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not end within {timeout:.0f} s")


def _submit(env: dict, script: str, output: str, *options: str, args: list[str] = ()) -> str:
    """Submits a project sbatch script unchanged (CPU overrides as sbatch options) and returns the job id."""
    cmd = ["sbatch", "--parsable", *CPU_JOB, f"--output={output}", *options, str(ROOT / "launch" / "slurm" / script),
           *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()


def _sbatch(slurm, script: str, *options: str, env: dict | None = None, args: list[str] = FINETUNE):
    """Submits a project sbatch script unchanged (CPU overrides on the command line), waits for it and
    returns the job id, the runs directory and the job's output."""
    cluster, root = slurm
    runs = root / "runs"
    runs.mkdir(exist_ok=True)  # SLURM drops the job's output silently when its directory is missing
    job_env = _env(SLURM_CONF=str(cluster.conf), RUN_ROOT=str(runs), GPUS_PER_NODE="1", **(env or {}))
    job = _submit(job_env, script, f"{runs}/%x-%j.out", *options, args=args)
    info = _wait(job_env, job)
    logs = "".join(p.read_text() for p in sorted(runs.glob(f"*-{job}*.out")))
    assert "ExitCode=0:0" in info and "JobState=COMPLETED" in info, f"job {job} failed:\n{logs[-5000:]}\n{info}"
    return job, runs, logs


@needs_cluster
@pytest.mark.parametrize(
    "script, env, launcher",
    [
        ("torchrun.sbatch", {}, "torchrun"),
        ("deepspeed.sbatch", {"NO_SSH": "1"}, "deepspeed"),
        ("srun.sbatch", {"DISCOVERY": "env"}, "srun"),
        # fake nodes share /dev/shm, where Open MPI's shared-memory transport clashes across them
        ("srun.sbatch", {"DISCOVERY": "mpi", "OMPI_MCA_btl": "^vader"}, "mpi"),
    ],
    ids=["torchrun", "deepspeed-no-ssh", "srun-env", "srun-mpi"],
)
def test_sbatch_script_runs_across_both_nodes(slurm, reference, script, env, launcher):
    options = ["--ntasks-per-node=1"] if script == "srun.sbatch" else []  # one CPU rank per fake node
    job, runs, logs = _sbatch(slurm, script, *options, env=env)
    run_dir = next(runs.glob(f"rose-*-{job}"))
    outcome = _outcome(run_dir)
    assert outcome["launcher"] == launcher
    assert sorted(outcome["nodes"]) == ["rosenode1", "rosenode2"]  # torchrun's rendezvous may order them either way
    assert f"job {job}: " in logs and "finished 2 steps" in logs
    _same_run(outcome, reference)


@needs_cluster
def test_sweep_array_and_gathered_table(slurm):
    job, runs, logs = _sbatch(slurm, "sweep.sbatch", "--array=0-1", env={"UPPERS": "30 60", "MODES": "first"})
    sweep = runs / f"rose-sweep-{job}"
    assert sorted(p.name for p in sweep.iterdir()) == ["upper30-first-seed42", "upper60-first-seed42"]
    proc = subprocess.run([sys.executable, "launch/gather_results.py", str(sweep)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = json.loads((sweep / "results.json").read_text())
    assert [(r["mode"], r["upper"], r["seed"]) for r in table["runs"]] == [("first", 30, 42), ("first", 60, 42)]
    for row in table["runs"]:
        evals = json.loads((sweep / row["run"] / "eval_results.json").read_text())
        assert row["eval_accuracy"] == evals["eval_accuracy"] and row["global_step"] == 2
    assert "| upper30-first-seed42 | first | 30" in proc.stdout


@needs_cluster
def test_sweep_refuses_an_index_without_a_combination(slurm):
    cluster, root = slurm
    env = _env(SLURM_CONF=str(cluster.conf), UPPERS="30 60")
    job = _submit(env, "sweep.sbatch", f"{root}/%x-%A_%a.out", "--array=2")
    assert "JobState=FAILED" in _wait(env, job)
    log = next(root.glob(f"rose-sweep-{job}_2.out")).read_text()
    assert "array index 2 has no combination: there are 2, submit with --array=0-1" in log


@needs_cluster
def test_requeued_job_resumes_from_its_checkpoint(slurm):
    """Preemption as SLURM does it: `scontrol requeue` kills the running job and starts it again under
    the same job id; the script's --resume_from_checkpoint auto continues from the newest checkpoint."""
    cluster, root = slurm
    runs = root / "runs"
    runs.mkdir(exist_ok=True)
    env = _env(SLURM_CONF=str(cluster.conf), RUN_ROOT=str(runs), DISCOVERY="env")
    args = [*FINETUNE, "--max_steps", "8"]
    job = _submit(env, "srun.sbatch", f"{runs}/%x-%j.out", "--ntasks-per-node=1", args=args)
    run_dir = runs / f"rose-srun-{job}"

    def scontrol(*words: str) -> str:
        return subprocess.run(["scontrol", *words], env=env, capture_output=True, text=True, check=True).stdout

    deadline = time.monotonic() + 600
    while not (run_dir / "latest").is_file():
        state = scontrol("show", "job", job)
        assert "JobState=PENDING" in state or "JobState=RUNNING" in state, "the job ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.5)
    scontrol("requeue", job)
    # SLURM holds a requeued batch job back for two minutes (Reason=BeginTime); once it waits, start it now
    while "Reason=BeginTime" not in scontrol("show", "job", job):
        assert time.monotonic() < deadline, "the requeued job never became pending"
        time.sleep(0.5)
    # slurmctld revokes the old run's credential at the requeue second: a restart within that second is
    # killed ("Job credential revoked"), so start it only once that second is over
    time.sleep(2)
    scontrol("update", f"JobId={job}", "StartTime=now")
    info = _wait(env, job)
    log = (runs / f"rose-srun-{job}.out").read_text()
    assert "JobState=COMPLETED" in info and "Restarts=1" in info, log[-4000:]
    assert log.count(f"job {job}: ") == 2 and "resumed from" in log and "finished 8 steps" in log
    assert json.loads((run_dir / "all_results.json").read_text())["global_step"] == 8
