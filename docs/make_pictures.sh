#!/usr/bin/env bash
# The README's pictures of negative prompts, img2img, inpainting, LoRA and ControlNet: each is what the `ldm sample`
# command above it in the README writes, run on the pipeline's outputs (`dvc repro`, then
# `dvc repro finetune_lora train_controlnet`). Run from the repository root with the venv active.
set -euo pipefail
out=docs/images
mkdir -p "$out"

# Inputs: the top-right cell of the 3x3 grid as an inpainting mask (white = regenerate), and the Canny edge map
# of a large square at the bottom left, as the ControlNet was trained on.
python - <<'PY'
import random
from PIL import Image
from ldm.data.control_maps import control_map
from ldm.data.shapes import Scene, ShapeObject, render
from torchvision.transforms.functional import to_pil_image

mask = Image.new("L", (32, 32), 0)
mask.paste(255, (21, 0, 32, 11))
mask.save("docs/images/mask-top-right.png")
square = render(Scene((ShapeObject("square", "black", "large", "bottom left"),), "white"), 32, random.Random(0))
to_pil_image(control_map("canny", square)).save("docs/images/edges-bottom-left.png")
PY

red=("a large red circle at the top left on a white background" "a small red square in the center on a white background"
     "a large red triangle at the bottom right on a white background" "a small red diamond at the top right on a white background")
ldm sample "${red[@]}" --guidance 7 --seed 0 -o "$out/negative-off.png"
ldm sample "${red[@]}" --guidance 7 --seed 0 --negative-prompt red -o "$out/negative-on.png"

recolour=("a large blue circle at the top left on a white background" "a large green circle at the top left on a white background"
          "a large purple circle at the top left on a white background" "a large black circle at the top left on a white background")
cp samples/000.png "$out/img2img-input.png"   # the sample stage's red circle (samples/ is a DVC output, not in git)
ldm sample "${recolour[@]}" --init-image samples/000.png --strength 0.6 --seed 0 -o "$out/img2img.png"

added=("a large red circle at the top left and a small blue square at the top right on a white background"
       "a large red circle at the top left and a large green triangle at the top right on a white background"
       "a large red circle at the top left and a small yellow diamond at the top right on a white background"
       "a large red circle at the top left and a large black circle at the top right on a white background")
ldm sample "${added[@]}" --init-image samples/000.png --mask "$out/mask-top-right.png" --seed 0 -o "$out/inpaint.png"

hexagons=("a large red hexagon at the top left on a white background" "a small blue hexagon in the center on a white background"
          "a large green hexagon at the bottom right on a white background" "a small purple hexagon at the top right on a white background")
ldm sample "${hexagons[@]}" --seed 0 -o "$out/lora-off.png"
ldm sample "${hexagons[@]}" --seed 0 --lora models/lora -o "$out/lora-on.png"

unplaced=("a large red circle on a white background" "a small blue square on a white background"
          "a large green triangle on a white background" "a large yellow diamond on a white background")
ldm sample "${unplaced[@]}" --seed 0 -o "$out/controlnet-off.png"
ldm sample "${unplaced[@]}" --seed 0 --control-image "$out/edges-bottom-left.png" -o "$out/controlnet-on.png"
rm -f "$out"/*-0[0-9][0-9].png   # the single images; the README shows the grids
