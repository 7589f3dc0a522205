#!/usr/bin/env bash
# The whole default-model recipe on an empty machine: text, speech, training, export, evaluation.
#
#   bash training/run_all.sh [--train N] [--extra M] [--train-seed S] [--epochs E] [--max-minutes M]
#                            [--batch-duration S] [--lr LR] [--init-from models/<name> | PATH.nemo]
#                            [--data DIR] [--also DIR ...] [--wide-voices]
#
# --init-from models/<name> continues from the committed default model's package (its NeMo
# weights rebuilt from model.onnx and nemo_state.npz; the build machines start empty each
# session, so training/runs/ rarely survives); a
# continuation wants a lower peak learning rate (--lr 3e-4 restarts cheapest; not compared side by side
# with 5e-4 from the same weights: training/README.md, cpu-6 to cpu-12).
# --train defaults to the whole training split (22 151 sentences, 22.6 h, 33 min of synthesis):
# the shipped model (cpu-7 to cpu-12) was trained on it; rare words are what the smaller corpus lacked.
# --extra M mixes the first M WordNet usage examples (text.py: those bringing words the fortunes
# have rarely come first) into the training set; --train-seed S draws other fortunes sentences and
# pairs them with other voices (validation and test sets stay the same).
# --data DIR is where this run's corpus is synthesized (default training/data/audio); each
# --also DIR adds a corpus an earlier run synthesized there (its own --train-seed) to the
# training set, so its hours are trained on again instead of thrown away. Validation and test
# come from --data.
# --max-minutes M fits the learning-rate schedule to M minutes of training at the step rate the
# run measures (train.py's time plan); --epochs is then only an upper bound.
# --wide-voices synthesizes the training set with more voice variety (more espeak-ng accents and
# variants, flite/festival prosody varied, pitch shifts; training/synth.py), from cpu-18 on.
# Validation and test sets are the same with or without it.
#
# Synthesis and training never run in CI. Generated data goes to training/data and
# training/runs (git-ignored); the exported package to models/ and tokens/.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=22151; EPOCHS=20; MAXMIN=0; NAME=en_synth_conformer_ctc; BATCH=80; INIT=(); LR=(); EXTRA=0; TSEED=(); WIDE=()
DATA=training/data/audio; ALSO=()
while [ $# -gt 0 ]; do
  case $1 in
    --train) TRAIN=$2; shift 2;; --extra) EXTRA=$2; shift 2;; --train-seed) TSEED=(--train-seed "$2"); shift 2;;
    --epochs) EPOCHS=$2; shift 2;; --max-minutes) MAXMIN=$2; shift 2;;
    --name) NAME=$2; shift 2;; --batch-duration) BATCH=$2; shift 2;;
    --init-from) INIT=(--init-from "$2"); shift 2;; --lr) LR=(--lr "$2"); shift 2;;
    --data) DATA=$2; shift 2;; --also) ALSO+=("$2"); shift 2;; --wide-voices) WIDE=(--wide-voices); shift;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
for d in "${ALSO[@]}"; do
  [ -f "$d/train.json" ] || { echo "--also $d: no train.json there (synthesize it first)" >&2; exit 2; }
done
PY=${PYTHON:-python3}
# Training resumes training/runs/$NAME: refuse now, not after synthesis, if that run has ended.
"$PY" -c 'import sys; from pathlib import Path; from training.train import finished_run
why = finished_run(Path(sys.argv[1])); sys.exit(why and "run_all.sh: " + why)' "training/runs/$NAME"

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
  fortunes fortunes-min wordnet-base espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox

[ -x .venv-export/bin/python ] || "$PY" -m venv .venv-export
.venv-export/bin/pip install -q torch==2.13.0
.venv-export/bin/pip install -q -r requirements-export.txt -r training/requirements.txt
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -r requirements-dev.txt

.venv-export/bin/python -m training.text --out training/data/text
.venv-export/bin/python -m training.synth --text training/data/text --out "$DATA" --train "$TRAIN" --extra "$EXTRA" "${TSEED[@]}" "${WIDE[@]}"
.venv-export/bin/python -m training.train --data "$DATA" "${ALSO[@]}" --run "training/runs/$NAME" \
  --epochs "$EPOCHS" --max-minutes "$MAXMIN" --batch-duration "$BATCH" --resume "${INIT[@]}" "${LR[@]}"
.venv-export/bin/python export_to_onnx.py "training/runs/$NAME/model.nemo" --name "$NAME" --language en \
  --max-audio-s 80
# --max-audio-s 80: one service window (60 s core + 2 x 10 s context; longer audio is windowed),
# which keeps the graph's positional table small. The export also writes nemo_state.npz, what
# model.onnx lacks of the NeMo weights (~64 KB): the next run starts from the package with
# --init-from models/$NAME.
# The run's model config: what train.py's nemo_model_from_package rebuilds the NeMo model with.
cp "training/runs/$NAME/config.yaml" "models/$NAME/training_config.yaml"
.venv/bin/python -m training.evaluate --model "$NAME" --json "models/$NAME/evaluation.json" \
  --by-voice --seen-text "$DATA/train.json" "${ALSO[@]/%//train.json}" \
  --sets "$DATA/test_voices.json" "$DATA/test_heldout.json" "$DATA/test_noisy.json"
