"""The objectives of bench/reference.py (the PyTorch yardstick for
`vlmatch bench`): positives, hard negatives and `Step`, one training step's
weighted losses, by the same formulas as vlmatch's plugins.
bench/reference.py describes the whole yardstick."""

import torch
import torch.nn.functional as F


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
        # Stand in for `word_swap` with random-token replacements when no
        # swaps are given (the timing yardstick, bench/reference.py);
        # reference_train.py turns this off, so a missing sampler is an error.
        self.emulate_word_swap = True
        # The last call's losses and metrics (detached), by vlmatch's names.
        self.values = {}

    def __call__(self, images, ids, mask, image_ids, positives=None, swaps=None, generated=None):
        """The weighted sum of the objectives' losses on one batch.
        `positives`: [B, B] bool (default: `batch_positives` under
        data.positives). `swaps`: the `word_swap` sampler's negatives,
        `(image_index [K], ids [K, L'], mask [K, L'])`; None emulates them
        (while `emulate_word_swap`). `generated`: by sampler name, the
        generated negatives of `word_swap` or `neggen` samplers, each such a
        tuple or a callable of (image states, positives) giving one (with
        its counters in `.stats`, logged as `<itm>_<sampler>_<counter>`)."""
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
                loss = self.itm(name, sec, image, text, ids, mask, i2t, positives, swaps, generated)
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

    def itm(self, name, sec, image, text, ids, mask, i2t, positives, swaps=None, generated=None):
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
            elif plugin == "word_swap" and swaps is None and s not in (generated or {}):
                if not self.emulate_word_swap:
                    raise SystemExit(f"reference: no word swaps given for sampler {s!r}")
                self.emulated.add("word_swap")
                swap = torch.rand(ids.shape, device=ids.device) * maskable(ids, mask, self.sp)
                pos = swap.argmax(1, keepdim=True)
                neg = ids.scatter(1, pos, torch.randint(5, self.vocab, (b, 1), device=ids.device))
                states = m.text_encoder(neg, mask)
                logits.append(m.itm_head(m.fuse(states, mask, image)[:, 0]))
                w = torch.ones(b, device=ids.device)
            elif plugin in ("word_swap", "neggen"):
                given = (generated or {}).get(s, swaps if plugin == "word_swap" else None)
                if given is None:
                    raise SystemExit(f"reference: no negatives given for sampler {s!r} ({plugin})")
                if callable(given):
                    out = given(image, positives)
                    for k, v in getattr(given, "stats", {}).items():
                        self.values[f"{name}_{s}_{k}"] = torch.tensor(float(v))
                    given = out
                rows, neg, neg_mask = given
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
