"""Regenerate tests/fixtures/augment/: ALBEF's RandAugment ops and
torchvision's RandomResizedCrop and horizontal flip, each applied with fixed
arguments (no randomness) to two small committed test images.

The RandAugment ops below follow ALBEF's `dataset/randaugment.py`
(salesforce/ALBEF), which computes them with OpenCV and NumPy on an RGB
uint8 array: the same OpenCV calls, the same float types and casts, the same
fill colour (128, 128, 128) and the same magnitude mapping, written out here
one op at a time. The crop and flip are torchvision's own functions on PIL
images (`F.resized_crop(..., BICUBIC)`, `F.hflip`), as ALBEF's transform
applies them.

One deliberate difference, checked in tests/augment.rs: ALBEF's sharpness
casts its float result to uint8 without clipping, so a value above 255
wraps around (NumPy's cast of out-of-range floats); vlmatch clips, as
Pillow's ImageEnhance.Sharpness (which ALBEF says it reproduces) does. The
test images stay in range, where the two agree.

Environment (never the torch venv): a venv of its own with
    python3 -m venv ~/.cache/vlmatch/golden-augment
    ~/.cache/vlmatch/golden-augment/bin/pip install opencv-python-headless numpy pillow torchvision
then
    ~/.cache/vlmatch/golden-augment/bin/python tests/golden/make_augment.py
The committed fixtures record the versions used in manifest.json. (They
were made with torchvision installed `--no-deps` and torch read, never
modified, from the torch 2.11.0 venv through a `.pth` file; torchvision's
crop and flip on PIL images call only Pillow.)
"""
import json
import math
import pathlib

import cv2
import numpy as np
import PIL
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "augment"
FILL = (128, 128, 128)


# ---- ALBEF's ops, as dataset/randaugment.py computes them ----------------

def albef_autocontrast(img):
    """Per channel: stretch [min, max] to [0, 255] (no cut-off)."""
    def channel(ch):
        lo, hi = ch.min(), ch.max()
        if hi <= lo:
            lut = np.arange(256)
        else:
            scale = 255 / (hi - lo)
            lut = np.arange(256) * scale - lo * scale
            lut[lut < 0] = 0
            lut[lut > 255] = 255
        return lut.clip(0, 255).astype(np.uint8)[ch]
    return cv2.merge([channel(c) for c in cv2.split(img)])


def albef_equalize(img):
    """Pillow's equalisation, from OpenCV's histogram."""
    def channel(ch):
        hist = cv2.calcHist([ch], [0], None, [256], [0, 256])
        present = hist[hist != 0].reshape(-1)
        step = np.sum(present[:-1]) // 255
        if step == 0:
            return ch
        shifted = np.empty_like(hist)
        shifted[0] = step // 2
        shifted[1:] = hist[:-1]
        lut = (np.cumsum(shifted) // step).clip(0, 255).astype(np.uint8)
        return lut[ch]
    return cv2.merge([channel(c) for c in cv2.split(img)])


def albef_brightness(img, factor):
    lut = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return lut[img]


def albef_sharpness(img, factor, check_range=True):
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1][1] = 5
    kernel /= 13
    smooth = cv2.filter2D(img, -1, kernel)
    if factor == 0.0:
        return smooth
    if factor == 1.0:
        return img
    out = img.astype(np.float32)
    inner = smooth.astype(np.float32)[1:-1, 1:-1, :]
    out[1:-1, 1:-1, :] = inner + factor * (out[1:-1, 1:-1, :] - inner)
    # ALBEF casts here without clipping; the fixtures' images stay in range
    # (bench/reference_loader.py, on arbitrary photos, casts as ALBEF does).
    if check_range:
        assert out.min() >= 0 and out.max() < 256, "sharpness left [0, 255]"
    return out.astype(np.uint8)


def albef_warp(img, matrix, fill=FILL):
    h, w = img.shape[:2]
    return cv2.warpAffine(img, matrix, (w, h), borderValue=fill,
                          flags=cv2.INTER_LINEAR).astype(np.uint8)


def albef_shear_x(img, factor):
    return albef_warp(img, np.float32([[1, factor, 0], [0, 1, 0]]))


def albef_shear_y(img, factor):
    return albef_warp(img, np.float32([[1, 0, 0], [factor, 1, 0]]))


def albef_translate_x(img, offset):
    return albef_warp(img, np.float32([[1, 0, -offset], [0, 1, 0]]))


def albef_translate_y(img, offset):
    return albef_warp(img, np.float32([[1, 0, 0], [0, 1, -offset]]))


def albef_rotate(img, degrees):
    h, w = img.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1)
    return cv2.warpAffine(img, matrix, (w, h), borderValue=FILL)


def level_args(name, m):
    """ALBEF's magnitude mapping (MAX_LEVEL 10, translate_const 10), with the
    sign its coin would pick given explicitly by the caller."""
    if name in ("brightness", "sharpness"):
        return (m / 10) * 1.8 + 0.1
    if name in ("shear_x", "shear_y"):
        return (m / 10) * 0.3
    if name in ("translate_x", "translate_y"):
        return (m / 10) * 10.0
    if name == "rotate":
        return (m / 10) * 30
    raise ValueError(name)


# ---- test images ---------------------------------------------------------

def smooth_image(size, seed):
    """A smooth picture with some edges: gradients, a soft disc, a square;
    values kept inside [16, 235] so that autocontrast has work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    phase = rng.uniform(0, 2 * math.pi, 3)
    r = 0.5 + 0.35 * np.sin(2.1 * math.pi * x + phase[0]) * np.cos(1.3 * math.pi * y)
    g = 0.25 + 0.5 * y + 0.1 * np.sin(3.0 * math.pi * (x + y) + phase[1])
    cx, cy = rng.uniform(0.3, 0.7, 2)
    disc = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.03)
    b = 0.2 + 0.6 * disc + 0.1 * np.cos(2.0 * math.pi * x + phase[2])
    img = np.stack([r, g, b], axis=-1)
    s0, s1 = size // 5, size // 5 + size // 4
    img[s0:s1, s0:s1, :] = [0.85, 0.2, 0.3]
    return (16 + img.clip(0, 1) * 219).round().astype(np.uint8)


def save(name, arr):
    Image.fromarray(arr).save(OUT / name, optimize=True)
    return name


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    a = smooth_image(32, 1)
    b = smooth_image(48, 2)
    inputs = {"a": save("input-a.png", a), "b": save("input-b.png", b)}
    cases = []

    def case(name, source, op, args, out, **extra):
        cases.append({"name": name, "input": inputs[source], "op": op, "args": args,
                      "output": save(f"{name}.png", out), **extra})

    pil_a = Image.fromarray(a)
    case("hflip", "a", "hflip", {}, np.array(TF.hflip(pil_a)), tolerance="exact")
    case("autocontrast", "a", "autocontrast", {}, albef_autocontrast(a), tolerance="color")
    case("equalize", "a", "equalize", {}, albef_equalize(a), tolerance="color")
    for m in (7, 10, 2):
        f = level_args("brightness", m)
        case(f"brightness-m{m}", "a", "brightness", {"factor": f}, albef_brightness(a, f),
             tolerance="color")
    for m in (7, 0):
        f = level_args("sharpness", m)
        case(f"sharpness-m{m}", "a", "sharpness", {"factor": f}, albef_sharpness(a, f),
             tolerance="color")
    # Factor 0 (not reachable from a magnitude) is the smoothed image itself,
    # its border mirrored as OpenCV's filter2D mirrors it.
    case("sharpness-f0", "a", "sharpness", {"factor": 0.0}, albef_sharpness(a, 0.0),
         tolerance="color")
    ops = {"shear_x": albef_shear_x, "shear_y": albef_shear_y,
           "translate_x": albef_translate_x, "translate_y": albef_translate_y,
           "rotate": albef_rotate}
    for op, fn in ops.items():
        for sign in (1, -1):
            v = sign * level_args(op, 7)
            case(f"{op}-{'pos' if sign > 0 else 'neg'}", "a", op, {"value": v}, fn(a, v),
                 tolerance="geometric")

    pil_b = Image.fromarray(b)
    # (top, left, height, width) -> 32 x 32, as RandomResizedCrop's
    # get_params would return them: a downscaling crop, the whole image, an
    # upscaling one, and a tall one.
    for i, (top, left, h, w) in enumerate([(5, 3, 30, 40), (0, 0, 48, 48),
                                           (10, 12, 20, 16), (2, 20, 44, 21)]):
        out = TF.resized_crop(pil_b, top, left, h, w, [32, 32],
                              interpolation=InterpolationMode.BICUBIC)
        case(f"resized-crop-{i}", "b", "resized_crop",
             {"top": top, "left": left, "height": h, "width": w, "size": 32},
             np.array(out), tolerance="geometric")

    manifest = {
        "versions": {"opencv": cv2.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__, "torchvision": torchvision.__version__},
        "cases": cases,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
