"""Why the memory guard reclaims: the resident size of an identical training loop, step by step.

The same client loop (ResNet-18 at 32 px, its last 2 convs and head trained with ASI; MobileNetV2
at 64 px, last 4 convs) runs 5 epochs in a fresh process under three allocator policies, and each
step's peak RSS increase over the baseline (psutil, a reading every 2 ms and after each phase)
and the CPU seconds per epoch are printed:

- ``default``: glibc as it is (its mmap threshold moves; freed heap pages stay resident);
- ``mmap-128k``: ``mallopt`` fixes the mmap threshold at 128 KiB (every large tensor its own
  mapping, returned when freed);
- ``reclaim``: glibc as it is, and a reading above a watermark first hands the free pages back
  (``malloc_trim``) and reads again: what :class:`odl_fed.training.memory_guard.MemoryGuard` does above
  0.9 of its budget. The watermark here is the median step peak ``mmap-128k`` reached.

    python -m bench.allocator [--out bench/results/allocator.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
from pathlib import Path

CASES = (("resnet18", 32, 2), ("mobilenet_v2", 64, 4))
POLICIES = ("default", "mmap-128k", "reclaim")


def _one(policy: str, model_name: str, image_size: int, layers: int, watermark: float, epochs: int) -> dict:
    libc = ctypes.CDLL("libc.so.6")
    if policy == "mmap-128k":
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 1024)  # M_TRIM_THRESHOLD
    import psutil
    import torch
    import torch.nn.functional as F

    from odl_fed.config.job import JobSpec
    from odl_fed.federation.job_assets import client_data, global_model
    from odl_fed.training.data import batches
    from odl_fed.training.task import apply_method, make_optimizer, warm_up

    torch.set_num_threads(1)
    job = JobSpec(model=model_name, layers=layers, method="asi-only", rounds=1, clients_per_round=1, local_epochs=1,
                  batch_size=32, lr=1e-3, image_size=image_size, dataset="mnist-digits", dirichlet_alpha=None,
                  seed=0, examples_per_client=320)
    data = client_data(job, 0, 8)
    model, convs = global_model(job, num_classes=10)
    apply_method(model, "asi-only", {c: (32, 8, 2, 2) for c in convs})
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    warm_up(model, *next(batches(data, batch_size=32, image_size=image_size)), count=False)
    process = psutil.Process()
    libc.malloc_trim(0)
    baseline = process.memory_info().rss
    peak, reclaims, stop = [0], [0], threading.Event()

    def sample():
        increase = process.memory_info().rss - baseline
        if policy == "reclaim" and increase > watermark:
            libc.malloc_trim(0)
            reclaims[0] += 1
            increase = process.memory_info().rss - baseline
        peak[0] = max(peak[0], increase)

    def watch():
        while not stop.wait(0.002):
            sample()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    step_peaks, cpu = [], []
    for epoch in range(epochs):
        before = resource.getrusage(resource.RUSAGE_SELF)
        for x, y in batches(data, batch_size=32, image_size=image_size, shuffle=True, seed=epoch):
            loss = F.cross_entropy(model(x), y)
            sample()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sample()
            optimizer.step()
            sample()
            step_peaks.append(peak[0])
            peak[0] = 0
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    stop.set()
    return {"policy": policy, "step_peaks_mib": [round(p / 2**20, 1) for p in step_peaks], "cpu_seconds": cpu,
            "reclaims": reclaims[0]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.allocator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/allocator.json"))
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # a child process's case
    args = parser.parse_args(argv)
    if args.one:
        policy, model, size, layers, watermark = args.one
        print(json.dumps(_one(policy, model, int(size), int(layers), float(watermark), args.epochs)))
        return {}
    results = []
    for model, size, layers in CASES:
        rows = {}
        for policy in POLICIES:
            watermark = statistics.median(rows["mmap-128k"]["step_peaks_mib"]) * 2**20 if policy == "reclaim" else 0
            out = subprocess.run([sys.executable, "-m", "bench.allocator", "--epochs", str(args.epochs), "--one",
                                  policy, model, str(size), str(layers), str(watermark)],
                                 capture_output=True, text=True, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
            rows[policy] = json.loads(out.stdout.strip().splitlines()[-1])
        default_cpu = sum(rows["default"]["cpu_seconds"])
        for policy, row in rows.items():
            peaks = row["step_peaks_mib"]
            print(f"{model} {size} px, {policy:9s}: step peaks {min(peaks):6.1f}-{max(peaks):6.1f} MiB, "
                  f"CPU per epoch {sum(row['cpu_seconds']) / len(row['cpu_seconds']):.2f} s "
                  f"({sum(row['cpu_seconds']) / default_cpu:.2f}x default), reclaims {row['reclaims']}")
        results.append({"model": model, "image_size": size, "layers": layers, "rows": rows})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results}, indent=2) + "\n")
    return {"results": results}


if __name__ == "__main__":
    main()
