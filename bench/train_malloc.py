"""Training steps on the CPU: glibc's default allocator settings against keeping freed memory, side by side.

On 2 cores a training step of the default model spent ~15 % of its time in the kernel (cpu-21:
71 000 minor page faults a second, ~8.6 GB of fresh pages in 30 s): glibc hands large tensors
back to the kernel when they are freed and faults them in again on the next step.
``training.train.keep_freed_memory`` (mallopt: no mmap below 1 GiB, no trimming) keeps them;
train.py calls it since this benchmark measured it on real steps (cpu-22, 12 steps x 2 rounds,
float32 on 2 cores: 3.461 s/step default, 2.690 tuned, ratio 0.777; page faults 274 296 -> 21 047
a step; kernel share 21.4 % -> 5.0 %).
This measures both in separate processes, alternating, on the same real batches:

    .venv-export/bin/python -m bench.train_malloc --model X.nemo[.gz] --manifest training/data/audioN/train.json \
        [--steps 20 --warmup 3 --rounds 2]

Each process restores the model, builds ``--steps`` batches of ~80 s of audio (utterances of
similar length, as Lhotse's buckets give), and times forward + CTC loss + backward + AdamW on
them after ``--warmup`` untimed steps. Prints seconds per step, kernel share and page faults per
step for each, and the ratio. Needs the export/training venv (NeMo, torch).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.train import keep_freed_memory

ROOT = Path(__file__).resolve().parent.parent


def batches(manifest: Path, n: int, batch_s: float, seed: int) -> list[list[dict[str, object]]]:
    rows = [json.loads(line) for line in manifest.open()]
    rng = random.Random(seed)
    rows = [r for r in rows if 0.3 <= r["duration"] <= 20.0]
    rows.sort(key=lambda r: r["duration"])
    out = []
    for _ in range(n):  # one bucket of neighbours in length, filled to ~batch_s seconds
        i = rng.randrange(len(rows))
        b, total = [], 0.0
        while total < batch_s and i < len(rows):
            b.append(rows[i])
            total += float(rows[i]["duration"])
            i += 1
        out.append(b)
    return out


def child(args: argparse.Namespace) -> None:
    if args.allocator == "tuned":
        keep_freed_memory()
    import numpy as np
    import soundfile as sf
    import torch
    from nemo.collections.asr.models import EncDecCTCModelBPE

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    nemo = Path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        if nemo.is_dir():
            from training.train import nemo_model_from_package

            model = nemo_model_from_package(nemo, Path(tmp))
        else:
            if nemo.suffix == ".gz":
                plain = Path(tmp) / nemo.stem
                with gzip.open(nemo) as f, plain.open("wb") as g:
                    shutil.copyfileobj(f, g)
                nemo = plain
            model = EncDecCTCModelBPE.restore_from(str(nemo), map_location="cpu")
    model = model.float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    data = []
    for b in batches(Path(args.manifest), args.warmup + args.steps, 80.0, args.seed):
        wavs = [sf.read(str(r["audio_filepath"]), dtype="float32")[0] for r in b]
        lens = torch.tensor([len(w) for w in wavs])
        audio = torch.zeros(len(wavs), int(lens.max()))
        for i, w in enumerate(wavs):
            audio[i, : len(w)] = torch.from_numpy(w)
        ids = [model.tokenizer.text_to_ids(str(r["text"])) for r in b]
        tl = torch.tensor([len(t) for t in ids])
        tgt = torch.zeros(len(ids), int(tl.max()), dtype=torch.long)
        for i, t in enumerate(ids):
            tgt[i, : len(t)] = torch.tensor(t)
        data.append((audio, lens, tgt, tl))

    def step(audio: torch.Tensor, lens: torch.Tensor, tgt: torch.Tensor, tl: torch.Tensor) -> None:
        log_probs, enc_len, _ = model(input_signal=audio, input_signal_length=lens)
        loss = model.loss(log_probs=log_probs, targets=tgt, input_lengths=enc_len, target_lengths=tl)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for d in data[: args.warmup]:
        step(*d)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for d in data[args.warmup :]:
        step(*d)
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(
        json.dumps(
            {
                "s_per_step": (t1 - t0) / args.steps,
                "kernel_share": (r1.ru_stime - r0.ru_stime) / max(cpu, 1e-9),
                "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / args.steps,
                "audio_s_per_step": float(np.mean([float(d[1].sum()) / 16000 for d in data[args.warmup :]])),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model package (e.g. models/<name>), a .nemo or a .nemo.gz")
    p.add_argument("--manifest", required=True, type=Path, help="a training.synth train.json")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="each setting runs this many times, alternating")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--allocator", choices=["default", "tuned"], help=argparse.SUPPRESS)  # the child's
    args = p.parse_args()
    if args.allocator:
        child(args)
        return
    results: dict[str, list[dict[str, float]]] = {"default": [], "tuned": []}
    for r in range(args.rounds):
        for alloc in ("default", "tuned") if r % 2 == 0 else ("tuned", "default"):
            cmd = [sys.executable, "-m", "bench.train_malloc", "--allocator", alloc]
            cmd += ["--model", args.model, "--manifest", str(args.manifest), "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup), "--seed", str(args.seed)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[alloc].append(res)
            print(f"round {r + 1} {alloc:8s} " + " ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    mean = {a: {k: sum(x[k] for x in v) / len(v) for k in v[0]} for a, v in results.items()}
    for a, m in mean.items():
        print(
            f"{a:8s}: {m['s_per_step']:.3f} s/step ({m['audio_s_per_step']:.1f} s of audio), kernel "
            f"{100 * m['kernel_share']:.1f} % of CPU time, {m['faults_per_step']:.0f} page faults/step"
        )
    print(f"tuned/default step time: {mean['tuned']['s_per_step'] / mean['default']['s_per_step']:.3f}")


if __name__ == "__main__":
    main()
