"""An independent PyTorch trainer for training-dynamics parity with vlmatch.

It trains bench/reference.py's model and objectives (the same classes that
`vlmatch bench` times) on the pairs that `vlmatch preview --all` dumped,
with everything that makes a training run its own:

- data: its own seeded shuffle of the training pairs (every epoch a fresh
  permutation, complete batches only, as vlmatch's loader), images read
  from the dumped PNGs and normalised with the config's data.mean/std,
  captions as the token ids vlmatch wrote (padded to the longest of the
  batch);
- initialisation: vlmatch's scheme (plugins/layers, core ContrastiveHead),
  not its draws: every linear, convolution and embedding weight normal(0,
  0.02), biases 0, LayerNorm 1/0, ViT [CLS] and position embeddings
  normal(0, 0.02), the MLM bias 0, temperature 0.07;
- positives: bench/reference.py's `batch_positives` (same image id, or
  identical token ids, or identical pixels, compared exactly; or image ids
  only under data.positives = "image_id");
- word swaps (`word_swap` sampler): real swaps, a port of
  plugins/word-swap (one word of a group replaced by another of its group,
  captions without one get none), drawn from this script's own generator
  and tokenised by a WordPiece tokenizer written here over the dumped
  vocab.txt, which is checked to reproduce vlmatch's ids for every dumped
  caption and matching negative;
- NegGen (`neggen` sampler): bench/reference_neggen.py, the same positions
  (NegGen's own POS tagging, dumped) masked and filled online by this model's
  generator, filtered by its ITM head; any other sampler plugin, or a key
  it does not emulate, stops the run with an error;
- optimisation: torch.optim.AdamW with vlmatch's groups (decay on tensors
  with two or more dimensions), linear warm-up then cosine decay to
  train.min_lr (src/optim.rs `lr_at`), clip_grad_norm_ at train.grad_clip;
- evaluation every eval.every steps on the dumped held-out split: the
  matching triples vlmatch's own held-out evaluation scores (share of
  triples where P(match | image, caption) > P(match | image, swapped), by
  ITM, and the same by ITC cosine), and ITC retrieval R@1/R@5.

Writes OUT/metrics.jsonl (every train.log_every steps, vlmatch's key names)
and OUT/eval.jsonl (vlmatch's layout: {"step", "retrieval", "matching"}).

`check-eval RUN --heldout D/heldout` scores a vlmatch run's newest
checkpoint with this evaluation, to compare with the run's own eval.jsonl.

Usage:
  vlmatch preview --all --out D/train
  vlmatch preview --all --split heldout --out D/heldout
  vlmatch config --config configs/baseline.toml --set train.steps=800 > cfg.toml
  python bench/reference_train.py --config cfg.toml --train D/train \\
      --heldout D/heldout --seed 1 --out OUT
"""

import argparse
import json
import math
import os
import random
import string
import sys
import time
import tomllib
import unicodedata
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import Model, Step, batch_positives, load_file, param_groups  # noqa: E402
import reference_neggen  # noqa: E402


# --------------------------------------------------------------------------
# Text: WordPiece over vlmatch's vocab.txt, and word swaps


class WordPiece:
    """BERT's basic tokenisation and greedy longest-match word pieces, as
    src/tokenizer.rs does them for a vocab.txt."""

    def __init__(self, path, lowercase, special):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        tokens = [t.rstrip("\r") for t in text.split("\n")]
        if text.endswith("\n"):
            tokens.pop()
        self.vocab = {t: i for i, t in enumerate(tokens)}  # a repeated token: its last id
        self.size = len(tokens)
        self.lowercase = lowercase
        self.sp = special

    def basic(self, text):
        if self.lowercase:
            text = text.lower()
        words, cur = [], ""
        for c in text:
            if c.isspace() or unicodedata.category(c) == "Cc":
                if cur:
                    words.append(cur)
                    cur = ""
            elif c in string.punctuation or not c.isalnum():
                if cur:
                    words.append(cur)
                    cur = ""
                words.append(c)
            else:
                cur += c
        if cur:
            words.append(cur)
        return words

    def pieces(self, word):
        if len(word) > 100:
            return [self.sp["unk"]]
        out, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                piece = ("##" if start > 0 else "") + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.sp["unk"]]
            out.append(found)
            start = end
        return out

    def encode(self, text, max_len):
        ids = [self.sp["cls"]]
        for w in self.basic(text):
            ids.extend(self.pieces(w))
        del ids[max(max_len - 1, 1):]
        return ids + [self.sp["sep"]]


class WordSwap:
    """plugins/word-swap's `WordSwap::swap`: one word (space-separated,
    trailing ASCII punctuation kept) that belongs to a group of two or more
    words is replaced by another word of its group."""

    def __init__(self, groups):
        self.groups = groups
        self.group_of = {}
        for g, words in enumerate(groups):
            for w in words:
                prev = self.group_of.setdefault(w.lower(), g)
                if prev != g:
                    raise SystemExit(f"word_swap groups: {w!r} is in two groups ({prev} and {g})")

    def swap(self, caption, draw):
        words = caption.split(" ")
        candidates = []
        for i, w in enumerate(words):
            core = w.rstrip(string.punctuation)
            g = self.group_of.get(core.lower())
            if g is not None and len(self.groups[g]) > 1:
                candidates.append((i, g, core))
        if not candidates:
            return None
        i, g, core = candidates[draw(len(candidates))]
        others = [w for w in self.groups[g] if w.lower() != core.lower()]
        replacement = others[draw(len(others))]
        out = list(words)
        out[i] = replacement + words[i][len(core):]
        return " ".join(out)


# --------------------------------------------------------------------------
# Data


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Split:
    """A `vlmatch preview` dump: images as uint8 [N, 3, S, S], pairs."""

    def __init__(self, d, cfg):
        from PIL import Image

        with open(os.path.join(d, "meta.json")) as f:
            self.meta = json.load(f)
        data = cfg["data"]
        for key in ("image_size", "max_len"):
            if self.meta[key] != data[key]:
                raise SystemExit(f"{d}: dumped with data.{key} = {self.meta[key]}, config has {data[key]}")
        self.pairs = read_jsonl(os.path.join(d, "pairs.jsonl"))
        s = self.meta["image_size"]
        images = []
        for i in range(self.meta["images"]):
            img = Image.open(os.path.join(d, f"{i:04}.png")).convert("RGB")
            if img.size != (s, s):
                raise SystemExit(f"{d}/{i:04}.png is {img.size}, expected {s}x{s}")
            images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(s, s, 3))
        self.images = torch.stack(images).permute(0, 3, 1, 2).contiguous()
        self.mean = torch.tensor(data["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(data["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.matching = None
        if os.path.exists(os.path.join(d, "matching.jsonl")):
            self.matching = read_jsonl(os.path.join(d, "matching.jsonl"))

    def pixels(self, index):
        """Normalised [K, 3, S, S] f32 of images `index` (as vlmatch: x / 255,
        minus mean, over std, in f32)."""
        x = self.images[index].float() / 255.0
        return (x - self.mean) / self.std


def padded(rows, pad):
    """Token-id lists to ids and mask [K, L], L the longest."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[k, : len(r)] = 1
    return ids, mask


class Stream:
    """Endless training batches: epoch e is a permutation of all pairs drawn
    from (seed, e); complete batches only."""

    def __init__(self, split, batch_size, seed):
        self.split, self.bs, self.seed = split, batch_size, seed
        self.per_epoch = len(split.pairs) // batch_size
        if self.per_epoch == 0:
            raise SystemExit(f"{len(split.pairs)} pairs, fewer than train.batch_size {batch_size}")
        self.epoch, self.order = None, None

    def batch(self, g):
        e = g // self.per_epoch
        if e != self.epoch:
            self.epoch = e
            self.order = list(range(len(self.split.pairs)))
            random.Random(f"reference-data:{self.seed}:{e}").shuffle(self.order)
        k = g % self.per_epoch
        return [self.split.pairs[i] for i in self.order[k * self.bs:(k + 1) * self.bs]]


# --------------------------------------------------------------------------
# Model set-up


def init_weights(model):
    """vlmatch's initialisation scheme (plugins/layers `hf_init`, the
    ContrastiveHead): every parameter is set here, fresh draws."""
    done = set()

    def normal(p):
        nn.init.normal_(p, 0.0, 0.02)
        done.add(id(p))

    def const(p, v):
        nn.init.constant_(p, v)
        done.add(id(p))

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                normal(mod.weight)
                if mod.bias is not None:
                    const(mod.bias, 0.0)
            elif isinstance(mod, nn.Embedding):
                normal(mod.weight)
            elif isinstance(mod, nn.LayerNorm):
                const(mod.weight, 1.0)
                const(mod.bias, 0.0)
        e = model.vision_encoder.embeddings
        normal(e.cls_token)
        normal(e.position_embeddings)
        if model.generator is not None:
            const(model.generator.cls.predictions.bias, 0.0)
        const(model.temp, 0.07)
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise SystemExit(f"reference: no initialisation for {missed}")


def check_supported(cfg):
    m, t = cfg["model"], cfg["train"]
    for role in ("image", "text", "fusion"):
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if m[role].get(key, 0.0) > 0:
                raise SystemExit(f"reference trainer: model.{role}.{key} > 0 (dropout) is not implemented")
    if t.get("accum_steps", 1) != 1:
        raise SystemExit("reference trainer: train.accum_steps != 1 is not implemented")
    if t.get("precision", "auto") not in ("auto", "fp32"):
        raise SystemExit("reference trainer: runs fp32 on the CPU only")


def lr_at(step, total, warmup, lr, min_lr):
    """src/optim.rs `lr_at`: linear warm-up to lr, then cosine to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------
# Held-out evaluation (src/eval.rs `held_out`)


@torch.no_grad()
def held_out(model, split, batch_size, pad, step):
    model.eval()
    fuse_p = lambda states, mask, image: F.softmax(  # noqa: E731
        model.itm_head(model.fuse(states, mask, image)[:, 0]).float(), 1)[:, 1]
    embed_i = lambda image: F.normalize(model.vision_proj(image[:, 0]), dim=-1)  # noqa: E731
    embed_t = lambda text: F.normalize(model.text_proj(text[:, 0]), dim=-1)  # noqa: E731
    itm_hits = itc_hits = 0.0
    triples = split.matching
    for a in range(0, len(triples), batch_size):
        chunk = triples[a:a + batch_size]
        image = model.vision_encoder(split.pixels(torch.tensor([t["image_index"] for t in chunk])))
        pi, pm = padded([t["caption_ids"] for t in chunk], pad)
        ni, nm = padded([t["negative_ids"] for t in chunk], pad)
        tp, tn = model.text_encoder(pi, pm), model.text_encoder(ni, nm)
        itm_hits += (fuse_p(tp, pm, image) > fuse_p(tn, nm, image)).sum().item()
        iv = embed_i(image)
        itc_hits += ((iv * embed_t(tp)).sum(1) > (iv * embed_t(tn)).sum(1)).sum().item()
    # ITC retrieval over every held-out image and caption.
    n_img = split.images.shape[0]
    img = torch.cat([embed_i(model.vision_encoder(split.pixels(torch.arange(a, min(a + batch_size, n_img)))))
                     for a in range(0, n_img, batch_size)])
    txt = []
    for a in range(0, len(split.pairs), batch_size):
        ids, mask = padded([p["ids"] for p in split.pairs[a:a + batch_size]], pad)
        txt.append(embed_t(model.text_encoder(ids, mask)))
    txt = torch.cat(txt)
    owner = torch.tensor([p["image_index"] for p in split.pairs])
    sims = img @ txt.t()
    k = min(5, n_img, len(split.pairs))
    hit_t = owner[sims.topk(k, 1).indices] == torch.arange(n_img)[:, None]
    hit_i = sims.t().topk(k, 1).indices == owner[:, None]
    recall = lambda hits, upto: hits[:, :upto].any(1).float().mean().item()  # noqa: E731
    model.train()
    n = max(len(triples), 1)
    return {
        "step": step,
        "retrieval": {"images": n_img, "captions": len(split.pairs),
                      "i2t_r1": recall(hit_t, 1), "i2t_r5": recall(hit_t, k),
                      "t2i_r1": recall(hit_i, 1), "t2i_r5": recall(hit_i, k),
                      "t2i_chance": 1.0 / n_img},
        "matching": {"pairs": len(triples), "itm_acc": itm_hits / n, "itc_acc": itc_hits / n},
    }


# --------------------------------------------------------------------------


def word_swap_groups(cfg, meta):
    """The `word_swap` samplers' groups (one set for all; the config's, else
    plugins/word-swap `default_groups` as dumped), or None if none is used."""
    used = set()
    for sec in cfg.get("objectives", {}).values():
        if sec.get("enabled", True):
            used.update(sec.get("samplers", []))
    groups = None
    for name, sec in cfg.get("samplers", {}).items():
        if name in used and sec.get("plugin") == "word_swap":
            g = sec.get("groups", meta["word_swap_default_groups"])
            if groups is not None and g != groups:
                raise SystemExit("reference trainer: two word_swap samplers with different groups")
            groups = g
    return groups


def check_tokenizer(tok, splits, max_len):
    """The WordPiece here gives vlmatch's ids for every dumped text."""
    n = 0
    for split in splits:
        for p in split.pairs:
            assert tok.encode(p["caption"], max_len) == p["ids"], p
            n += 1
        for t in split.matching or []:
            assert tok.encode(t["caption"], max_len) == t["caption_ids"], t
            assert tok.encode(t["negative"], max_len) == t["negative_ids"], t
            n += 2
    return n


def check_matching_swaps(split, groups):
    """Each held-out negative of kind `color` or `shape` (or without a
    kind, as dumps before the fine-grained suite) is its caption with one
    color or shape word swapped (the groups this port reads), a check of
    the port's rules; the other kinds change other words or more than one."""
    swap = WordSwap(groups[:2])
    for t in split.matching:
        if t.get("kind", "color") not in ("color", "shape"):
            continue
        a, b = t["caption"].split(" "), t["negative"].split(" ")
        diff = [i for i in range(len(a)) if a[i] != b[i]] if len(a) == len(b) else None
        assert diff is not None and len(diff) == 1, t
        i = diff[0]
        ca, cb = a[i].rstrip(string.punctuation), b[i].rstrip(string.punctuation)
        assert swap.group_of.get(ca.lower()) == swap.group_of.get(cb.lower()) is not None, t


GENERATED = ("word_swap", "neggen")


def generated_samplers(cfg):
    """The samplers the enabled objectives use, by name: their plugin;
    anything the reference does not emulate stops here."""
    out = {}
    for oname, sec in cfg.get("objectives", {}).items():
        if not sec.get("enabled", True):
            continue
        for s in sec.get("samplers", []):
            ssec = cfg.get("samplers", {}).get(s)
            if ssec is None:
                raise SystemExit(f"reference trainer: objectives.{oname}.samplers names {s!r}, "
                                 f"but the config has no [samplers.{s}]")
            plugin = ssec.get("plugin") or s
            if plugin == "hard_negative":
                extra = sorted(set(ssec) - {"plugin", "similarity_guard"})
            elif plugin == "word_swap":
                extra = sorted(set(ssec) - {"plugin", "groups"})
            elif plugin == "neggen":
                extra = []  # reference_neggen.settings checks its keys
            else:
                raise SystemExit(f"reference trainer: sampler `samplers.{s}` (plugin {plugin!r}) is not "
                                 "emulated; the reference has hard_negative, word_swap and neggen")
            if extra:
                raise SystemExit(f"reference trainer: config key `samplers.{s}.{extra[0]}` is not emulated")
            out[s] = plugin
    return out


def check_eval(run_dir, heldout, threads):
    """Load a vlmatch run's newest checkpoint into the reference model
    (strictly by name) and score the held-out set here: the result should
    equal the run's own evaluation at that step (eval.jsonl), which checks
    the fusion, the heads and the evaluation protocol on trained weights."""
    torch.set_num_threads(threads)
    with open(os.path.join(run_dir, "config.toml"), "rb") as f:
        cfg = tomllib.load(f)
    held = Split(heldout, cfg)
    ckpt = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ckpt, "latest")) as f:
        name = f.read().strip()
    tensors = load_file(os.path.join(ckpt, os.path.basename(name)))
    step = int(tensors["state.step"].item())
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model = Model(cfg, {"vocab_size": held.meta["vocab_size"]})
    model.load_state_dict(state, strict=True)
    ours = held_out(model, held, cfg.get("eval", {}).get("batch_size", 64), held.meta["special"]["pad"], step)
    theirs = [e for e in read_jsonl(os.path.join(run_dir, "eval.jsonl")) if e["step"] == step]
    out = {"run": run_dir, "step": step, "reference": ours,
           "vlmatch": theirs[0] if theirs else None}
    print(json.dumps(out))
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "check-eval":
        ap = argparse.ArgumentParser(prog="reference_train.py check-eval", description=check_eval.__doc__)
        ap.add_argument("run_dir")
        ap.add_argument("--heldout", required=True)
        ap.add_argument("--threads", type=int, default=1)
        a = ap.parse_args(sys.argv[2:])
        check_eval(a.run_dir, a.heldout, a.threads)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="merged config TOML (`vlmatch config ...` or a run's config.toml)")
    ap.add_argument("--train", required=True, help="`vlmatch preview --all` directory")
    ap.add_argument("--heldout", help="`vlmatch preview --all --split heldout` directory")
    ap.add_argument("--seed", type=int, help="default: train.seed")
    ap.add_argument("--steps", type=int, help="default: train.steps (also the schedule's length)")
    ap.add_argument("--eval-every", type=int, help="default: eval.every")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stop-after", type=int, help="stop after this step (the schedule keeps --steps)")
    ap.add_argument("--swap-draws", choices=["uniform", "keyed-mod"], default="uniform",
                    help="word-swap choices: uniform in 0..n (word_swap's contract), or as vlmatch's keyed "
                         "draws compute them since bd3303b, (floor(u * 2^30) mod n) with u carrying 24 bits, "
                         "which is never odd for even n (a diagnostic)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    check_supported(cfg)
    tc = cfg["train"]
    seed = tc["seed"] if args.seed is None else args.seed
    steps = tc["steps"] if args.steps is None else args.steps
    eval_every = cfg.get("eval", {}).get("every", 0) if args.eval_every is None else args.eval_every
    eval_bs = cfg.get("eval", {}).get("batch_size", 64)
    log_every = tc.get("log_every", 1)
    torch.manual_seed(1_000_003 * seed + 17)

    t0 = time.perf_counter()
    train = Split(args.train, cfg)
    if not train.meta["all_images"]:
        raise SystemExit(f"{args.train}: not every training image (dump it with `vlmatch preview --all`)")
    held = Split(args.heldout, cfg) if args.heldout else None
    if held is not None and held.matching is None:
        raise SystemExit(f"{args.heldout}: no matching.jsonl (dump it with --split heldout)")
    meta = train.meta
    sp = meta["special"]
    tok = WordPiece(os.path.join(args.train, "vocab.txt"), cfg["data"].get("lowercase", True), sp)
    checked = check_tokenizer(tok, [s for s in (train, held) if s is not None], cfg["data"]["max_len"])
    groups = word_swap_groups(cfg, meta)
    samplers = generated_samplers(cfg)
    if held is not None:
        check_matching_swaps(held, meta["word_swap_default_groups"])
    swapper = WordSwap(groups) if groups is not None else None
    swap_rng = random.Random(f"reference-word-swap:{seed}")
    if args.swap_draws == "uniform":
        swap_draw = swap_rng.randrange
    else:
        def swap_draw(n):
            u = (swap_rng.randrange(1 << 24) + 0.5) / (1 << 24)  # vlmatch_core::random::uniform
            return int(u * (1 << 30)) % n
    encoded = {}

    model = Model(cfg, {"vocab_size": tok.size})
    init_weights(model)
    model.train()
    step_fn = Step(model, cfg, {"special": sp, "vocab_size": tok.size})
    step_fn.emulate_word_swap = False
    neggens = {}
    if "neggen" in samplers.values():
        for s, plugin in samplers.items():
            if plugin == "neggen":
                neggens[s] = reference_neggen.NegGen(cfg["samplers"][s], f"samplers.{s}", tok, train, model, seed)
    opt = torch.optim.AdamW(
        param_groups(model, tc.get("weight_decay", 0.0)), lr=tc["lr"],
        betas=tuple(tc.get("betas", (0.9, 0.999))), eps=tc.get("eps", 1e-8),
    )
    params = [p for p in model.parameters()]
    clip = tc.get("grad_clip", 0.0)
    stream = Stream(train, tc["batch_size"], seed)
    os.makedirs(args.out, exist_ok=True)
    # What this run was made from, so bench/parity.py can tell whether it
    # answers for a vlmatch run (same config apart from the seed).
    with open(args.config) as f, open(os.path.join(args.out, "config.toml"), "w") as g:
        g.write(f.read())
    info = {"seed": seed, "steps": steps, "eval_every": eval_every, "train": os.path.abspath(args.train),
            "heldout": args.heldout and os.path.abspath(args.heldout), "torch": torch.__version__,
            "threads": args.threads, "swap_draws": args.swap_draws, "samplers": samplers,
            "complete": False}
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "w")
    evals = open(os.path.join(args.out, "eval.jsonl"), "w")
    print(f"reference: {len(train.pairs)} pairs, {checked} texts tokenised as vlmatch does, "
          f"{sum(p.numel() for p in params)} parameters, loaded in {time.perf_counter() - t0:.1f}s",
          flush=True)

    started, cpu = time.perf_counter(), time.process_time()
    for step in range(min(steps, args.stop_after or steps)):
        lr = lr_at(step, steps, tc.get("warmup_steps", 0), tc["lr"], tc.get("min_lr", 0.0))
        for g in opt.param_groups:
            g["lr"] = lr
        pairs = stream.batch(step)
        images = train.pixels(torch.tensor([p["image_index"] for p in pairs]))
        ids, mask = padded([p["ids"] for p in pairs], sp["pad"])
        image_ids = torch.tensor([p["image_id"] for p in pairs])
        positives = batch_positives(images, ids, image_ids, step_fn.rule)
        swaps = None
        if swapper is not None:
            rows, texts = [], []
            for i, p in enumerate(pairs):
                s = swapper.swap(p["caption"], swap_draw)
                if s is not None:
                    if s not in encoded:
                        encoded[s] = tok.encode(s, cfg["data"]["max_len"])
                    rows.append(i)
                    texts.append(encoded[s])
            if rows:
                swaps = (torch.tensor(rows),) + padded(texts, sp["pad"])
            else:
                swaps = (torch.zeros(0, dtype=torch.long), None, None)
        generated = {s: swaps for s, plugin in samplers.items() if plugin == "word_swap" and swaps is not None}
        for s, ng in neggens.items():
            generated[s] = reference_neggen.Bound(ng, pairs, ids, step, cfg["data"]["max_len"], padded)
        loss = step_fn(images, ids, mask, image_ids, positives, generated=generated)
        loss.backward()
        if clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % log_every == 0 or done == steps:
            line = {"step": done, "lr": lr, "grad_norm": grad_norm.item()}
            for k, v in step_fn.values.items():
                x = v.item()
                if not math.isfinite(x):
                    raise SystemExit(f"`{k}` became {x} at step {done}")
                line[k] = x
            line["time_s"] = time.perf_counter() - started
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
        if held is not None and eval_every > 0 and done % eval_every == 0:
            r = held_out(model, held, eval_bs, sp["pad"], done)
            evals.write(json.dumps(r) + "\n")
            evals.flush()
            m = r["matching"]
            print(f"reference: step {done} ({time.perf_counter() - started:.0f}s): held-out matching "
                  f"ITM {100 * m['itm_acc']:.1f}% ITC {100 * m['itc_acc']:.1f}%", flush=True)
    metrics.close()
    evals.close()
    # The final weights, by vlmatch's parameter names (model.<name>), for
    # check-eval-style analyses.
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, os.path.join(args.out, "model.pt"))
    info.update(complete=args.stop_after is None or args.stop_after >= steps, stopped_after=args.stop_after, wall_s=time.perf_counter() - started, cpu_s=time.process_time() - cpu)
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"reference: {steps} steps in {info['wall_s']:.0f}s ({info['cpu_s']:.0f}s CPU); {args.out}",
          flush=True)


if __name__ == "__main__":
    main()
