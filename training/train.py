"""Step 3: train the small English Conformer-CTC with NeMo (CPU by default; GPU if present).

A NeMo ``EncDecCTCModelBPE``: SentencePiece BPE tokenizer (128 pieces) trained on the
training text, Conformer encoder (d_model 144, 8 layers, 4 heads; striding subsampling x4 by
default, ``--subsampling 8`` for the FastConformer's depthwise x8), CTC decoder; ~4.6 M
parameters. Measured here: x4 leaves the CTC blank plateau far sooner than x8 (see
training/README.md). Resumable on the same machine: checkpoints go to ``<run>/checkpoints``
and ``--resume`` continues from ``last.ckpt``. ``--max-minutes`` fits the learning-rate schedule to
the time: the run measures its own step rate and ends its cosine, on a validation, within the
minutes given (``--epochs`` is then an upper bound), with Lightning's ``max_time`` as a backstop.
Across machines (this project's build machines start empty every session):
``--init-from models/<name>`` continues from the committed default model's package (its NeMo
weights rebuilt from ``model.onnx`` and ``nemo_state.npz``; a ``.nemo`` file works too).

Usage:
    python -m training.train --data training/data/audio [more corpora ...] --run training/runs/en \
        --epochs 30 --max-minutes 60 [--resume | --init-from models/<name> | --init-from PATH.nemo]
Writes <run>/model.nemo at the end (or at once, with --save-only, from a stopped run): the best
checkpoint by validation WER, or the mean of the best 2..N (``--average N``, default 4) where
one of those validates lower (<run>/averaging.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the project: models/ and tokens/ side by side

SEED = 1234
VOCAB_SIZE = 128


def keep_freed_memory() -> bool:
    """Have glibc keep the memory of freed tensors for the next step instead of returning it.

    By default glibc gives large blocks back to the kernel when they are freed (blocks above its
    mmap threshold, at most 32 MiB when it adapts it itself, and the heap's top when trimming), so
    every training step faults its activations in afresh: on 2 cores that was ~15 % of the CPU
    time in the kernel (cpu-21), ~1.2 GB of fresh pages a step; bench/train_malloc.py measures it
    (cpu-22: 0.777x the step time of glibc's defaults). The subsampling convolutions'
    activations alone exceed 32 MiB, so the threshold goes to 1 GiB (glibc 2.36 takes it) and
    trimming stops: freed blocks stay in the heap for the next step. The process's memory stays
    at its peak, which it reaches every step anyway. Returns False where the C library is not
    glibc or refuses (nothing changes).
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def model_config(
    train: Path,
    val: Path,
    tokenizer_dir: Path,
    batch_duration: float,
    num_workers: int = 0,
    lr: float = 1e-3,
    subsampling: int = 4,
) -> dict[str, Any]:
    def ds(manifest: Path, shuffle: bool) -> dict[str, Any]:
        return {
            "manifest_filepath": str(manifest),
            "sample_rate": 16000,
            "batch_size": 16,
            "shuffle": shuffle,
            "num_workers": num_workers,
            "pin_memory": False,
            "max_duration": 20.0,
            "min_duration": 0.3,
            # Lhotse dynamic batching by total duration with length buckets: far less padding
            # than fixed-size random batches.
            "use_lhotse": shuffle,
            "batch_duration": batch_duration,
            "num_buckets": 8,
            "shuffle_buffer_size": 2000,
            "seed": SEED,
        }

    d_model = 144
    return {
        "sample_rate": 16000,
        "tokenizer": {"dir": str(tokenizer_dir), "type": "bpe"},
        "train_ds": ds(train, True),
        "validation_ds": ds(val, False),
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000,
            "normalize": "per_feature",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": 80,
            "n_fft": 512,
            "log": True,
            "frame_splicing": 1,
            "dither": 1e-5,
            "pad_to": 0,
            "pad_value": 0.0,
        },
        "spec_augment": {
            "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
            "freq_masks": 2,
            "time_masks": 2,
            "freq_width": 20,
            "time_width": 0.05,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": 80,
            "feat_out": -1,
            "n_layers": 8,
            "d_model": d_model,
            # x8 depthwise striding (FastConformer) or x4 striding (classic Conformer-CTC).
            "subsampling": "dw_striding" if subsampling == 8 else "striding",
            "subsampling_factor": subsampling,
            "subsampling_conv_channels": 128,
            "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos",
            "n_heads": 4,
            "att_context_size": [-1, -1],
            "xscaling": True,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "batch_norm",
            "dropout": 0.1,
            "dropout_pre_encoder": 0.1,
            "dropout_emb": 0.0,
            "dropout_att": 0.1,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": d_model,
            "num_classes": -1,
            "vocabulary": [],
        },
        "optim": {
            "name": "adamw",
            "lr": lr,
            "betas": [0.9, 0.98],
            "weight_decay": 1e-3,
            "sched": {"name": "CosineAnnealing", "warmup_steps": 200, "min_lr": 2e-5},
        },
    }


def train_tokenizer(manifest: Path, out: Path) -> Path:
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.model").exists():
        return tok_dir
    text = out / "tokenizer_text.txt"
    with text.open("w") as f:
        for line in manifest.open():
            f.write(json.loads(line)["text"] + "\n")
    create_spt_model(
        str(text),
        vocab_size=VOCAB_SIZE,
        sample_size=-1,
        do_lower_case=True,
        tokenizer_type="bpe",
        output_dir=str(tok_dir),
    )
    return tok_dir


def warm_start(source: Path, run: Path, tokens_dir: Path = ROOT / "tokens") -> dict[str, Any]:
    """Weights and tokenizer to continue from: a model package's directory, or a ``.nemo`` (fp16 or fp32).

    A package (``models/<name>``, as export_to_onnx.py wrote it) gives its NeMo weights through
    ``read_nemo_state`` (``model.onnx`` plus ``nemo_state.npz``) and its tokenizer from
    ``<tokens_dir>/<name>.model``. The tokenizer goes into ``<run>/tokenizer`` (so
    ``train_tokenizer`` keeps it: token ids must not change); the weights come back as float32
    tensors, for ``load_state_dict`` on the fresh model.
    """
    import torch

    tok_dir = run / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        from export_to_onnx import read_nemo_state
        from service.package import Manifest

        tokenizer = Manifest.read(source).vocabulary.tokenizer
        if tokenizer.type != "sentencepiece" or tokenizer.file is None:
            raise SystemExit(f"{source}: not a SentencePiece (BPE) model package; train.py trains only those")
        write_nemo_tokenizer((tokens_dir / tokenizer.file).read_bytes(), tok_dir)
        return {
            k: torch.from_numpy(v).float() if v.dtype.kind == "f" else torch.from_numpy(v)
            for k, v in read_nemo_state(source).items()
        }
    import tarfile

    weights: dict[str, Any] = {}
    with tarfile.open(source) as tar:
        for m in tar.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            f = tar.extractfile(m)
            if f is None:
                continue
            if base == "model_weights.ckpt":
                weights = torch.load(f, map_location="cpu", weights_only=True)
            for want in ("tokenizer.model", "tokenizer.vocab", "vocab.txt"):
                if base == want or base.endswith("_" + want):
                    (tok_dir / want).write_bytes(f.read())
    if not weights or not (tok_dir / "tokenizer.model").exists():
        raise SystemExit(f"{source}: no model_weights.ckpt or tokenizer.model inside; is it a .nemo file?")
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def nemo_model_from_package(pkg: Path, work: Path, tokens_dir: Path = ROOT / "tokens") -> Any:
    """The NeMo model a package was exported from, rebuilt from the package alone, in eval mode.

    Its ``training_config.yaml`` (the run's model config, which run_all.sh copies into the
    package; the data sections are dropped), its weights and tokenizer (``warm_start``).
    ``work`` receives the tokenizer files the model reads.
    """
    from nemo.collections.asr.models import EncDecCTCModelBPE
    from omegaconf import OmegaConf, open_dict

    state = warm_start(pkg, work, tokens_dir)
    cfg = OmegaConf.load(pkg / "training_config.yaml")
    with open_dict(cfg):
        cfg.tokenizer.dir = str(work / "tokenizer")
        for k in ("train_ds", "validation_ds", "test_ds"):
            cfg.pop(k, None)
    model = EncDecCTCModelBPE(cfg=cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def write_nemo_tokenizer(spm_model: bytes, tok_dir: Path) -> None:
    """The three files NeMo's BPE tokenizer setup reads, from the SentencePiece model alone.

    ``tokenizer.model`` as it is; ``tokenizer.vocab`` as SentencePiece's trainer writes it
    (piece, tab, score); ``vocab.txt`` by NeMo's ``create_spt_model`` rule (special pieces
    left out, a word-initial piece without its "\u2581", any other with "##"). Byte for byte
    what ``create_spt_model`` wrote for the same model (tests/test_training_run.py).
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    special = {i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)}
    vocab = []
    for i, piece in enumerate(pieces):
        if i not in special:
            token = piece[1:] if piece.startswith("\u2581") else f"##{piece}"
            vocab.append(token or piece[0])
    (tok_dir / "tokenizer.model").write_bytes(spm_model)
    (tok_dir / "tokenizer.vocab").write_text(
        "".join(f"{p}\t{sp.get_score(i):g}\n" for i, p in enumerate(pieces)), encoding="utf8"
    )
    (tok_dir / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf8")


def finished_run(run: Path) -> str | None:
    """Why ``--resume`` must not continue ``run``, or None when it may.

    A run that ended saved ``<run>/model.nemo`` after its last checkpoint. Resuming it would
    restore its ended schedule (and its weights, over ``--init-from``'s) and train nothing new:
    what cpu-21's machine, which kept cpu-20's ``training/runs/<name>``, would have done.
    An interrupted run has no ``model.nemo`` newer than ``last.ckpt`` and resumes as before.
    run_all.sh asks this before synthesis, so the mistake costs seconds, not half an hour.
    """
    last, done = run / "checkpoints" / "last.ckpt", run / "model.nemo"
    if last.exists() and done.exists() and done.stat().st_mtime > last.stat().st_mtime:
        return (
            f"{run} holds a finished run ({done} was saved after its last checkpoint): --resume would "
            f"continue its ended schedule. Move it aside (mv {run} {run}-old) or train into another --run/--name"
        )
    return None


def best_checkpoints(ckpt_dir: Path, k: int) -> list[Path]:
    """The ``k`` checkpoints with the lowest validation WER, best first.

    ModelCheckpoint names them ``best-step=N-val_wer=W.ckpt``; ties go to the later step.
    """

    def key(p: Path) -> tuple[float, int]:
        fields = dict(part.split("=", 1) for part in p.stem.removeprefix("best-").split("-") if "=" in part)
        return float(fields["val_wer"]), -int(fields["step"])

    return sorted(ckpt_dir.glob("best-*.ckpt"), key=key)[: max(0, k)]


def average_weights(state_dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Checkpoint averaging: the element-wise mean of several checkpoints' weights.

    Floating-point tensors (weights, biases, BatchNorm's running statistics) are averaged in
    float64 and cast back; any other tensor (BatchNorm's ``num_batches_tracked`` counter) is
    taken from the first state dict, the best checkpoint. All must have the same keys.
    """
    first = state_dicts[0]
    for other in state_dicts[1:]:
        if other.keys() != first.keys():
            raise ValueError("checkpoints to average hold different parameters")
    out: dict[str, Any] = {}
    for name, value in first.items():
        if value.is_floating_point():
            total = sum(sd[name].double() for sd in state_dicts)
            out[name] = (total / len(state_dicts)).to(value.dtype)
        else:
            out[name] = value.clone()
    return out


def round_to_fp16(model: Any) -> int:
    """Round every trainable parameter, in place, to the nearest float16 value (kept in float32).

    The graph's weights are then float16 values, which export_to_onnx.py stores as float16
    (``store_fp16_where_lossless``): cpu-24's graph took 11.8 MB instead of 20.9, and git stores
    about that much for every model shipped (the repository has a size limit). Buffers are left
    alone: the preprocessor's window and mel filterbank must stay as the runtime computes them,
    and BatchNorm's statistics are small. A parameter that float16 cannot hold (beyond +-65504)
    is left as it is. Returns how many parameters were rounded.
    """
    import torch

    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                r = p.half().to(p.dtype)
                if bool(torch.isfinite(r).all()):
                    p.copy_(r)
                    n += 1
    return n


def training_manifest(data: list[Path], run: Path) -> Path:
    """The training manifest for one or more corpora made by ``training.synth``.

    One corpus is used as it is. Several (for example the draws of earlier cycles, each made with
    its own ``--train-seed``, beside a new one) are joined into ``<run>/train.json``, so a run
    can train on all of them without synthesizing them again. Every corpus has the same
    validation and test sentences (they depend on synth's ``--seed`` only); validation uses the
    first one's.
    """
    if len(data) == 1:
        return data[0] / "train.json"
    out = run / "train.json"
    with out.open("w") as f:
        for d in data:
            text = (d / "train.json").read_text()
            f.write(text if text.endswith("\n") or not text else text + "\n")
    return out


def validation_plan(planned: int, val_every: int) -> tuple[int, int]:
    """(validation interval, max_steps) for a plan of ``planned`` steps, validating at most every
    ``val_every`` steps.

    Lightning validates (and so checkpoints) only every interval: a run that ends between two
    validations loses its last steps (cpu-7 planned 2238 steps with --val-every 500 and shipped
    step 2000's weights). So the validations are spread evenly and the plan ends on the last one:
    it grows by fewer steps than there are validations (2238 with 500 -> 5 x 448 = 2240), where
    rounding up to a multiple of ``val_every`` could add almost a whole interval (2500).
    """
    n = math.ceil(planned / max(1, val_every))
    interval = math.ceil(planned / n)
    return interval, n * interval


def warmup_steps(max_steps: int) -> int:
    """The warm-up for a cosine of ``max_steps``: a gentle one. With a fast one (200 steps to
    2e-3) this model sat on the CTC blank plateau for 550+ steps without learning."""
    return min(600, max_steps // 8)


def time_plan(
    step: int,
    steps_timed: int,
    train_s: float,
    val_s: float,
    left_s: float,
    val_every: int,
    cap: int,
) -> int:
    """The step a run should end on to finish within ``left_s`` more seconds.

    ``steps_timed`` steps took ``train_s`` seconds of training (validations excluded); one
    validation takes ``val_s``, and one runs every ``val_every`` steps and once more at the end.
    Never beyond ``cap`` (the plan ``--epochs`` asks for), never before ``step``.

    Written because a schedule sized by hand from another machine's rate went wrong: cpu-18's
    machine ran at half the documented rate, and ``max_time`` would have cut its cosine with the
    learning rate still near 1e-4 (training/README.md, "Measure the step rate").
    """
    step_s = train_s / max(1, steps_timed)
    every = max(1, val_every)

    def cost(more: int) -> float:  # seconds for ``more`` steps: the validations on the way, one at the end
        end = step + more
        validations = end // every - step // every + (1 if end % every else 0)
        return more * step_s + validations * val_s

    lo, hi = 0, max(0, min(cap - step, math.floor(left_s / max(step_s, 1e-9))))
    while lo < hi:  # the most steps whose cost fits (cost only grows with the steps)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= left_s else (lo, mid - 1)
    return step + lo


def time_planner(budget_s: float, cap: int, val_every: int, val_guess_s: float, probe: int = 40) -> Any:
    """A Lightning callback that fits the cosine schedule to ``budget_s`` seconds of training.

    It re-plans after ``probe`` steps and after every validation (from the step and validation
    times measured so far): it moves the scheduler's ``max_steps`` (and, while it is still
    warming up, its ``warmup_steps``) and stops the run on the planned step, which makes
    Lightning validate and checkpoint there. ``val_guess_s`` stands in for a validation's time
    until one has been measured.
    """
    import time

    import lightning.pytorch as pl

    class TimePlan(pl.Callback):
        def __init__(self) -> None:
            self.plan = cap
            self.val_s = 0.0
            self.validations = 0
            self.t0 = self.v0 = self.spent = 0.0
            self.step0 = 0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            # A resumed run (--resume) has spent part of the budget already: Lightning's Timer
            # (max_time) carries that time in the checkpoint, so the plan counts it too.
            from lightning.pytorch.callbacks import Timer

            self.spent = sum(c.time_elapsed() for c in trainer.callbacks if isinstance(c, Timer))
            self.t0 = time.monotonic()
            self.step0 = trainer.global_step

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            self.v0 = time.monotonic()

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking:
                return
            self.val_s += time.monotonic() - self.v0
            self.validations += 1
            if not trainer.should_stop:
                self.replan(trainer)

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == self.step0 + probe:
                self.replan(trainer)
            if trainer.global_step >= self.plan:
                trainer.should_stop = True

        def replan(self, trainer: Any) -> None:
            elapsed = time.monotonic() - self.t0
            step = trainer.global_step
            per_val = self.val_s / self.validations if self.validations else val_guess_s
            # 2 % of the budget in reserve: the last validation and checkpoint must fit before max_time.
            left = 0.98 * budget_s - self.spent - elapsed
            self.plan = time_plan(step, step - self.step0, elapsed - self.val_s, per_val, left, val_every, cap)
            sched = trainer.lr_scheduler_configs[0].scheduler
            offset = step - sched.last_epoch  # 0 unless the scheduler was restored out of step
            sched.max_steps = self.plan - offset
            if sched.last_epoch < sched.warmup_steps:
                sched.warmup_steps = max(sched.last_epoch + 1, warmup_steps(sched.max_steps))
            print(
                f"time plan at step {step}: {(elapsed - self.val_s) / max(1, step - self.step0):.2f} s/step, "
                f"{per_val:.0f} s/validation{'' if self.validations else ' (guessed)'}, {left / 60:.1f} min left "
                f"-> end at step {self.plan} (warm-up {sched.warmup_steps})",
                flush=True,
            )

    return TimePlan()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[Path("training/data/audio")],
        help="corpus directories from training.synth; several are trained on together, validation uses the first's",
    )
    p.add_argument("--run", type=Path, default=Path("training/runs/en"))
    p.add_argument(
        "--epochs",
        type=float,
        default=30,
        help="passes over the training data (may be fractional); with --max-minutes, at most this many",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0,
        help="fit the schedule to this many minutes of training (measured step rate; ends on a validation, "
        "checkpointed); 0 = no limit, the schedule is --epochs",
    )
    p.add_argument("--batch-duration", type=float, default=80.0, help="seconds of audio per batch")
    p.add_argument(
        "--val-every",
        type=int,
        default=250,
        help="validate at most every N steps (evened out so that the run ends on a validation)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument(
        "--subsampling", type=int, choices=[4, 8], default=4, help="x4 Conformer (default) or x8 FastConformer"
    )
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers (0 suits 2 CPUs)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all usable CPUs")
    p.add_argument(
        "--precision",
        choices=["32-true", "bf16-mixed"],
        help="default: bf16-mixed on a GPU or a CPU with native bf16 (AVX512-BF16 or AMX: 1.46x the steps per "
        "second of 32-true on this project's 2-core EPYC), else 32-true",
    )
    p.add_argument("--resume", action="store_true", help="continue from <run>/checkpoints/last.ckpt")
    p.add_argument(
        "--init-from",
        type=Path,
        help="start from the weights and tokenizer of a model package (e.g. models/<name>, the shipped default) "
        "or a .nemo file: a run continues across machines from what was committed; optimizer and schedule "
        "start afresh",
    )
    p.add_argument(
        "--tokens-dir",
        type=Path,
        default=ROOT / "tokens",
        help="where --init-from's package keeps its tokenizer (tokens/<name>.model; default: the project's)",
    )
    p.add_argument(
        "--average",
        type=int,
        default=4,
        help="keep the N best checkpoints by validation WER and, at the end, validate the mean of the best 2..N "
        "(checkpoint averaging); the model saved is whichever of those and the single best validates lowest "
        "(1 = the single best, as before)",
    )
    p.add_argument(
        "--save-only",
        action="store_true",
        help="train nothing: write <run>/model.nemo from the best checkpoint so far (after stopping a run early)",
    )
    args = p.parse_args()
    if args.resume and not args.save_only and (why := finished_run(args.run)):
        p.error(why)
    logging.getLogger("nemo_logger").setLevel(logging.WARNING)
    if not keep_freed_memory():  # before torch allocates anything
        print("glibc mallopt unavailable: training with the C library's default allocator settings")

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from nemo.collections.asr.models import EncDecCTCModelBPE
    from omegaconf import OmegaConf

    pl.seed_everything(SEED, workers=True)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    args.run.mkdir(parents=True, exist_ok=True)
    init = warm_start(args.init_from, args.run, args.tokens_dir) if args.init_from else None
    train = training_manifest(args.data, args.run).resolve()
    tok_dir = train_tokenizer(train, args.run)
    cfg = OmegaConf.create(
        model_config(
            train,
            (args.data[0] / "val.json").resolve(),
            tok_dir.resolve(),
            args.batch_duration,
            args.num_workers,
            args.lr,
            args.subsampling,
        )
    )
    # NeMo's Lhotse loader repeats the data forever and batches by duration, so training is
    # counted in steps: an "epoch" here is the number of batches that holds the corpus once.
    total_s = sum(json.loads(line)["duration"] for line in train.open())
    steps_per_epoch = max(1, int(total_s / args.batch_duration * 1.1))
    planned = max(1, round(steps_per_epoch * args.epochs))
    val_every, max_steps = validation_plan(planned, args.val_every)
    cfg.optim.sched.max_steps = max_steps
    cfg.optim.sched.warmup_steps = warmup_steps(max_steps)
    if not (args.save_only and (args.run / "config.yaml").exists()):  # keep the record of the run as it ran
        (args.run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

    gpu = torch.cuda.is_available()
    precision = args.precision or ("bf16-mixed" if gpu or torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true")
    callbacks: list[Any] = []
    planner = None
    if args.max_minutes and not args.save_only:
        # Until the first validation is timed: forward only (~1/3 of a training step's work per
        # second of audio) over the validation audio, in fixed batches with padding.
        val_audio_s = sum(json.loads(line)["duration"] for line in (args.data[0] / "val.json").open())
        planner = time_planner(args.max_minutes * 60, max_steps, val_every, val_audio_s / args.batch_duration * 0.5)
        callbacks.append(planner)
    ckpt = ModelCheckpoint(
        dirpath=args.run / "checkpoints",
        save_last=True,
        save_top_k=max(1, args.average),
        monitor="val_wer",
        mode="min",
        filename="best-{step}-{val_wer:.3f}",
    )
    trainer = pl.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision=precision,
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        max_time={"minutes": args.max_minutes} if args.max_minutes else None,
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        callbacks=[ckpt, *callbacks],
        logger=pl.loggers.CSVLogger(str(args.run), name="logs"),
        enable_progress_bar=False,
        use_distributed_sampler=False,  # lhotse samples itself
    )
    model = EncDecCTCModelBPE(cfg=cfg, trainer=trainer)
    if init is not None:
        model.load_state_dict(init)
        print(f"initialized from {args.init_from}")
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"parameters: {n_params / 1e6:.2f} M; device: {'gpu' if gpu else 'cpu'}, {precision}; {max_steps} steps "
        f"({args.epochs} passes over {total_s / 3600:.2f} h), validation every {val_every} steps"
        + (f"; the schedule will be fitted to {args.max_minutes:g} minutes" if planner else "")
    )
    last = args.run / "checkpoints" / "last.ckpt"
    if not args.save_only:
        trainer.fit(model, ckpt_path=str(last) if args.resume and last.exists() else None)
        if planner is not None:  # the config on record: the schedule as fitted, not as first sized
            sched = trainer.lr_scheduler_configs[0].scheduler
            cfg.optim.sched.max_steps = sched.max_steps
            cfg.optim.sched.warmup_steps = sched.warmup_steps
            (args.run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    # The checkpoints are named best-step=N-val_wer=W.ckpt: the lowest W wins.
    ranked = best_checkpoints(args.run / "checkpoints", max(1, args.average))
    best = str(ranked[0]) if ranked else ""
    weights = [torch.load(c, map_location="cpu", weights_only=False)["state_dict"] for c in ranked]
    if best:
        # Into this model, not a fresh load_from_checkpoint one: that one has no validation
        # loader, and validate() below needs it (cpu-23 lost its averaging to exactly that).
        model.load_state_dict(weights[0])
    chosen = best or "last weights"

    def validate() -> float:  # the run's own validation set and metric, on the weights as they are now
        judge = pl.Trainer(
            accelerator="gpu" if gpu else "cpu",
            devices=1,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        return float(judge.validate(model, verbose=False)[0]["val_wer"])

    if len(ranked) > 1:
        # Checkpoint averaging, judged on the validation set the run chose its best checkpoint on
        # (which favours the single best: its score is the lowest of several noisy ones).
        scores = {1: validate()}
        for k in range(2, len(ranked) + 1):
            model.load_state_dict(average_weights(weights[:k]))
            scores[k] = validate()
        print(
            "validation WER, mean of the best k checkpoints: " + ", ".join(f"k={k}: {w:.4f}" for k, w in scores.items())
        )
        k = min(scores, key=lambda n: (scores[n], n))
        model.load_state_dict(average_weights(weights[:k]))
        if k > 1:
            chosen = "the mean of " + ", ".join(c.name for c in ranked[:k])
        round_to_fp16(model)
        rounded = validate()  # what rounding to float16 costs, on the same validation
        print(f"validation WER {scores[k]:.4f}, {rounded:.4f} with the weights rounded to float16")
        record = {"checkpoints": [c.name for c in ranked], "val_wer": scores, "chosen_k": k, "fp16_rounded": rounded}
        (args.run / "averaging.json").write_text(json.dumps(record, indent=1) + "\n")
    else:
        round_to_fp16(model)
    # export_to_onnx.py packages it; the next run starts from that package (--init-from models/<name>).
    model.save_to(str(args.run / "model.nemo"))
    print(f"saved {args.run / 'model.nemo'} (from {chosen})")


if __name__ == "__main__":
    main()
