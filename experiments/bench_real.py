"""GPU benchmark of the real scale on a random-weight full-size FLUX.1-dev transformer (no weights needed).

    python -m experiments.bench_real --size full --device cuda --out results/bench/gpu.md   # a GPU node
    python -m experiments.bench_real --size tiny --device cpu --out /tmp/bench.md          # smoke test

Builds ``model=flux_dev`` with :data:`tmpo.policies.tiny_diffusers.FLUX_FULL` (the released transformer
and VAE sizes, one-layer text encoders of FLUX's widths) in bf16 with LoRA r = 64 on every projection,
gradient checkpointing, 512 x 512 latents and K = 27 per prompt, runs ``--warmup + --iters`` training
iterations of the shared loop per method with a cheap reward (the mini PickScore stand-in, images
resized to 32 px) and writes iteration time, rollout time and peak GPU memory as a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict

from tmpo.policies.tiny_diffusers import FLUX_FULL
from tmpo.run import build_trainer, compose_config


def bench_method(method: str, size: str, device: str, iters: int, warmup: int, prompts: int) -> dict[str, float]:
    full = size == "full"
    with tempfile.TemporaryDirectory() as d:
        cfg = compose_config([
            f"run_dir={d}", "logger=none", "trainer.progress=false", f"model={'flux_dev' if full else 'flux_tiny'}",
            f"method={method}", "reward=pickscore", "reward.suites={}", f"trainer.prompts_per_step={prompts}",
            f"model.device={device}", "model.pretrained=null", f"model.dtype={'bf16' if full else 'fp32'}",
            *(["+objective.features.tiny={}"] if method == "gardo" else []),
        ])
        with open_dict(cfg):
            cfg.model.tiny = OmegaConf.create(FLUX_FULL if full else {})
        t0 = time.perf_counter()
        trainer = build_trainer(cfg)
        build_s = time.perf_counter() - t0
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rows = [trainer.train_step(s) for s in range(warmup + iters)][warmup:]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
        lora = sum(p.numel() for _, p in trainer.policy.trainable_named_parameters())
        group = rows[-1]["train/group_size"]
    return {"method": method, "K": group, "prompts_per_step": prompts, "iter_time_s": float(np.mean([r["iter_time_s"] for r in rows])),
            "rollout_s": float(np.mean([r["time/rollout_s"] for r in rows])), "peak_gpu_gib": peak,
            "lora_params_m": lora / 1e6, "build_s": build_s}


def write_markdown(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "none"
    lines = [
        f"# Real-scale benchmark ({args.size} FLUX.1-dev transformer, random weights)", "",
        f"Command: `python -m experiments.bench_real --size {args.size} --device {args.device} --iters {args.iters} "
        f"--warmup {args.warmup} --prompts {args.prompts}`", "",
        f"Host: {platform.node()}, GPU: {gpu}, torch {torch.__version__}. 512 x 512 latents (full), bf16 transformer, LoRA r = 64, "
        "gradient checkpointing, mini PickScore stand-in as the reward; mean over the timed iterations after warm-up.", "",
        "| method | K | prompts/step | iter time (s) | rollout (s) | peak GPU memory (GiB) | LoRA params (M) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['method']} | {r['K']:.0f} | {r['prompts_per_step']} | {r['iter_time_s']:.2f} | {r['rollout_s']:.2f} | "
              f"{r['peak_gpu_gib']:.1f} | {r['lora_params_m']:.1f} |" for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="tmpo,flow_grpo")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=1, help="prompt groups per iteration (K = 27 leaves each)")
    parser.add_argument("--out", default="results/bench/gpu.md")
    args = parser.parse_args(argv)
    rows = []
    for method in args.methods.split(","):
        rows.append(bench_method(method, args.size, args.device, args.iters, args.warmup, args.prompts))
        print(rows[-1], flush=True)
        write_markdown(rows, args, Path(args.out))  # after every method: a time-out keeps what was measured
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
