"""One-command GPU acceptance run: train, resume, score on one GPU and write one JSON file and a table.

    python benchmarks/gpu_check.py --out gpu_check.json        # one GPU; target < 8 minutes (not yet run on one)
    python benchmarks/gpu_check.py --tiny --out check.json     # CPU, fp32, tiny sizes (the test suite's run)

What it runs, each part as users run it (the trainer and the scorer are the project's own code):

1. `itsim train` subprocesses at 299 px, batch 256, bf16 (`--mixed-precision auto` on a GPU) for a few
   hundred steps, streaming (DataLoader workers decoding JPEGs) and `--data-on-device`: images/s,
   MFU (training FLOPs per image counted by `torch.utils.flop_counter` on a CPU copy with oneDNN off,
   so the LSTM is counted, as `launch/sizing.py` does; over a bf16 matmul peak measured on the GPU by
   `gpu.py`'s `matmul_peak`), the fraction of step time spent waiting for data, and whether the
   loss went down (from `metrics.jsonl`).
2. The LSTM's parameter and activation dtypes under the run's autocast (fp32 expected).
3. Host syncs: three training steps in-process under `torch.cuda.set_sync_debug_mode("error")` (GPU only).
4. Kill (SIGKILL, after the first checkpoint) and `--resume auto`: final parameters against an
   uninterrupted run's, within a bf16 tolerance (cuDNN autotuning and atomics are not bit-exact).
5. The same 200 image-caption pairs scored on the GPU and on the CPU: largest difference and
   top-5 agreement of each image's captions.
6. `itsim score` (the Ray Data job, a local Ray with every CPU and the GPU) on a CSV of pairs: rows/s.

No timing is a pass/fail criterion; `checks` in the JSON lists the yes/no facts (LSTM fp32, loss
down, resume within tolerance, no host sync).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

TINY_FLAGS = ["--channels", "8,16", "--embed-dim", "16", "--lstm-hidden", "16", "--lstm-layers", "2",
              "--text-dim", "32", "--image-dim", "32", "--head-dim", "16"]
# mode -> sizes: images (synthetic), image px, batch, training steps, resume steps, loader workers, score rows
SIZES = {"full": dict(images=2048, size=299, batch=256, steps=300, resume_steps=40, workers=None, score_rows=10_240),
         "tiny": dict(images=48, size=32, batch=8, steps=6, resume_steps=4, workers=1, score_rows=200)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU, fp32 (a test; numbers mean nothing)")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON file (the table goes beside it)")
    p.add_argument("--cache", type=Path, default=common.DEFAULT_CACHE, help="synthetic data and shards, reused")
    p.add_argument("--steps", type=int, default=None, help="training steps per data path (default 300; tiny 6)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: cores - 2, at most 12)")
    return p


# ---- training runs (subprocesses) -----------------------------------------------------------------

def train_cmd(shards: Path, out: Path, sizes: dict, tiny: bool, *extra: str) -> list[str]:
    flags = ["--batch-size", str(sizes["batch"]), "--workers", str(sizes["workers"]), "--eval-every", "0",
             "--no-tensorboard", "--val-split", "none", "--warmup-steps", "5", "--lr", "1e-3", *extra]
    flags += TINY_FLAGS if tiny else ["--channels-last"]
    return [sys.executable, "-m", "itsim.cli", "train", "--shards", str(shards), "--out", str(out), *flags]


def run(cmd: list[str], log: Path, timeout: float = 600) -> None:
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=common.ROOT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed; see {log}:\n{log.read_text()[-3000:]}")


def train_metrics(run_dir: Path, flops: float, peak: float) -> dict[str, Any]:
    """Rates from metrics.jsonl, leaving out the first log window (cuDNN autotuning, worker start)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    steady = rows[1:] or rows
    images_per_s = sum(r["images_per_s"] for r in steady) / len(steady)
    half = max(1, len(rows) // 4)
    first = sum(r["loss"] for r in rows[:half]) / half
    last = sum(r["loss"] for r in rows[-half:]) / half
    return {"steps": rows[-1]["step"], "images_per_s": images_per_s, "mfu": flops * images_per_s / peak,
            "data_wait": sum(r["data_wait"] for r in steady) / len(steady), "loss_first": first, "loss_last": last,
            "loss_decreased": last < first}


def kill_and_resume(shards: Path, work: Path, sizes: dict, tiny: bool) -> dict[str, Any]:
    """An uninterrupted run against one SIGKILLed after its first checkpoint and resumed: parameters."""
    from safetensors.torch import load_file

    n = sizes["resume_steps"]
    steps = ["--steps", str(n), "--checkpoint-every", str(n // 2), "--log-every", str(max(1, n // 4))]
    run(train_cmd(shards, work / "resume_a", sizes, tiny, *steps), work / "resume_a.log")
    cmd = train_cmd(shards, work / "resume_b", sizes, tiny, *steps)
    with (work / "resume_b.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=common.ROOT, start_new_session=True)
        first = work / "resume_b" / "checkpoints" / f"step_{n // 2:07d}"
        deadline = time.monotonic() + 600
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers, as a lost machine
        proc.wait()
    killed_before_end = not (work / "resume_b" / "model").exists()
    if not first.exists():
        raise SystemExit(f"the run to kill never wrote {first}; see {work / 'resume_b.log'}")
    run(cmd + ["--resume", "auto"], work / "resume_b2.log")
    a = load_file(str(work / "resume_a" / "model" / "model.safetensors"))
    b = load_file(str(work / "resume_b" / "model" / "model.safetensors"))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    scale = max(a[k].float().abs().max().item() for k in a)
    tolerance = 0.0 if tiny else 5e-3  # CPU fp32 is bit-exact; a GPU's cuDNN search and atomics are not
    resumed = "resumed from" in (work / "resume_b2.log").read_text()
    return {"steps": n, "killed_after_checkpoint": n // 2, "killed_before_end": killed_before_end, "resumed": resumed,
            "max_abs_diff": diff, "max_abs_value": scale, "tolerance": tolerance,
            "within_tolerance": killed_before_end and resumed and diff <= tolerance}


# ---- in-process checks ---------------------------------------------------------------------------

def count_flops(shards: Path, model_dir: Path, size: int) -> float:
    """Training FLOPs per image (forward + backward, the trainer's step, balanced pairs, every caption), counted
    on a CPU copy with oneDNN off so the LSTM runs as matmuls the counter sees (launch/sizing.py)."""
    import warnings

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from itsim.data.loader import collate, read_split
    from itsim.data.pairs import step_generator
    from itsim.model import images_to_float, load_model
    from itsim.train import TrainConfig
    from itsim.train.objective import step_loss

    model, _, _ = load_model(model_dir, "cpu")
    batch = collate(read_split(shards, "train", max_images=4))
    counter = FlopCounterMode(display=False)
    with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=False), counter:
        warnings.simplefilter("ignore", UserWarning)
        loss, _, _ = step_loss(model.train(), images_to_float(batch["images"]), batch, TrainConfig(),
                               step_generator(0, 0, 0))
        loss.backward()
    return counter.get_total_flops() / batch["images"].shape[0]


def lstm_dtypes(model_dir: Path, shards: Path, device: Any) -> dict[str, Any]:
    """The LSTM's parameter, activation and gradient dtypes in a training forward under bf16 autocast."""
    import torch

    from itsim.data.loader import collate, read_split
    from itsim.model import images_to_float, load_model

    model, _, _ = load_model(model_dir, device)
    batch = collate(read_split(shards, "train", max_images=4))
    seen: dict[str, set] = {"params": set(), "activations": set()}

    def hook(module, args, output):
        seen["params"] |= {str(p.dtype) for p in module.parameters()}
        seen["activations"] |= {str(args[0].data.dtype), str(output[0].data.dtype), str(output[1][0].dtype)}

    handle = model.text_encoder.lstm.register_forward_hook(hook)
    n = batch["ids"].shape[0]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model.train()(images_to_float(batch["images"].to(device)), batch["ids"][:, 0].to(device),
                               batch["lengths"][:, 0].numpy())
    handle.remove()
    logits.float().sum().backward()
    grads = {str(p.grad.dtype) for p in model.text_encoder.lstm.parameters()}
    fp32 = {"torch.float32"}
    return {"autocast": f"{device.type} bf16", "captions": n, "param_dtypes": sorted(seen["params"]),
            "activation_dtypes": sorted(seen["activations"]), "grad_dtypes": sorted(grads),
            "all_fp32": seen["params"] == seen["activations"] == grads == fp32}


def sync_check(shards: Path, work: Path, device: Any, sizes: dict) -> dict[str, Any]:
    """Three training steps with CUDA's sync debug mode at "error" (after two warm-up steps)."""
    import torch

    if device.type != "cuda":
        return {"checked": False, "ok": None, "error": "no CUDA device"}
    from itsim.train import TrainConfig
    from itsim.train.loop import Window, add_to_window, setup, train_step

    run_ = setup(TrainConfig(shards=str(shards), out=str(work / "sync"), steps=10, batch_size=sizes["batch"],
                             workers=2, data_on_device=True, tensorboard=False, augment="crop,flip",
                             channels_last=True, pairs="in-batch", negatives="hard"))
    run_.model.train()
    batches, window = iter(run_.loader), Window()
    for i in range(2):
        add_to_window(window, *train_step(run_, next(batches), i), 1, 0.0, 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 5):
            add_to_window(window, *train_step(run_, next(batches), i), 1, 0.0, 1.0)
        torch.cuda.synchronize()
        return {"checked": True, "ok": True, "error": None}
    except RuntimeError as exc:
        return {"checked": True, "ok": False, "error": str(exc).splitlines()[0][:300]}
    finally:
        torch.cuda.set_sync_debug_mode("default")


def device_vs_cpu(model_dir: Path, data: Path, device: Any, n: int = 200, k: int = 5) -> dict[str, Any]:
    """The same n pairs (n images x their n captions) scored on `device` and on the CPU."""
    import numpy as np
    import pandas as pd

    from itsim.score import Scorer

    df = pd.read_csv(data / "results.csv", sep=r"\|\s*", engine="python")
    df = df.groupby(df.columns[0], sort=True).head(1).iloc[:n]  # one caption of each of n images
    images = [str(data / "images" / name) for name in df.iloc[:, 0]]
    captions = df.iloc[:, 2].astype(str).tolist()
    here = Scorer.from_dir(model_dir, device=str(device)).score_matrix(images, captions)
    cpu = Scorer.from_dir(model_dir, device="cpu").score_matrix(images, captions)
    top_here, top_cpu = np.argsort(-here, axis=1)[:, :k], np.argsort(-cpu, axis=1)[:, :k]
    agree = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_here, top_cpu)])
    diag = np.arange(len(images))
    return {"pairs": len(images), "k": k, "device": str(device), "topk_agreement": float(agree),
            "max_abs_diff": float(np.abs(here - cpu).max()),
            "pair_scores_max_abs_diff": float(np.abs(here[diag, diag] - cpu[diag, diag]).max())}


def ray_scoring(model_dir: Path, data: Path, work: Path, rows: int) -> dict[str, Any]:
    """`itsim score` (Ray Data) on a local Ray with every CPU (and the GPU): rows/s over the job."""
    from bench_score import pairs_csv

    from itsim.score.ray_job import ScoreConfig, run_score

    csv = pairs_csv(data, rows, work / "pairs.csv")
    s = run_score(ScoreConfig(model=str(model_dir), input=(str(csv),), images=str(data / "images"),
                              output=str(work / "scores"), overwrite=True))
    return {"rows": s["rows"], "scored": s["scored"], "rows_per_s": s["rows_per_second"],
            "job_seconds": s["job_seconds"], **{k: s["resources"][k] for k in ("workers", "gpus_per_worker",
                                                                            "cpus_per_worker")}}


# ---- report ----------------------------------------------------------------------------------------

def table(r: dict[str, Any]) -> str:
    t, res, lstm, score = r["train"], r["resume"], r["lstm"], r["scoring"]
    lines = [f"GPU check on {r['device']['name']} ({r['device']['dtype']}, {r['config']['image_size']} px, batch "
             f"{r['config']['batch_size']}, {r['seconds']:.0f} s)", "",
             "| data path | images/s | MFU | data wait | loss first -> last |", "|---|---|---|---|---|"]
    for name, m in t.items():
        lines.append(f"| {name} | {m['images_per_s']:.0f} | {m['mfu']:.3f} | {m['data_wait']:.3f} | "
                     f"{m['loss_first']:.3f} -> {m['loss_last']:.3f} |")
    lines += ["", f"- matmul peak {r['device']['matmul_peak_flops'] / 1e12:.3g} TFLOP/s; "
                  f"{r['flops_per_image'] / 1e9:.2f} GFLOP per training image",
              f"- LSTM: params {lstm['param_dtypes']}, activations {lstm['activation_dtypes']}, grads {lstm['grad_dtypes']}",
              f"- kill + resume: max |diff| {res['max_abs_diff']:.2e} (tolerance {res['tolerance']:g})",
              f"- {score['pairs']} pairs on {score['device']} vs CPU: top-{score['k']} agreement "
              f"{score['topk_agreement']:.3f}, max |diff| {score['max_abs_diff']:.2e}",
              f"- Ray scoring: {r['ray']['rows']} rows at {r['ray']['rows_per_s']} rows/s "
              f"({r['ray']['workers']} actor(s) x {r['ray']['cpus_per_worker']} CPU, {r['ray']['gpus_per_worker']} GPU)",
              f"- host-sync check: {r['sync']}", f"- checks: {r['checks']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from gpu import Setup, matmul_peak

    args = build_parser().parse_args(argv)
    common.setup_logging()
    start = time.perf_counter()
    mode = "tiny" if args.tiny else "full"
    sizes = dict(SIZES[mode])
    sizes["steps"] = args.steps or sizes["steps"]
    sizes["workers"] = args.workers or sizes["workers"] or max(1, min(12, common.usable_cores() - 2))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = args.out.resolve().parent / (args.out.stem + "_work")
    work.mkdir(parents=True, exist_ok=True)
    data = common.synth_data(args.cache, sizes["images"], *((96, 160) if args.tiny else (320, 640)))
    shards = common.shards_for(args.cache, data, sizes["size"], shard_size=max(4, sizes["images"] // 32),
                               workers=max(1, common.usable_cores()))

    peak = matmul_peak(Setup(device, dtype, sizes["size"], sizes["batch"], args.tiny))
    train: dict[str, Any] = {}
    for name, extra in (("streaming", []), ("resident", ["--data-on-device"])):
        common.log.info("training %d steps, %s", sizes["steps"], name)
        out = work / f"train_{name}"
        run(train_cmd(shards, out, sizes, args.tiny, "--steps", str(sizes["steps"]), "--checkpoint-every",
                      str(sizes["steps"]), "--log-every", str(max(1, sizes["steps"] // 10)), *extra),
            work / f"train_{name}.log")
        train[name] = {"run": str(out)}
    model_dir = work / "train_streaming" / "model"
    flops = count_flops(shards, model_dir, sizes["size"])
    for name in train:
        train[name].update(train_metrics(Path(train[name].pop("run")), flops, peak))
    common.log.info("LSTM dtypes, host-sync check, kill and resume")
    lstm = lstm_dtypes(model_dir, shards, device)
    sync = sync_check(shards, work, device, sizes)
    resume = kill_and_resume(shards, work, sizes, args.tiny)
    common.log.info("scoring: device vs CPU, then the Ray job")
    scoring = device_vs_cpu(model_dir, data, device)
    ray = ray_scoring(model_dir, data, work, sizes["score_rows"])
    result = {
        "device": {"name": torch.cuda.get_device_name(device) if device.type == "cuda" else common.cpu_model(),
                   "type": device.type, "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
                   "matmul_peak_flops": peak, "torch": torch.__version__, "cuda": torch.version.cuda},
        "config": {"mode": mode, "image_size": sizes["size"], "batch_size": sizes["batch"], "steps": sizes["steps"],
                   "images": sizes["images"], "loader_workers": sizes["workers"], "load_1m": common.load_average()},
        "flops_per_image": flops, "train": train, "lstm": lstm, "sync": sync, "resume": resume, "scoring": scoring,
        "ray": ray, "seconds": time.perf_counter() - start}
    result["checks"] = {"lstm_fp32": lstm["all_fp32"], "loss_decreased": all(t["loss_decreased"] for t in train.values()),
                        "resume_within_tolerance": resume["within_tolerance"], "no_host_sync": sync["ok"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    text = table(result)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    failed = [name for name, ok in result["checks"].items() if ok is False]
    if failed and not args.tiny:  # a tiny CPU run's few steps need not lower the loss: there it only informs
        common.log.error("checks failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
