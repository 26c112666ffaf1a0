"""NegGen for the PyTorch reference trainer (bench/reference_train.py): the
`neggen` sampler of plugins/neggen (docs/negatives.md) re-done on the
reference model, with the config keys of `[samplers.<name>]`
(plugin = "neggen"):

1. candidates: the words of a caption (split at spaces, trailing ASCII
   punctuation kept) whose part-of-speech tag is one of `tags`, as NegGen's
   own tagging found them: `vlmatch preview --all` of a config with a
   NegGen sampler dumps, per pair, the result of the training objectives'
   caption preparations (`caption_preps`, NegGen's under the key
   `neggen.pos_tags:<tags>`), so a caption's candidates are exactly
   NegGen's;
2. `mask_ratio` of them (ceil, at least one) chosen uniformly, every word
   piece of a chosen word replaced by [MASK]; `candidates` such tries per
   caption, each a fresh choice;
3. filled left to right, one piece per step, by the reference model's own
   text encoder and generator (MLM head) reading the masked text alone:
   logits / `temperature`, only alphabetic whole-word tokens for a word's
   first piece and `##` pieces after it, never the original first piece,
   the `top_k` best kept (ties kept), one draw from the softmax;
4. filters: a candidate whose token ids equal a caption of a positive of
   its image is dropped; with `pos_check`, one whose replaced words are not
   tagged with one of `tags` any more (see `Lexicon`: a stand-in for
   re-tagging the new caption); from step `filter_after_steps` on (steps
   counted from 0, as vlmatch's), one whose ITM match probability with its
   image (reference ITM head, image states of this step) is above
   `filter_threshold`. A caption's negative is its first surviving try.

Counters per step, under vlmatch's names (`<itm>_<sampler>_<counter>`):
`captions`, `produced`, `no_candidate` (no try had a word to mask),
`dropped_by_filter` (tries made, none survived).

What differs from vlmatch is listed in bench/PARITY.md ("NegGen in the
reference"). `fill_model` (a fixed masked LM) is not emulated: the
reference stops with an error naming the key.
"""

import math
import random
import string

import torch
import torch.nn.functional as F

from reference_objectives import text_is_positive

DEFAULT_TAGS = ["NN", "NNS", "JJ", "JJR", "JJS"]
KEYS = {"plugin", "mask_ratio", "temperature", "top_k", "candidates", "filter_threshold",
        "filter_after_steps", "tags", "pos_check", "fill_model"}


def core(word):
    """A word without trailing ASCII punctuation (plugins/neggen `core`)."""
    return word.rstrip(string.punctuation)


def settings(sec, key):
    """`[samplers.<name>]` of a `neggen` sampler with NegGenConfig's
    defaults, checked as NegGenConfig::check does; errors name the key."""
    unknown = sorted(set(sec) - KEYS)
    if unknown:
        raise SystemExit(f"reference NegGen: config key `{key}.{unknown[0]}` is not a NegGen key "
                         f"(expected one of {', '.join(sorted(KEYS))})")
    if sec.get("fill_model"):
        raise SystemExit(f"reference NegGen: config key `{key}.fill_model` (a fixed masked language model) "
                         "is not emulated; the reference fills with the model's own generator only")
    s = {"mask_ratio": sec.get("mask_ratio", 0.5), "temperature": sec.get("temperature", 1.0),
         "top_k": sec.get("top_k", 0), "candidates": sec.get("candidates", 1),
         "filter_threshold": sec.get("filter_threshold", 0.5),
         "filter_after_steps": sec.get("filter_after_steps", 0),
         "tags": list(sec.get("tags", DEFAULT_TAGS)), "pos_check": sec.get("pos_check", True)}
    bad = None
    if not 0.0 < s["mask_ratio"] <= 1.0:
        bad = ("mask_ratio", "must be in (0, 1]")
    elif not s["temperature"] > 0:
        bad = ("temperature", "must be > 0")
    elif s["top_k"] < 0:
        bad = ("top_k", "must be >= 0")
    elif s["candidates"] < 1:
        bad = ("candidates", "must be >= 1")
    elif not 0.0 <= s["filter_threshold"] <= 1.0:
        bad = ("filter_threshold", "must be in [0, 1]")
    elif s["filter_after_steps"] < 0:
        bad = ("filter_after_steps", "must be >= 0")
    if bad:
        raise SystemExit(f"reference NegGen: config key `{key}.{bad[0]}` {bad[1]}, got {s[bad[0]]}")
    return s


def prep_key(tags):
    """The key of NegGen's caption preparation (plugins/neggen `TagPrep`)."""
    return "neggen.pos_tags:" + ",".join(tags)


def candidates_of(pair, key):
    """Word indices NegGen's tagging found replaceable in a dumped pair."""
    preps = pair.get("caption_preps", {})
    if key not in preps:
        raise SystemExit(f"reference NegGen: dumped pair {pair.get('pair')} has no caption preparation `{key}`; "
                         "dump the data with `vlmatch preview --all` of this config (one with this NegGen "
                         "sampler), by a vlmatch whose preview writes `caption_preps`")
    return [i for i, _tag in preps[key]]


class Lexicon:
    """The stand-in for re-tagging a filled caption (NegGen's `pos_check`):
    whether a word would be tagged with one of the sampler's tags (a
    candidate, under prep `key`). A word of the dumped training captions
    is one if NegGen's tagging made it a candidate in at least half of its
    occurrences there (in their context); else if it is a candidate after a
    determiner, in `a WORD` (`caption_preps_after_a` of meta.json, every
    vocabulary entry); else (a word of several pieces that no caption has)
    it counts as one, as the tagger guesses a noun for an unknown word."""

    def __init__(self, pairs, after_a, key):
        seen = {}
        for p in pairs:
            cands = set(candidates_of(p, key))
            for i, w in enumerate(p["caption"].split(" ")):
                c = core(w)
                if any(ch.isalpha() for ch in c):
                    n = seen.setdefault(c, [0, 0])
                    n[0] += i in cands
                    n[1] += 1
        self.known = {w: 2 * k >= n for w, (k, n) in seen.items()}
        self.after_a = {}
        for token, preps in after_a.items():
            if key in preps:
                self.after_a[token] = any(i == 1 for i, _tag in preps[key])
        self.key = key

    def __call__(self, word):
        if word in self.known:
            return self.known[word]
        return self.after_a.get(word, True)


class NegGen:
    """One `neggen` sampler (section `key`) over the reference model."""

    def __init__(self, sec, key, tok, split, model, seed):
        self.s = settings(sec, key)
        self.key = key
        self.prep = prep_key(self.s["tags"])
        after_a = split.meta.get("caption_preps_after_a", {})
        if not any(self.prep in v for v in after_a.values()):
            raise SystemExit(f"reference NegGen: {key}: the dump's meta.json has no `caption_preps_after_a` "
                             f"for `{self.prep}`; dump the data with `vlmatch preview --all` of this config")
        self.lexicon = Lexicon(split.pairs, after_a, self.prep)
        self.tok, self.model = tok, model
        if model.generator is None:
            raise SystemExit(f"reference NegGen: config key `{key}`: NegGen fills masks with the model's "
                             "generator; the config has no [model.generator]")
        sp = tok.sp
        self.sp = sp
        tokens = [None] * tok.size
        for t, i in tok.vocab.items():
            tokens[i] = t
        if not any(t and t.startswith("##") for t in tokens):
            raise SystemExit(f"reference NegGen: config key `{key}`: the vocabulary has no `##` pieces "
                             "(the reference emulates WordPiece vocabularies only)")
        self.tokens = tokens
        special = {sp[k] for k in ("pad", "unk", "cls", "sep", "mask")}
        alpha = lambda s: bool(s) and s.isalpha()  # noqa: E731
        self.first_ok = torch.tensor([i not in special and t is not None and alpha(t)
                                      for i, t in enumerate(tokens)])
        self.cont_ok = torch.tensor([i not in special and t is not None and t.startswith("##") and alpha(t[2:])
                                     for i, t in enumerate(tokens)])
        self.rng = random.Random(f"reference-neggen:{key}:{seed}")
        self.fill_rng = torch.Generator().manual_seed(1_000_033 * seed + 29)
        self.stats = {}

    def pieces(self, text):
        return [p for w in self.tok.basic(text) for p in self.tok.pieces(w)]

    def choose(self, tagged):
        """Partial Fisher-Yates over the candidate word indices, as
        `NegGen::choose_among` (its own draws)."""
        cands = list(tagged)
        if not cands:
            return []
        n = min(max(math.ceil(len(cands) * self.s["mask_ratio"]), 1), len(cands))
        for i in range(n):
            j = i + self.rng.randrange(len(cands) - i)
            cands[i], cands[j] = cands[j], cands[i]
        return sorted(cands[:n])

    def plan(self, caption, chosen):
        """plugins/neggen `plan` (WordPiece): ids with the chosen words'
        pieces masked, and spans (word, first position, pieces, original
        first piece); None when a chosen word has no or unknown pieces."""
        sp = self.sp
        words = caption.split(" ")
        ids, spans = [sp["cls"]], []
        for i, w in enumerate(words):
            if i in chosen:
                c = core(w)
                ps = self.pieces(c)
                if not ps or sp["unk"] in ps:
                    return None
                spans.append((i, len(ids), len(ps), ps[0]))
                ids += [sp["mask"]] * len(ps)
                ids += self.pieces(w[len(c):])
            else:
                ids += self.pieces(w)
        if not spans:
            return None
        return {"words": words, "spans": spans, "ids": ids + [sp["sep"]]}

    @torch.no_grad()
    def fill(self, plans):
        """Each plan's masks filled left to right, one piece per step."""
        m, sp = self.model, self.sp
        k, n = len(plans), max(len(p["ids"]) for p in plans)
        ids = torch.full((k, n), sp["pad"], dtype=torch.long)
        attn = torch.zeros((k, n), dtype=torch.long)
        for r, p in enumerate(plans):
            ids[r, :len(p["ids"])] = torch.tensor(p["ids"])
            attn[r, :len(p["ids"])] = 1
        steps = [[(s + j, j == 0, orig) for (_, s, cnt, orig) in p["spans"] for j in range(cnt)] for p in plans]
        for t in range(max(len(s) for s in steps)):
            rows = torch.tensor([r for r in range(k) if len(steps[r]) > t])
            pos = torch.tensor([steps[r][t][0] for r in rows.tolist()])
            first = torch.tensor([steps[r][t][1] for r in rows.tolist()])[:, None]
            orig = torch.tensor([steps[r][t][2] for r in rows.tolist()])
            states = m.text_encoder(ids[rows], attn[rows])
            logits = m.mlm_logits(states[torch.arange(len(rows)), pos][:, None])[:, 0].float()
            v = logits.shape[1]
            allowed = torch.where(first, self.first_ok[None], self.cont_ok[None])
            allowed &= ~(F.one_hot(orig, v).bool() & first)
            scores = (logits / max(self.s["temperature"], 1e-6)).masked_fill(~allowed, float("-inf"))
            top_k = self.s["top_k"]
            if 0 < top_k < v:
                kth = scores.topk(top_k, 1).values[:, top_k - 1:top_k]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            drawn = torch.multinomial(F.softmax(scores, 1), 1, generator=self.fill_rng).squeeze(1)
            ids[rows, pos] = drawn
        return ids.tolist()

    def realise(self, plan, filled):
        words = list(plan["words"])
        for (w, start, cnt, _) in plan["spans"]:
            text = "".join(self.tokens[i][2:] if self.tokens[i].startswith("##") else self.tokens[i]
                           for i in filled[start:start + cnt])
            words[w] = text + plan["words"][w][len(core(plan["words"][w])):]
        return " ".join(words)

    def keeps_kind(self, text, plan):
        words = text.split(" ")
        for (w, *_rest) in plan["spans"]:
            c = core(words[w])
            if not any(ch.isalpha() for ch in c) or not self.lexicon(c):
                return False
        return True

    def sample(self, pairs, ids, image, positives, step, max_len, padded):
        """This step's negatives: (rows [K], ids [K, L'], mask [K, L']) for
        the batch `pairs` (token ids `ids`, image states `image`), and the
        counters in `self.stats`."""
        s, sp, b = self.s, self.sp, len(pairs)
        owners, plans = [], []
        no_candidate = 0
        for i, p in enumerate(pairs):
            tagged = candidates_of(p, self.prep)
            any_plan = False
            for _ in range(s["candidates"]):
                chosen = self.choose(tagged)
                pl = self.plan(p["caption"], chosen) if chosen else None
                if pl is not None:
                    owners.append(i)
                    plans.append(pl)
                    any_plan = True
            no_candidate += not any_plan
        self.stats = {"captions": b, "produced": 0, "no_candidate": no_candidate, "dropped_by_filter": 0}
        empty = (torch.zeros(0, dtype=torch.long), None, None)
        if not plans:
            return empty
        texts = [self.realise(pl, f) for pl, f in zip(plans, self.fill(plans))]
        enc = [self.tok.encode(t, max_len) for t in texts]
        owner_t = torch.tensor(owners)
        cand_ids, cand_mask = padded(enc, sp["pad"])
        keep = ~text_is_positive(owner_t, cand_ids, ids, positives, sp["pad"])
        if s["pos_check"]:
            keep &= torch.tensor([self.keeps_kind(t, pl) for t, pl in zip(texts, plans)])
        if step >= s["filter_after_steps"]:
            with torch.no_grad():
                m = self.model
                states = m.text_encoder(cand_ids, cand_mask)
                fused = m.fuse(states, cand_mask, image.detach()[owner_t])
                p_match = F.softmax(m.itm_head(fused[:, 0]).float(), 1)[:, 1]
            keep &= p_match <= s["filter_threshold"]
        rows, out, tried = [], [], set(owners)
        for o, text_ids, kept in zip(owners, enc, keep.tolist()):
            if kept and (not rows or rows[-1] != o):
                rows.append(o)
                out.append(text_ids)
        self.stats["produced"] = len(rows)
        self.stats["dropped_by_filter"] = len(tried) - len(rows)
        if not rows:
            return empty
        return (torch.tensor(rows),) + padded(out, sp["pad"])


class Bound:
    """A NegGen sampler bound to one batch, for reference_objectives.Step:
    called with the step's image states and positives."""

    def __init__(self, neggen, pairs, ids, step, max_len, padded):
        self.args = (neggen, pairs, ids, step, max_len, padded)
        self.stats = {}

    def __call__(self, image, positives):
        neggen, pairs, ids, step, max_len, padded = self.args
        out = neggen.sample(pairs, ids, image, positives, step, max_len, padded)
        self.stats = dict(neggen.stats)
        return out
