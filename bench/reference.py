"""The PyTorch yardstick for `vlmatch bench` (run by `cargo xtask bench`).

An eager PyTorch implementation of the model and objectives that vlmatch
builds from a config, written the way ALBEF and BLIP write theirs: ViT,
BERT, BERT layers with cross-attention as fusion, ITC / ITM with in-batch
hard negatives / image-conditioned MLM / VL-RTD, torch.optim.AdamW with
PyTorch's own implementation choice, `clip_grad_norm_`. It reads what
`vlmatch bench` wrote into DIR (config.toml, meta.json, init.safetensors,
inputs.safetensors, vocab.txt, data/) and writes DIR/reference.json.

Same model: the module tree mirrors vlmatch's parameter names and loads
vlmatch's initial weights with `strict=True`, so a missing, extra or
differently shaped tensor is an error; the ITC loss at initialisation on
batch 0 is reported for comparison. Same inputs: the batches vlmatch used.
Same timing: warm-up steps, then blocks of steps with a device
synchronisation at each block's end, median seconds per step.

Rule-based text negatives (`word_swap`) are emulated here by replacing one
random non-special token per caption: the same tensor work (one more text
encoder pass and fusion over B pairs), not the same words. (The trainer,
bench/reference_train.py, passes real word swaps instead.)

Positives (`data.positives`, vlmatch_core::positives): pairs i and j of a
batch are positives of each other when they share an image id, or (the
default rule, `identical`) their token ids are identical or their images
are identical, found here by exact comparison of the tensors
(`batch_positives`), not by vlmatch's hashes.

Usage: python bench/reference.py --dir target/bench

The same model and objectives also train on their own data stream in
bench/reference_train.py (training-dynamics parity, bench/parity.py).
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_file(path):
    """A safetensors file as a dict of tensors, read without the
    `safetensors` package (GPU machines have torch and nothing else): an
    8-byte little-endian header length, a JSON header, then the raw data."""
    dtypes = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
              "I32": torch.int32, "BF16": torch.bfloat16, "F16": torch.float16,
              "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        t = torch.frombuffer(data, dtype=dtypes[info["dtype"]], count=(b - a) // dtypes[info["dtype"]].itemsize,
                             offset=a) if b > a else torch.empty(0, dtype=dtypes[info["dtype"]])
        out[name] = t.reshape(info["shape"]).clone()
    return out


# --------------------------------------------------------------------------
# Model (parameter names as vlmatch's)


class Attention(nn.Module):
    def __init__(self, q_dim, kv_dim, dim, heads, bias=True):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(q_dim, dim, bias=bias)
        self.key = nn.Linear(kv_dim, dim, bias=bias)
        self.value = nn.Linear(kv_dim, dim, bias=bias)

    def forward(self, x, kv, kv_mask=None):
        b, lq, _ = x.shape
        lk = kv.shape[1]
        h = self.heads

        def split(t, n):
            return t.view(b, n, h, -1).transpose(1, 2)

        q = split(self.query(x), lq)
        k = split(self.key(kv), lk)
        v = split(self.value(kv), lk)
        mask = None if kv_mask is None else kv_mask.bool().view(b, 1, 1, lk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, lq, -1)


class DenseLN(nn.Module):
    def __init__(self, i, o, eps):
        super().__init__()
        self.dense = nn.Linear(i, o)
        self.LayerNorm = nn.LayerNorm(o, eps=eps)


class Dense(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.dense = nn.Linear(i, o)


class AttentionBlock(nn.Module):
    def __init__(self, h, kv, heads, eps):
        super().__init__()
        self.self = Attention(h, kv, h, heads)
        self.output = DenseLN(h, h, eps)

    def forward(self, x, kv, kv_mask):
        a = self.output.dense(self.self(x, kv, kv_mask))
        return self.output.LayerNorm(a + x)


class BertLayer(nn.Module):
    def __init__(self, h, heads, inter, eps, cross_width=None):
        super().__init__()
        self.attention = AttentionBlock(h, h, heads, eps)
        if cross_width is not None:
            self.crossattention = AttentionBlock(h, cross_width, heads, eps)
        else:
            self.crossattention = None
        self.intermediate = Dense(h, inter)
        self.output = DenseLN(inter, h, eps)

    def forward(self, x, mask, image=None, image_mask=None):
        x = self.attention(x, x, mask)
        if self.crossattention is not None and image is not None:
            x = self.crossattention(x, image, image_mask)
        y = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(y + x)


class Layers(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertEmbeddings(nn.Module):
    def __init__(self, vocab, h, max_pos, type_vocab, eps):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, h)
        self.position_embeddings = nn.Embedding(max_pos, h)
        self.token_type_embeddings = nn.Embedding(type_vocab, h)
        self.LayerNorm = nn.LayerNorm(h, eps=eps)


class Bert(nn.Module):
    def __init__(self, c, vocab):
        super().__init__()
        h, eps = c["hidden_size"], c.get("layer_norm_eps", 1e-12)
        self.embeddings = BertEmbeddings(
            vocab, h, c.get("max_position_embeddings", 512), c.get("type_vocab_size", 2), eps
        )
        self.encoder = Layers(
            [
                BertLayer(h, c["num_attention_heads"], c["intermediate_size"], eps)
                for _ in range(c["num_hidden_layers"])
            ]
        )

    def forward(self, ids, mask):
        e = self.embeddings
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = e.word_embeddings(ids) + e.position_embeddings(pos)[None] + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


class PatchEmbeddings(nn.Module):
    def __init__(self, h, p):
        super().__init__()
        self.projection = nn.Conv2d(3, h, p, stride=p)


class VitEmbeddings(nn.Module):
    def __init__(self, h, p, n):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, h))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n + 1, h))
        self.patch_embeddings = PatchEmbeddings(h, p)


class VitAttention(nn.Module):
    def __init__(self, h, heads, bias):
        super().__init__()
        self.attention = Attention(h, h, h, heads, bias)
        self.output = Dense(h, h)


class VitLayer(nn.Module):
    def __init__(self, h, heads, inter, eps, bias):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(h, eps=eps)
        self.attention = VitAttention(h, heads, bias)
        self.layernorm_after = nn.LayerNorm(h, eps=eps)
        self.intermediate = Dense(h, inter)
        self.output = Dense(inter, h)

    def forward(self, x):
        y = self.layernorm_before(x)
        x = self.attention.output.dense(self.attention.attention(y, y)) + x
        y = self.layernorm_after(x)
        return self.output.dense(F.gelu(self.intermediate.dense(y))) + x


class Vit(nn.Module):
    def __init__(self, c, image_size):
        super().__init__()
        h, p, eps = c["hidden_size"], c["patch_size"], c.get("layer_norm_eps", 1e-12)
        self.embeddings = VitEmbeddings(h, p, (image_size // p) ** 2)
        self.encoder = Layers(
            [
                VitLayer(h, c["num_attention_heads"], c["intermediate_size"], eps, c.get("qkv_bias", True))
                for _ in range(c["num_hidden_layers"])
            ]
        )
        self.layernorm = nn.LayerNorm(h, eps=eps)

    def forward(self, images):
        e = self.embeddings
        x = e.patch_embeddings.projection(images).flatten(2).transpose(1, 2)
        x = torch.cat([e.cls_token.expand(x.shape[0], -1, -1), x], 1) + e.position_embeddings
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)


class Fusion(nn.Module):
    def __init__(self, c, text_width, image_width):
        super().__init__()
        eps = c.get("layer_norm_eps", 1e-12)
        self.layer = nn.ModuleList(
            [
                BertLayer(text_width, c["num_attention_heads"], c["intermediate_size"], eps, image_width)
                for _ in range(c["num_hidden_layers"])
            ]
        )

    def forward(self, text, text_mask, image, image_mask):
        x = text
        for layer in self.layer:
            x = layer(x, text_mask, image, image_mask)
        return x


class Transform(nn.Module):
    def __init__(self, h, eps):
        super().__init__()
        self.dense = nn.Linear(h, h)
        self.LayerNorm = nn.LayerNorm(h, eps=eps)


class Predictions(nn.Module):
    def __init__(self, h, vocab, eps):
        super().__init__()
        self.transform = Transform(h, eps)
        self.bias = nn.Parameter(torch.zeros(vocab))


class Cls(nn.Module):
    def __init__(self, h, vocab, eps):
        super().__init__()
        self.predictions = Predictions(h, vocab, eps)


class MlmHead(nn.Module):
    """BERT's MLM head, its decoder tied to the text word embeddings."""

    def __init__(self, h, vocab, eps):
        super().__init__()
        self.cls = Cls(h, vocab, eps)

    def forward(self, x, word_embeddings):
        t = self.cls.predictions.transform
        x = t.LayerNorm(F.gelu(t.dense(x)))
        return x @ word_embeddings.t() + self.cls.predictions.bias


class RtdHead(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.dense = nn.Linear(h, h)
        self.out = nn.Linear(h, 1)


class Model(nn.Module):
    def __init__(self, cfg, meta):
        super().__init__()
        m = cfg["model"]
        for role, plugin in [("image", "vit"), ("text", "bert"), ("fusion", "cross_attention"),
                             ("discriminator", "linear")]:
            if m[role]["plugin"] != plugin:
                raise SystemExit(f"reference: model.{role}.plugin = {m[role]['plugin']!r} is not "
                                 f"implemented here (only {plugin!r})")
        for role in ("image", "text"):
            if m[role].get("init"):
                raise SystemExit(f"reference: model.{role}.init is not supported (random init only)")
        vocab = meta["vocab_size"]
        image_size = cfg["data"]["image_size"]
        hv, ht = m["image"]["hidden_size"], m["text"]["hidden_size"]
        self.vision_encoder = Vit(m["image"], image_size)
        self.text_encoder = Bert(m["text"], vocab)
        self.fusion = Fusion(m["fusion"], ht, hv)
        e = m.get("embed_dim", 256)
        self.vision_proj = nn.Linear(hv, e)
        self.text_proj = nn.Linear(ht, e)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.itm_head = nn.Linear(ht, 2)
        self.rtd_head = RtdHead(ht)
        gen = m.get("generator")
        if gen is not None:
            if gen["plugin"] != "mlm_head":
                raise SystemExit(f"reference: generator {gen['plugin']!r} is not implemented here")
            self.generator = MlmHead(ht, vocab, gen.get("layer_norm_eps", 1e-12))
        else:
            self.generator = None

    def fuse(self, text, text_mask, image):
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        return self.fusion(text, text_mask, image, image_mask)

    def mlm_logits(self, states):
        return self.generator(states, self.text_encoder.embeddings.word_embeddings.weight)


# --------------------------------------------------------------------------
# Objectives (shared/method.md; the same formulas as vlmatch's plugins)


def maskable(ids, mask, sp):
    return mask.bool() & (ids != sp["cls"]) & (ids != sp["sep"]) & (ids != sp["pad"])


def masked_ce(logits, targets, positions):
    per = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    w = positions.flatten().float()
    return (per * w).sum() / w.sum().clamp_min(1.0)


def same_rows(x):
    """[B, B] bool: whether rows of `x` ([B, ...]) are exactly equal."""
    _, group = torch.unique(x.reshape(x.shape[0], -1), dim=0, return_inverse=True)
    return group[:, None] == group[None, :]


def batch_positives(images, ids, image_ids, rule="identical"):
    """[B, B] bool: pairs that are positives of each other. `image_id`: same
    image id (ALBEF); `identical`: also identical token ids (rows of `ids`,
    padded alike within a batch) or identical images (normalised pixels)."""
    same = image_ids[:, None] == image_ids[None, :]
    if rule == "image_id":
        return same
    if rule != "identical":
        raise SystemExit(f"reference: data.positives = {rule!r} is not implemented here")
    return same | same_rows(ids) | same_rows(images)


def pad_to(ids, length, pad):
    return F.pad(ids, (0, length - ids.shape[1]), value=pad)


def text_is_positive(rows, texts, ids, positives, pad):
    """[K] bool: whether text k ([K, L'] ids) is identical to the caption of a
    pair that is a positive of batch pair rows[k], i.e. a true match."""
    n = max(ids.shape[1], texts.shape[1])
    a, b = pad_to(texts, n, pad), pad_to(ids, n, pad)
    same = (a[:, None, :] == b[None, :, :]).all(-1)
    return (positives[rows] & same).any(1)


def hard_negatives(sim, positives, guard=False):
    """ALBEF's in-batch hard negatives: per row, a column drawn from
    softmax(row) + 1e-5 over non-positives; -1 where there is none. With
    `guard` (hard_negative's similarity_guard), also never a column at
    least as similar as the row's own pair (the diagonal)."""
    with torch.no_grad():
        if guard:
            positives = positives | (sim >= sim.diagonal()[:, None])
        w = F.softmax(sim.float(), 1) + 1e-5
        w = w.masked_fill(positives, 0.0)
        has = (~positives).any(1)
        w = torch.where(has[:, None], w, torch.ones_like(w))
        drawn = torch.multinomial(w, 1).squeeze(1)
        return torch.where(has, drawn, torch.full_like(drawn, -1))


class Step:
    def __init__(self, model, cfg, meta):
        self.model = model
        self.sp = meta["special"]
        self.vocab = meta["vocab_size"]
        self.objectives = []
        for name, sec in cfg.get("objectives", {}).items():
            if not sec.get("enabled", True):
                continue
            plugin = sec.get("plugin") or name
            if plugin not in ("itc", "itm", "mlm", "rtd"):
                raise SystemExit(f"reference: objective plugin {plugin!r} is not implemented here")
            if plugin == "rtd" and not sec.get("share_text_encoder", True):
                raise SystemExit("reference: rtd with share_text_encoder = false is not implemented here")
            self.objectives.append((name, plugin, sec.get("weight", 1.0), sec))
        self.samplers = {k: v.get("plugin") for k, v in cfg.get("samplers", {}).items()}
        self.guard = {k: v.get("similarity_guard", False) for k, v in cfg.get("samplers", {}).items()}
        self.rule = cfg.get("data", {}).get("positives", "identical")
        self.emulated = set()
        # The last call's losses and metrics (detached), by vlmatch's names.
        self.values = {}

    def __call__(self, images, ids, mask, image_ids, positives=None, swaps=None):
        """The weighted sum of the objectives' losses on one batch.
        `positives`: [B, B] bool (default: `batch_positives` under
        data.positives). `swaps`: the `word_swap` sampler's negatives,
        `(image_index [K], ids [K, L'], mask [K, L'])`; None emulates them."""
        m = self.model
        self.values = {}
        image = m.vision_encoder(images)
        text = m.text_encoder(ids, mask)
        with torch.no_grad():
            m.temp.clamp_(0.001, 0.5)
        ie = F.normalize(m.vision_proj(image[:, 0]), dim=-1)
        te = F.normalize(m.text_proj(text[:, 0]), dim=-1)
        i2t = ie @ te.t() / m.temp
        if positives is None:
            positives = batch_positives(images, ids, image_ids, self.rule)
        total = 0.0
        for name, plugin, weight, sec in self.objectives:
            if plugin == "itc":
                loss = self.itc(i2t, positives)
            elif plugin == "itm":
                loss = self.itm(name, sec, image, text, ids, mask, i2t, positives, swaps)
            elif plugin == "mlm":
                loss = self.mlm(sec, image, ids, mask)
            else:
                loss = self.rtd(sec, image, ids, mask)
            if plugin != "rtd":
                self.values[name] = loss.detach()
            total = total + weight * loss
        self.values["loss"] = total.detach()
        return total

    @staticmethod
    def itc(i2t, positives):
        # Each direction spreads a row's target over that row's positives.
        pos = positives.float()
        a = -(F.log_softmax(i2t, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
        b = -(F.log_softmax(i2t.t(), 1) * pos.t() / pos.t().sum(1, keepdim=True)).sum(1).mean()
        return (a + b) / 2

    def itm(self, name, sec, image, text, ids, mask, i2t, positives, swaps=None):
        m = self.model
        b = ids.shape[0]
        logits = [m.itm_head(m.fuse(text, mask, image)[:, 0])]
        labels = [torch.ones(b, dtype=torch.long, device=ids.device)]
        weights = [torch.ones(b, device=ids.device)]
        sources = ["pos"]
        for s in sec.get("samplers", []):
            plugin = self.samplers.get(s)
            if plugin == "hard_negative":
                t_for_i = hard_negatives(i2t, positives, self.guard[s])
                i_for_t = hard_negatives(i2t.t(), positives.t(), self.guard[s])
                texts = torch.cat([text[t_for_i.clamp_min(0)], text])
                tmask = torch.cat([mask[t_for_i.clamp_min(0)], mask])
                imgs = torch.cat([image, image[i_for_t.clamp_min(0)]])
                w = torch.cat([t_for_i >= 0, i_for_t >= 0]).float()
                logits.append(m.itm_head(m.fuse(texts, tmask, imgs)[:, 0]))
            elif plugin == "word_swap" and swaps is None:
                self.emulated.add("word_swap")
                swap = torch.rand(ids.shape, device=ids.device) * maskable(ids, mask, self.sp)
                pos = swap.argmax(1, keepdim=True)
                neg = ids.scatter(1, pos, torch.randint(5, self.vocab, (b, 1), device=ids.device))
                states = m.text_encoder(neg, mask)
                logits.append(m.itm_head(m.fuse(states, mask, image)[:, 0]))
                w = torch.ones(b, device=ids.device)
            elif plugin == "word_swap":
                rows, neg, neg_mask = swaps
                if rows.numel() == 0:
                    continue
                # A swap identical to a caption of one of the image's
                # positives is a match, not a negative: weight 0.
                with torch.no_grad():
                    w = (~text_is_positive(rows, neg, ids, positives, self.sp["pad"])).float()
                states = m.text_encoder(neg, neg_mask)
                logits.append(m.itm_head(m.fuse(states, neg_mask, image[rows])[:, 0]))
            else:
                raise SystemExit(f"reference: sampler {s!r} ({plugin}) is not implemented here")
            labels.append(torch.zeros(w.shape[0], dtype=torch.long, device=ids.device))
            weights.append(w)
            sources.append(s)
        with torch.no_grad():
            for src, l, y, w in zip(sources, logits, labels, weights):
                hit = (l.argmax(1) == y).float()
                self.values[f"{name}_acc_{src}"] = (hit * w).sum() / w.sum().clamp_min(1.0)
        logits, labels, weights = torch.cat(logits), torch.cat(labels), torch.cat(weights)
        with torch.no_grad():
            hit = (logits.argmax(1) == labels).float()
            self.values[f"{name}_acc"] = (hit * weights).sum() / weights.sum().clamp_min(1.0)
        per = F.cross_entropy(logits.float(), labels, reduction="none")
        return (per * weights).sum() / weights.sum().clamp_min(1.0)

    def mlm(self, sec, image, ids, mask):
        m, sp = self.model, self.sp
        ratio = sec.get("mask_ratio", 0.15)
        p_mask, p_rand = sec.get("mask_prob", 0.8), sec.get("random_prob", 0.1)
        with torch.no_grad():
            positions = (torch.rand(ids.shape, device=ids.device) < ratio) & maskable(ids, mask, sp)
            r = torch.rand(ids.shape, device=ids.device)
            to_mask = positions & (r < p_mask)
            to_rand = positions & (r >= p_mask) & (r < p_mask + p_rand)
            rand = torch.randint(self.vocab, ids.shape, device=ids.device)
            special = sum(rand == sp[k] for k in ("pad", "cls", "sep", "mask", "unk")).bool()
            rand = torch.where(special, ids, rand)
            corrupted = torch.where(to_rand, rand, ids).masked_fill(to_mask, sp["mask"])
        states = m.text_encoder(corrupted, mask)
        fused = m.fuse(states, mask, image)
        return masked_ce(m.mlm_logits(fused), ids, positions)

    def rtd(self, sec, image, ids, mask):
        m, sp = self.model, self.sp
        ratio, temp, lam = sec.get("mask_ratio", 0.15), sec.get("temperature", 1.0), sec.get("lambda", 50.0)
        with torch.no_grad():
            positions = (torch.rand(ids.shape, device=ids.device) < ratio) & maskable(ids, mask, sp)
        gen_states = m.text_encoder(ids.masked_fill(positions, sp["mask"]), mask)
        gen_logits = m.mlm_logits(gen_states)
        l_gen = masked_ce(gen_logits, ids, positions)
        with torch.no_grad():
            b, l, v = gen_logits.shape
            probs = F.softmax(gen_logits.float() / max(temp, 1e-6), -1).view(b * l, v)
            drawn = torch.multinomial(probs, 1, replacement=True).view(b, l)
            corrupted = torch.where(positions, drawn, ids)
            labels = ((corrupted != ids) & mask.bool()).float()
        states = m.text_encoder(corrupted, mask)
        fused = m.fuse(states, mask, image)
        h = m.rtd_head
        logits = h.out(F.gelu(h.dense(fused))).squeeze(-1)
        per = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
        w = mask.float()
        l_disc = (per * w).sum() / w.sum().clamp_min(1.0)
        self.values["gen"] = l_gen.detach()
        self.values["rtd"] = (lam * l_disc).detach()
        self.values["rtd_disc"] = l_disc.detach()
        return l_gen + lam * l_disc


# --------------------------------------------------------------------------
# Measurements


def gpu_used_mib():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(mib)
    return None


# Dense bf16 tensor-core peaks (TFLOP/s) of the cards these runs use.
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_blocks(device, warmup, repeats, per_block, f):
    for _ in range(warmup):
        f()
    sync(device)
    blocks = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(per_block):
            f()
        sync(device)
        blocks.append((time.perf_counter() - t) / per_block)
    return statistics.median(blocks), blocks


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def data_pipeline(d, cfg, meta, repeats):
    """PIL decode + bicubic resize + normalise, BertTokenizerFast, a
    torch DataLoader with as many workers as vlmatch's data.workers."""
    from PIL import Image
    from transformers import BertTokenizerFast

    data = cfg["data"]
    size = data["image_size"]
    mean = torch.tensor(data.get("mean", [0.48145466, 0.4578275, 0.40821073])).view(3, 1, 1)
    std = torch.tensor(data.get("std", [0.26862954, 0.26130258, 0.27577711])).view(3, 1, 1)
    root = os.path.join(d, "data")
    with open(os.path.join(root, "annotations.json")) as f:
        ann = json.load(f)
    tok = BertTokenizerFast(vocab_file=os.path.join(d, "vocab.txt"), do_lower_case=True)
    max_len = data.get("max_len", 40)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(ann)

        def __getitem__(self, i):
            img = Image.open(os.path.join(root, ann[i]["image"])).convert("RGB")
            img = img.resize((size, size), Image.BICUBIC)
            x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            x = x.view(size, size, 3).permute(2, 0, 1).float() / 255.0
            return (x - mean) / std, ann[i]["caption"]

    def collate(items):
        images = torch.stack([x for x, _ in items])
        t = tok([c for _, c in items], padding="longest", truncation=True, max_length=max_len,
                return_tensors="pt")
        return images, t["input_ids"], t["attention_mask"]

    b = min(meta["batch_size"], len(ann))
    workers = data.get("workers", 1)
    loader = torch.utils.data.DataLoader(
        Images(), batch_size=b, shuffle=True, drop_last=True, num_workers=workers,
        collate_fn=collate, persistent_workers=workers > 0,
    )
    per_pass = len(ann) // b

    def passes():
        while True:
            yield from loader

    it = passes()
    s, _ = time_blocks(torch.device("cpu"), per_pass, repeats, per_pass, lambda: next(it))
    return {"images_per_s": b / s, "workers": workers, "batch_size": b}


def first_hit_rank(cands, scores, hit):
    """Rank of the first candidate satisfying `hit` once sorted by score,
    highest first; Python's sort is stable, so ties keep the ITC order."""
    order = sorted(range(len(cands)), key=lambda a: -scores[a])
    for r, a in enumerate(order):
        if hit(cands[a]):
            return r
    return -1


def eval_main(d, cfg, meta):
    """ALBEF's retrieval evaluation loop (its evaluation() in Retrieval.py):
    ITC similarities of all images and captions, then per query its top k
    by ITC, the fusion and the ITM head on those k pairs, the query's
    ranking. Scores are the ITM match probability, as vlmatch's `itm`
    re-ranking (ALBEF ranks by the match logit alone)."""
    device = torch.device("cuda" if meta["cuda"] else "cpu")
    model = Model(cfg, meta)
    model.load_state_dict(load_file(os.path.join(d, "init.safetensors")), strict=True)
    model.to(device).eval()
    raw = load_file(os.path.join(d, "eval_inputs.safetensors"))
    images, ids, mask = (raw[k].to(device) for k in ("images", "ids", "mask"))
    per = meta["captions_per_image"]
    k, bs = meta["k"], meta["batch_size"]
    ni, nt = images.shape[0], ids.shape[0]
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        image = torch.cat([model.vision_encoder(images[s:s + bs]) for s in range(0, ni, bs)])
        text = torch.cat([model.text_encoder(ids[s:s + bs], mask[s:s + bs]) for s in range(0, nt, bs)])
        ie = F.normalize(model.vision_proj(image[:, 0]), dim=-1)
        te = F.normalize(model.text_proj(text[:, 0]), dim=-1)
        sims = ie @ te.t()
        tr, ir = [], []
        kt, ki = min(k, nt), min(k, ni)
        for i in range(ni):
            _, idx = sims[i].topk(kt)
            out = model.fuse(text[idx], mask[idx], image[i].repeat(kt, 1, 1))
            p = model.itm_head(out[:, 0]).softmax(-1)[:, 1].tolist()
            tr.append(first_hit_rank(idx.tolist(), p, lambda j: j // per == i))
        for j in range(nt):
            _, idx = sims[:, j].topk(ki)
            out = model.fuse(text[j].repeat(ki, 1, 1), mask[j].repeat(ki, 1), image[idx])
            p = model.itm_head(out[:, 0]).softmax(-1)[:, 1].tolist()
            ir.append(first_hit_rank(idx.tolist(), p, lambda i: i == j // per))
    sync(device)
    seconds = time.perf_counter() - t0

    def recall(ranks, r):
        return sum(1 for x in ranks if 0 <= x < r) / max(len(ranks), 1)

    result = {
        "images": ni, "captions": nt, "k": k, "seconds": seconds,
        "fused_pairs": ni * kt + nt * ki,
        "tr_r1": recall(tr, 1), "tr_r5": recall(tr, 5), "tr_r10": recall(tr, 10),
        "ir_r1": recall(ir, 1), "ir_r5": recall(ir, 5), "ir_r10": recall(ir, 10),
        "torch": torch.__version__,
    }
    with open(os.path.join(d, "reference-eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"reference (ALBEF's loop): {seconds:.2f} s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--eval", action="store_true", help="time ALBEF's retrieval loop (vlmatch bench --eval)")
    args = ap.parse_args()
    d = args.dir
    with open(os.path.join(d, "config.toml"), "rb") as f:
        cfg = tomllib.load(f)
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    torch.set_num_threads(meta["threads"])
    if args.eval:
        return eval_main(d, cfg, meta)
    torch.manual_seed(cfg["train"].get("seed", 42))
    device = torch.device("cuda" if meta["cuda"] else "cpu")
    if meta["cuda"]:
        torch.backends.cuda.matmul.allow_tf32 = True
    bf16 = meta["compute"] == "BFloat16"

    model = Model(cfg, meta)
    state = load_file(os.path.join(d, "init.safetensors"))
    model.load_state_dict(state, strict=True)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())

    raw = load_file(os.path.join(d, "inputs.safetensors"))
    step_fn = Step(model, cfg, meta)
    # Each fixed batch with its positives, found once (vlmatch's loader
    # hashes images and captions off the step, too).
    batches = []
    for i in range(meta["batches"]):
        images, ids, mask, image_ids = (raw[f"{k}.{i}"].to(device) for k in ("images", "ids", "mask", "image_ids"))
        batches.append((images, ids, mask, image_ids, batch_positives(images, ids, image_ids, step_fn.rule)))

    with torch.no_grad():
        images, ids, mask, image_ids, positives = batches[0]
        image = model.vision_encoder(images)
        text = model.text_encoder(ids, mask)
        ie = F.normalize(model.vision_proj(image[:, 0]), dim=-1)
        te = F.normalize(model.text_proj(text[:, 0]), dim=-1)
        init_itc = Step.itc(ie @ te.t() / model.temp, positives).item()

    tc = cfg["train"]
    opt = torch.optim.AdamW(
        param_groups(model, tc.get("weight_decay", 0.02)), lr=tc["lr"],
        betas=tuple(tc.get("betas", (0.9, 0.999))), eps=tc.get("eps", 1e-8),
    )
    clip = tc.get("grad_clip", 0.0)
    k = [0]
    last = [None]

    def step():
        b = batches[k[0] % len(batches)]
        k[0] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step_fn(*b)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last[0] = loss.detach()

    if meta["cuda"]:
        torch.cuda.reset_peak_memory_stats(device)
    step_s, blocks = time_blocks(device, meta["warmup"], meta["repeats"], meta["steps"], step)
    peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if meta["cuda"]:
        peak["gpu_mib"] = gpu_used_mib()
        peak["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    last_loss = last[0].item()

    # Model FLOPs of one training step (forward + backward), counted by
    # PyTorch on this same model (matmuls, convolutions, attention).
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # On batch 0, which vlmatch counts too (batches differ in padded length).
    k[0] = 0
    with counter:
        step()
    flops = counter.get_total_flops()
    flops_by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}

    result = {
        "parameters": n_params,
        "init_itc_loss": init_itc,
        "step_s": step_s,
        "step_s_blocks": blocks,
        "images_per_s": meta["batch_size"] / step_s,
        "last_loss": last_loss,
        "peak_memory": peak,
        "flops_per_step": flops,
        "flops_by_op": flops_by_op,
        "torch": torch.__version__,
        "optimizer": "torch.optim.AdamW (default implementation for the device)",
    }
    if meta["cuda"]:
        name = torch.cuda.get_device_name(device)
        result["device_name"] = name
        for key, peak_tflops in PEAK_BF16.items():
            if key in name and bf16:
                result["peak_tflops"] = peak_tflops
    if step_fn.emulated:
        result["note"] = ("emulated: " + ", ".join(sorted(step_fn.emulated))
                          + " (random one-token swaps: same tensor work, not the same words)")
    if os.path.exists(os.path.join(d, "data", "annotations.json")):
        try:
            import PIL  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            result["data_skipped"] = f"data pipeline not measured: {e}"
        else:
            result["data"] = data_pipeline(d, cfg, meta, meta["repeats"])
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"reference: {step_s * 1e3:.2f} ms/step, last loss {last_loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
