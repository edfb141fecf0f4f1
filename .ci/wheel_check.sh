#!/usr/bin/env bash
# The project as a user installs it: build the wheel, install it (no deps, not editable) into a
# fresh venv OUTSIDE the repo, and run the console commands from a folder where the repo is not
# on the path: --validate_only of a named config, the tiny smoke run, an eval and an export of
# its checkpoint, each command's --help. Offline and cheap (tiny random models, ~1-2 min).
#
# The fresh venv reuses the dependencies already installed in the project venv (a .pth line adds
# that venv's site-packages to its path; the editable install there is not activated), so only
# the wheel itself is new.  Usage: .ci/wheel_check.sh [PYTHON of the project venv]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$REPO/.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled PYTHONNOUSERSITE=1
unset PYTHONPATH

echo "[wheel] building the wheel"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$REPO"
WHEEL="$(ls "$WORK"/dist/diffusion_opd-*.whl)"

echo "[wheel] fresh venv $WORK/venv, installing $(basename "$WHEEL") without dependencies"
"$PY" -m venv --without-pip "$WORK/venv"
DEPS="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SITE="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$DEPS" > "$SITE/_project_dependencies.pth"
"$PY" -m pip --python "$WORK/venv/bin/python" install -q --no-deps --ignore-installed "$WHEEL"
BIN="$WORK/venv/bin"

cd "$WORK"  # not the repo: nothing of the clone is importable from here
"$BIN/python" - <<'PY'
import os, sys
import diffusion_opd, diffusion_opd.named_configs
here = os.path.dirname(diffusion_opd.__file__)
assert here.startswith(sys.prefix), f"diffusion_opd imported from {here}, not from the fresh venv {sys.prefix}"
assert os.path.isfile(os.path.join(here, "named_configs", "opd.py")), "named configs missing from the wheel"
print(f"[wheel] diffusion_opd {diffusion_opd.__version__} from {here}")
PY
for cmd in dopd-train dopd-eval dopd-export dopd-reward-server dopd-demo; do
  "$BIN/$cmd" --help > /dev/null
done
for module in diffusion_opd.train diffusion_opd.evaluation diffusion_opd.export diffusion_opd.rewards.serve diffusion_opd.demo; do
  "$BIN/python" -m "$module" --help > /dev/null
done

echo "[wheel] dopd-train --validate_only (a named config from the wheel)"
"$BIN/dopd-train" --config opd:tiny_mopd --validate_only output_dir="$WORK/run" > /dev/null

echo "[wheel] dopd-train: the tiny smoke run (2 rounds)"
"$BIN/dopd-train" --config opd:tiny_mopd output_dir="$WORK/run" train.num_rounds=2 eval.every=2 \
  eval.num_prompts=1 eval.sample_images=1 save_every=2 logging.progress=false > "$WORK/train.log" 2>&1 \
  || { cat "$WORK/train.log"; exit 1; }
test -f "$WORK/run/checkpoints/round-2/pytorch_lora_weights.safetensors"
test -f "$WORK/run/samples/objects/round-2.png"

echo "[wheel] dopd-eval of its checkpoint (OCR reward, 2 prompts)"
mkdir -p "$WORK/data/ocr"
printf 'a sign that says "open"\na sign that says "exit"\n' > "$WORK/data/ocr/test.txt"
"$BIN/dopd-eval" --dataset ocr --data_root "$WORK/data" --checkpoint_path "$WORK/run" --num_inference_steps 2 \
  --resolution 64 --batch_size 2 --max_sequence_length 16 --output_dir "$WORK/eval" --no_progress > "$WORK/eval.log" 2>&1 \
  || { cat "$WORK/eval.log"; exit 1; }
test -f "$WORK/eval/summary.json"

echo "[wheel] dopd-export (peft) with a model card, dry-run push"
"$BIN/dopd-export" "$WORK/run" --format peft --out "$WORK/export" --num_steps 2 --push_to_hub me/tiny --dry_run \
  > "$WORK/export.log" 2>&1 || { cat "$WORK/export.log"; exit 1; }
grep -q "^base_model: " "$WORK/export/README.md"
echo "[wheel] ok: the wheel installs and its commands run outside the repo"
