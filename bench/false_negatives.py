"""How often ITM's in-batch negatives are true of their image, on the
built-in data (a diagnostic for issue 12).

The built-in captions follow a small grammar (src/data/synthetic.rs), and
each scene's first caption is its full description, so the truth of any
caption for any scene can be decided: every object a caption mentions
exists in the scene as a distinct object with the stated size, color,
shape and place, the stated background is the scene's, a stated count
("a picture of two shapes: ...") is the scene's object count, and a
stated relation holds as the generator defines it. A caption that is true
of an image but comes from another pair is a *false negative* if it is
used as that image's negative, whatever vlmatch's positive rule says
(identical captions and images are caught; partial descriptions are not).

Reports, over random training batches of the dumped data:
- the share of (image i, text j) pairs, j not a positive of i under
  data.positives, whose text is true of image i;
- with a checkpoint (a vlmatch run directory, loaded into the reference
  model): the share of ALBEF hard negatives (text drawn for each image
  from softmax of the ITC similarities, positives masked) that are true of
  their image; and what hard_negative's `similarity_guard` would do there:
  the share of candidates it excludes (ITC at least as similar as the
  image's own caption) and of hard-negative draws (softmax mass) it
  changes, how many of those are true of the image, and the
  share of images it leaves without a negative.

Usage:
  python bench/false_negatives.py --train DUMP/train [--run RUN_DIR] [--batches 50]
"""

import argparse
import json
import os
import random
import re
import sys
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import Model, batch_positives, hard_negatives, load_file  # noqa: E402
from reference_train import Split, padded, read_jsonl  # noqa: E402

NOUN = r"a (?:(small|large) )?(red|green|blue|yellow|purple|orange) (circle|square|triangle|diamond)"
PLACE = r"in the center|on the (?:left|right) side|at the (?:top|bottom)|in the (?:top|bottom) (?:left|right) corner"
COLS, ROWS = ["left", "center", "right"], ["top", "middle", "bottom"]
RELATIONS = ["to the left of", "to the right of", "above", "below"]


def place_of(text):
    if text == "in the center":
        return (1, 1)
    m = re.fullmatch(r"on the (left|right) side", text)
    if m:
        return (COLS.index(m[1]), 1)
    m = re.fullmatch(r"at the (top|bottom)", text)
    if m:
        return (1, ROWS.index(m[1]))
    m = re.fullmatch(r"in the (top|bottom) (left|right) corner", text)
    return (COLS.index(m[2]), ROWS.index(m[1]))


def item(text):
    """`noun [place]` -> dict(size, color, shape, place) (None: not stated)."""
    m = re.fullmatch(f"({NOUN})(?: ({PLACE}))?", text)
    if not m:
        raise ValueError(f"not a noun phrase: {text!r}")
    return {"size": m[2], "color": m[3], "shape": m[4], "place": place_of(m[5]) if m[5] else None}


def split_list(text):
    parts = text.split(", ")
    last = parts.pop().split(" and ")
    return parts + last


def parse(caption):
    """A caption -> (items, background, count, relation)."""
    m = re.fullmatch(r"a picture of (one|two|three) shapes: (.*)", caption)
    if m:
        return [item(t) for t in split_list(m[2])], None, ["one", "two", "three"].index(m[1]) + 1, None
    for rel in RELATIONS:
        m = re.fullmatch(f"({NOUN}) {rel} ({NOUN})", caption)
        if m:
            return [item(m[1]), item(m[5])], None, None, rel
    m = re.fullmatch(r"(.*) on a (gray|black|white) background", caption)
    if m:
        return [item(t) for t in split_list(m[1])], m[2], None, None
    return [item(caption)], None, None, None


def relation(a, b):
    """src/data/synthetic.rs `Scene::relation`."""
    (ac, ar), (bc, br) = a["place"], b["place"]
    if ac < bc:
        return "to the left of"
    if ac > bc:
        return "to the right of"
    if ar < br:
        return "above"
    if ar > br:
        return "below"
    return None


def fits(mention, obj):
    return all(mention[k] is None or mention[k] == obj[k] for k in ("size", "color", "shape", "place"))


def true_of(caption, scene):
    items, bg, count, rel = parse(caption)
    objects, scene_bg = scene
    if bg is not None and bg != scene_bg:
        return False
    if count is not None and count != len(objects):
        return False

    def assign(k, used):
        if k == len(items):
            if rel is None:
                return True
            return relation(objects[used[0]], objects[used[1]]) == rel
        return any(fits(items[k], o) and assign(k + 1, used + [n])
                   for n, o in enumerate(objects) if n not in used)

    return assign(0, [])


def scenes(split):
    """Image index -> (objects, background), from each image's first
    caption (the full description)."""
    out = {}
    for p in split.pairs:
        if p["image_index"] not in out:
            items, bg, _, _ = parse(p["caption"])
            assert bg is not None and all(o["size"] and o["place"] for o in items), p
            out[p["image_index"]] = (items, bg)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--run", help="a vlmatch run directory: its config and newest checkpoint")
    ap.add_argument("--config", help="merged config (default: the run's)")
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--positives", choices=["identical", "image_id"], help="default: the config's data.positives")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    import tomllib

    cfg_path = args.config or (args.run and os.path.join(args.run, "config.toml"))
    if cfg_path is None:
        raise SystemExit("--run or --config is needed")
    with open(cfg_path, "rb") as f:
        cfg = tomllib.load(f)
    train = Split(args.train, cfg)
    scene = scenes(train)
    for p in train.pairs:  # the grammar covers every caption, and every caption is true of its scene
        assert true_of(p["caption"], scene[p["image_index"]]), p
    rule = args.positives or cfg.get("data", {}).get("positives", "identical")
    model = None
    if args.run:
        ckpt = os.path.join(args.run, "checkpoints")
        with open(os.path.join(ckpt, "latest")) as f:
            tensors = load_file(os.path.join(ckpt, os.path.basename(f.read().strip())))
        model = Model(cfg, {"vocab_size": train.meta["vocab_size"]})
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        model.eval()
        step = int(tensors["state.step"].item())
    rng = random.Random(args.seed)
    negatives = true_negatives = 0
    drawn = drawn_true = 0
    batches_with_false = 0
    guard_candidates = guard_excluded = guard_excluded_true = guard_rows_empty = 0
    guard_mass = 0.0
    for _ in range(args.batches):
        batch = rng.sample(train.pairs, args.batch_size)
        images = train.pixels(torch.tensor([p["image_index"] for p in batch]))
        ids, mask = padded([p["ids"] for p in batch], train.meta["special"]["pad"])
        positives = batch_positives(images, ids, torch.tensor([p["image_id"] for p in batch]), rule)
        truth = torch.tensor([[true_of(q["caption"], scene[p["image_index"]]) for q in batch] for p in batch])
        neg = ~positives
        negatives += neg.sum().item()
        true_negatives += (neg & truth).sum().item()
        batches_with_false += bool((neg & truth).any())
        if model is not None:
            with torch.no_grad():
                ie = F.normalize(model.vision_proj(model.vision_encoder(images)[:, 0]), dim=-1)
                te = F.normalize(model.text_proj(model.text_encoder(ids, mask)[:, 0]), dim=-1)
                sim = ie @ te.t() / model.temp.clamp(0.001, 0.5)
                t_for_i = hard_negatives(sim, positives)
                # What hard_negative's similarity_guard would exclude: a
                # candidate at least as similar as the row's own pair.
                guarded = (sim >= sim.diagonal()[:, None]) & neg
                w = (F.softmax(sim, 1) + 1e-5).masked_fill(positives, 0.0)
                guard_mass += ((w * guarded).sum(1) / w.sum(1)).sum().item()
            guard_candidates += neg.sum().item()
            guard_excluded += guarded.sum().item()
            guard_excluded_true += (guarded & truth).sum().item()
            guard_rows_empty += (neg & ~guarded).sum(1).eq(0).sum().item()
            ok = t_for_i >= 0
            rows = torch.arange(len(batch))[ok]
            drawn += ok.sum().item()
            drawn_true += truth[rows, t_for_i[ok]].sum().item()
    out = {
        "positives_rule": rule,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "negative_pairs": negatives,
        "true_of_the_image": true_negatives / max(negatives, 1),
        "batches_with_a_false_negative": batches_with_false / args.batches,
    }
    if model is not None:
        out.update(run=args.run, step=step, hard_negatives_drawn=drawn,
                   hard_negatives_true_of_the_image=drawn_true / max(drawn, 1),
                   similarity_guard_excludes=guard_excluded / max(guard_candidates, 1),
                   similarity_guard_draws_changed=guard_mass / (args.batches * args.batch_size),
                   similarity_guard_excluded_true_of_the_image=guard_excluded_true / max(guard_excluded, 1),
                   similarity_guard_rows_left_without_negative=guard_rows_empty / (args.batches * args.batch_size))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
