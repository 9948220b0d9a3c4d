#!/usr/bin/env bash
# The whole pipeline on the built-in toy data, on a CPU, in about 25 minutes on 2 cores, after set-up:
#   install → toy shards → a small CLIP trained on them (the demo's text encoder and evaluator; nothing is
#   downloaded) → the `tiny` U-Net trained with `accelerate launch pipeline/train.py` → sample grids at several
#   guidance scales → the evaluation job (with bits/dim of held-out images); then latent diffusion beside it: 64 px toy shards → a small VAE trained on
#   them → latent shards (precompute.py latents) → the same U-Net trained on 16×16×4 latents → samples and evaluation
#   decoded through the VAE → OUT/report.md (both runs side by side).
# Idempotent: a second run reuses what exists (shards, CLIP, VAE, latents, finished training, generated images).
# Knobs (environment): OUT (runs/quickstart), STEPS (1500), CLIP_STEPS (300), COUNT (4096), EVAL_IMAGES (256),
# LATENT=0 to skip the latent run, VAE_STEPS (400), LATENT_STEPS (3000), NLL_IMAGES (32; 0 = no likelihood),
# SKIP_SETUP=1 to use the existing .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
STEPS=${STEPS:-1500}
CLIP_STEPS=${CLIP_STEPS:-300}
COUNT=${COUNT:-4096}
EVAL_IMAGES=${EVAL_IMAGES:-256}
LATENT=${LATENT:-1}
VAE_STEPS=${VAE_STEPS:-400}
LATENT_STEPS=${LATENT_STEPS:-3000}
NLL_IMAGES=${NLL_IMAGES:-32}
CLIP_CFG=launch/configs/clip/toy-clip.json

[ "${SKIP_SETUP:-0}" = 1 ] || bash launch/setup.sh
PY=.venv/bin/python
mkdir -p "$OUT"
say() { echo "== $(date +%H:%M:%S) $*"; }

# toy_data TRAIN HELD_OUT PX: COUNT toy samples in 8 shards and 512 held-out ones (seed 1), unless written; prints the
# training shards' brace pattern.
toy_data() {
  local train=$1 held_out=$2 px=$3
  if [ ! -f "$train/manifest.json" ]; then
    say "writing $COUNT toy samples ($px px) and 512 held-out ones" >&2
    $PY -m data.write_shards toy --out "$train" --count "$COUNT" --resolution "$px" --max-samples $(( (COUNT + 7) / 8 )) >&2
    $PY -m data.write_shards toy --out "$held_out" --count 512 --resolution "$px" --seed 1 --max-samples 512 >&2
  fi
  $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['shards_pattern'])" "$train/manifest.json"
}
SHARDS=$(toy_data "$OUT/toy_shards" "$OUT/held_out" 32)

if [ ! -f "$OUT/toy_clip.safetensors" ]; then
  say "training the toy CLIP ($CLIP_STEPS steps)"
  $PY pipeline/train_clip.py --shards "$SHARDS" --out "$OUT/toy_clip.safetensors" --steps "$CLIP_STEPS"
fi

# train_unet CONFIG RUN STEPS [overrides...]: accelerate launch pipeline/train.py, resuming what exists (nothing to
# do when RUN/model is already at STEPS).
train_unet() {
  local config=$1 run=$2 steps=$3; shift 3
  if [ -f "$run/model/config.json" ] && \
     [ "$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$run/model/config.json")" = "$steps" ]; then
    say "$run is trained to step $steps already"
    return
  fi
  say "training the tiny U-Net ($config) to step $steps"
  local resume=()
  if ls "$run"/checkpoints/step_*/train_state.json >/dev/null 2>&1; then resume=(--resume latest); fi
  .venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    --num_cpu_threads_per_process "$(nproc)" \
    pipeline/train.py --config "$config" --output-dir "$run" --max-steps "$steps" "${resume[@]}" "$@" \
    logging.sample_every=500
}

# sample_and_evaluate MODEL SAMPLES EVAL HELD_OUT [guidance options...]: the prompt grid and the evaluation job, each
# redone only when the model is newer than its output (an older evaluation's images are then removed, not reused).
# DPM-Solver++(2M) in 15 steps: the same scores as DDIM in 25 at 0.6 of the time, and the ODE likelihood at rtol 1e-3:
# within 0.004 bits/dim of 1e-4 (a tenth of its standard error) at 0.6 of the network calls (benchmarks/README.md,
# "Session 40"); the time saved pays for three quarters of the latent U-Net's longer training (140 of 190 s).
sample_and_evaluate() {
  local model=$1 samples=$2 eval=$3 held_out=$4; shift 4
  if [ ! "$samples/metadata.jsonl" -nt "$model/config.json" ]; then
    say "sampling a grid of prompts at guidance 1, 3 and 5 from $model"
    $PY pipeline/sample.py --model "$model" --out "$samples" --guidance 1 3 5 --num-images 2 \
      --sampler dpmpp_2m --steps 15 "$@" \
      --prompt "a large red circle in the center on a white background" \
      --prompt "a large blue square in the center on a beige background" \
      --prompt "a small yellow triangle at the top left on a light blue background" \
      --prompt "a large green diamond at the bottom right on a light gray background"
  fi
  if [ ! "$eval/results.json" -nt "$model/config.json" ]; then
    if [ -f "$eval/results.json" ]; then rm -rf "$eval"; fi  # made by an older model
    say "evaluating $EVAL_IMAGES held-out captions per guidance scale with $model"
    $PY pipeline/evaluate.py run --model "$model" --captions "$held_out" --ref "$held_out" "$@" \
      --num-images "$EVAL_IMAGES" --guidance 1 2 3 5 --sampler dpmpp_2m --steps 15 --fd-features clip \
      --clip-model "openclip:toy-clip:$OUT/toy_clip.safetensors" --clip-config "$CLIP_CFG" --out "$eval" \
      --likelihood "$NLL_IMAGES" --elbo-timesteps 100 --rtol 1e-3 --atol 1e-3
  fi
}

train_unet launch/configs/demo.yaml "$OUT/run" "$STEPS" "data.shards=$SHARDS" \
  "text_encoder.pretrained=$OUT/toy_clip.safetensors"
sample_and_evaluate "$OUT/run/model" "$OUT/samples" "$OUT/eval" "$OUT/held_out/00000.tar"

LATENT_REPORT=()
if [ "$LATENT" = 1 ]; then
  SHARDS64=$(toy_data "$OUT/toy64" "$OUT/held_out64" 64)
  if [ ! -f "$OUT/toy_vae/config.json" ]; then
    say "training the toy VAE ($VAE_STEPS steps)"
    # KL weight 1e-2, not SD's tiny one: a smoother latent space, the same PSNR on these flat images, and the U-Net
    # follows its prompts better in it (benchmarks/README.md, "The latent demo under guidance")
    $PY pipeline/train_vae.py --shards "$SHARDS64" --out "$OUT/toy_vae" --steps "$VAE_STEPS" --kl 1e-2
  fi
  LATENT_ARGS=("autoencoder.path=$OUT/toy_vae" "text_encoder.pretrained=$OUT/toy_clip.safetensors")
  if ! grep -q '"complete": true' "$OUT/toy64_latents/manifest.json" 2>/dev/null; then
    say "encoding the 64 px shards once into latent shards"
    $PY pipeline/precompute.py latents --config launch/configs/demo_latent.yaml --out "$OUT/toy64_latents" \
      "data.shards=$SHARDS64" "${LATENT_ARGS[@]}"
  fi
  train_unet launch/configs/demo_latent.yaml "$OUT/latent_run" "$LATENT_STEPS" "${LATENT_ARGS[@]}" \
    "data.shards=$OUT/toy64_latents"
  # guidance only at noise levels 0.28 < σ ≤ 2.9 (Kynkäänniemi et al. 2024's σ numbers for EDM2-S, not tuned here)
  # and rescaled (Lin et al. 2024): plain guidance in latent space overshoots the colours (reds turn magenta as w
  # grows; benchmarks/README.md)
  sample_and_evaluate "$OUT/latent_run/model" "$OUT/latent_samples" "$OUT/latent_eval" "$OUT/held_out64/00000.tar" \
    --guidance-interval 0.28 2.9 --guidance-rescale 0.7
  PSNR=$($PY -c "import json,sys; print(round(json.load(open(sys.argv[1]))['psnr_db'], 1))" "$OUT/toy_vae/training.json")
  LATENT_REPORT=(--latent-run "$OUT/latent_run" --latent-samples "$OUT/latent_samples" --latent-eval "$OUT/latent_eval"
    --latent-note "The latent run: 64 px toy images, a VAE trained here for $VAE_STEPS steps (pipeline/train_vae.py; \
reconstruction PSNR $PSNR dB, 16×16×4 latents), the latents precomputed once (pipeline/precompute.py latents), the \
same tiny U-Net and text tower, the pixel run's recipe at twice its learning rate for $LATENT_STEPS steps \
(launch/configs/demo_latent.yaml). Its images have twice the pixel run's resolution. Its guidance acts only at \
noise levels 0.28 < σ ≤ 2.9 and is rescaled (φ = 0.7).")
fi

$PY pipeline/report.py --run "$OUT/run" --samples "$OUT/samples" --eval "$OUT/eval" "${LATENT_REPORT[@]}" --out "$OUT/report.md"
say "done: $OUT/report.md"
