"""The PIL/torchvision side of `vlmatch bench`'s augmented-loader rows.

ALBEF's pretraining transform on the JPEG files `vlmatch bench` wrote:
torchvision's `RandomResizedCrop(size, scale, ratio, BICUBIC)` and
`RandomHorizontalFlip()` on a PIL image, ALBEF's `RandomAugment(N, M)`
(OpenCV on the NumPy array, `dataset/randaugment.py`), `ToTensor()` and
`Normalize(mean, std)`, in a `torch.utils.data.DataLoader` with
`num_workers=1` and one torch thread in the worker and here; captions
tokenised by `BertTokenizerFast` in the collate function, as the loader
row of bench/reference.py does. Each variant ("plain": crop, flip,
normalise; "randaug": with RandomAugment) is timed as `vlmatch bench`
times its loader: one pass of warm-up, then `repeats` passes, median
seconds per batch.

Then the same ops one image at a time in this process, each stage timed
(decode, crop/resize, flip + RandomAugment, to-tensor + normalise,
collate) for the per-stage shares.

Reads DIR/loader-spec.json, writes DIR/loader-reference.json. Needs
torchvision and opencv-python besides torch and Pillow: `vlmatch bench`
runs it with the golden-augment venv's Python (tests/golden/make_augment.py
says how it is made) when that exists. The RandAugment ops are those of
tests/golden/make_augment.py, which the golden fixtures check, except that
sharpness casts without clipping as ALBEF does.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden"))


def albef_ops():
    import make_augment as m

    return {
        "identity": lambda img, v: img,
        "autocontrast": lambda img, v: m.albef_autocontrast(img),
        "equalize": lambda img, v: m.albef_equalize(img),
        "brightness": m.albef_brightness,
        "sharpness": lambda img, v: m.albef_sharpness(img, v, check_range=False),
        "shear_x": m.albef_shear_x,
        "shear_y": m.albef_shear_y,
        "translate_x": m.albef_translate_x,
        "translate_y": m.albef_translate_y,
        "rotate": m.albef_rotate,
    }, m.level_args


class RandomAugment:
    """ALBEF's RandomAugment(N, M, isPIL=True): N ops drawn with
    replacement, each applied with probability 0.5, signed ops negated
    with probability 0.5; returns the NumPy array."""

    def __init__(self, n, m, names):
        self.ops, level_args = albef_ops()
        self.n, self.names = n, names
        self.args = {k: (level_args(k, m) if k not in ("identity", "autocontrast", "equalize") else 0.0)
                     for k in names}

    def __call__(self, img):
        img = np.array(img)
        for name in np.random.choice(self.names, self.n):
            if np.random.random() < 0.5:
                continue
            v = self.args[name]
            if name in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate") and np.random.random() < 0.5:
                v = -v
            img = self.ops[name](img, v)
        return img


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    d = ap.parse_args().dir
    with open(os.path.join(d, "loader-spec.json")) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    from PIL import Image
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode
    from transformers import BertTokenizerFast

    root = spec["root"]
    items = spec["items"]
    size = spec["size"]
    tok = BertTokenizerFast(vocab_file=spec["vocab"], do_lower_case=True)
    max_len = spec["max_len"]
    crop = transforms.RandomResizedCrop(size, scale=tuple(spec["crop_scale"]), ratio=tuple(spec["crop_ratio"]),
                                        interpolation=InterpolationMode.BICUBIC)
    flip = transforms.RandomHorizontalFlip(spec["flip"])
    to_tensor = transforms.ToTensor()
    normalize = transforms.Normalize(spec["mean"], spec["std"])

    def load(i):
        return Image.open(os.path.join(root, items[i]["image"])).convert("RGB")

    def collate(batch):
        images = torch.stack([x for x, _ in batch])
        t = tok([c for _, c in batch], padding="longest", truncation=True, max_length=max_len,
                return_tensors="pt")
        return images, t["input_ids"], t["attention_mask"]

    def worker_init(_):
        torch.set_num_threads(1)

    result = {"torch": torch.__version__, "variants": {}}
    import PIL
    import torchvision
    result["pillow"] = PIL.__version__
    result["torchvision"] = torchvision.__version__
    for variant in spec["variants"]:
        name, n = variant["name"], variant["randaug_n"]
        steps = [crop, flip]
        if n > 0:
            steps.append(RandomAugment(n, variant["randaug_m"], variant["randaug_ops"]))
        transform = transforms.Compose(steps + [to_tensor, normalize])

        class Images(torch.utils.data.Dataset):
            def __len__(self):
                return len(items)

            def __getitem__(self, i):
                return transform(load(i)), items[i]["caption"]

        b = spec["batch_size"]
        loader = torch.utils.data.DataLoader(
            Images(), batch_size=b, shuffle=True, drop_last=True, num_workers=1,
            collate_fn=collate, persistent_workers=True, worker_init_fn=worker_init,
        )
        per_pass = len(items) // b

        def passes():
            while True:
                yield from loader

        it = passes()
        for _ in range(per_pass):
            next(it)
        blocks = []
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            for _ in range(per_pass):
                next(it)
            blocks.append((time.perf_counter() - t) / per_pass)
        s = statistics.median(blocks)
        del it, loader

        # The stages, one image at a time here, after one warm-up pass.
        randaug = steps[2] if n > 0 else None
        stages = dict.fromkeys(["decode", "crop_resize", "augment", "normalize", "collate"], 0.0)
        for timed in (False, True):
            for first in range(0, per_pass * b, b):
                out = []
                for i in range(first, first + b):
                    t0 = time.perf_counter()
                    img = load(i)
                    img.load()
                    t1 = time.perf_counter()
                    img = crop(img)
                    t2 = time.perf_counter()
                    img = flip(img)
                    if randaug is not None:
                        img = randaug(img)
                    t3 = time.perf_counter()
                    x = normalize(to_tensor(img))
                    t4 = time.perf_counter()
                    out.append((x, items[i]["caption"]))
                    if timed:
                        for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                            stages[k] += dt
                t5 = time.perf_counter()
                collate(out)
                if timed:
                    stages["collate"] += time.perf_counter() - t5
        images = per_pass * b
        result["variants"][name] = {
            "images_per_s": b / s,
            "batch_size": b,
            "workers": 1,
            "stage_s_per_image": {k: v / images for k, v in stages.items()},
        }
    with open(os.path.join(d, "loader-reference.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
