"""Regenerate the HuggingFace parity fixtures under tests/fixtures/hf/.

A fixture is a directory with `config.json` (its `model_type`, `bert` or
`vit`, picks the plugin), `model.safetensors` (hub key names) and
`expected.safetensors`: `input_ids`, `attention_mask` (int64) and
`last_hidden_state` (float32) for a text model (a `BertForMaskedLM` also
`logits`, its MLM head's vocabulary logits), or `pixel_values` and
`last_hidden_state` for an image model. Text fixtures with a `vocab.txt` also
get the `tokenizer.json` transformers builds from it and `texts.json`;
tokenising those texts (padded to the longest) with either file must give
exactly `input_ids`, which come from transformers' tokenizer, and
`word_ids` (-1 for none) is transformers' word index of every token.

CLIP (`model_type` `clip_vision_model`, or `clip` with a `vision_config`)
image fixtures also hold `pooler_output`, `post_layernorm` of the `[CLS]`
state (`last_hidden_state` is the encoder's output before it), and a
`preprocessor_config.json` whose `image_mean`/`image_std` a run takes. RoBERTa
(`roberta`) text fixtures are like BERT's, with a byte-level BPE
`tokenizer.json` trained here and `texts.json`.

A tokenizer-only fixture (`tokenizer.json`, `texts.json`, `expected.safetensors`
with `input_ids`, `attention_mask`, `word_ids`; no `config.json`) holds a
RoBERTa-style byte-level BPE tokenizer (`<s>`, `</s>`, `<pad>`, ...) trained
here on a few words.

Needs torch, transformers and safetensors from PyPI, e.g. in the venv that
`cargo xtask setup` creates:
    ~/.cache/vlmatch/torch-2.11.0/bin/python -m pip install transformers safetensors
    ~/.cache/vlmatch/torch-2.11.0/bin/python tests/golden/make_hf_fixtures.py
"""
import json
import zlib
import pathlib
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (BertConfig, BertForMaskedLM, BertModel, BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel,
                          CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast, RobertaConfig,
                          RobertaForMaskedLM, RobertaModel, ViTConfig, ViTForImageClassification, ViTModel)

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "hf"

WORDS = ["a", "red", "blue", "circle", "square", "small", "large", "left", "of", "on", "the", "and", "dog", "runs"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [c for c in "abcdefghijklmnopqrstuvwxyz.,"] + [
    "##" + c for c in "abcdefghijklmnopqrstuvwxyz"
]
TEXTS = ["A red circle left of a blue square.", "the dog runs", "Large zebra, small circle"]


def hf_ids(tok, d):
    """`tok`'s `input_ids`, `attention_mask` and `word_ids` (-1: none) for TEXTS, padded to the longest."""
    enc = tok(TEXTS, padding="longest")
    word_ids = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(TEXTS))]
    (d / "texts.json").write_text(json.dumps(TEXTS))
    return {
        "input_ids": torch.tensor(enc["input_ids"], dtype=torch.int64),
        "attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.int64),
        "word_ids": torch.tensor(word_ids, dtype=torch.int64),
    }


def text_fixture(name, cfg, masked_lm, with_vocab):
    torch.manual_seed(zlib.crc32(name.encode()))
    model = (BertForMaskedLM if masked_lm else BertModel)(cfg).eval()
    # Non-trivial LayerNorm and bias values, so a wrong mapping shows.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    d = ROOT / name
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    if with_vocab:
        # VOCAB has `a` twice (word and character): like BERT's vocab.txt
        # loader, transformers keeps the last line's id.
        (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
        tok = BertTokenizer.from_pretrained(d)
        tok.backend_tokenizer.save(str(d / "tokenizer.json"))
        expected = hf_ids(tok, d)
    else:
        rows = [torch.randint(5, cfg.vocab_size, (n,)).tolist() for n in (7, 4, 9)]
        rows = [[2] + r + [3] for r in rows]
        width = max(len(r) for r in rows)
        expected = {
            "input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64),
        }
    bert = model.bert if masked_lm else model
    with torch.no_grad():
        out = bert(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).last_hidden_state
        if masked_lm:
            # The MLM head's vocabulary logits, for NegGen's fill model.
            expected["logits"] = model(input_ids=expected["input_ids"],
                                       attention_mask=expected["attention_mask"]).logits.contiguous()
    save_file({**expected, "last_hidden_state": out.contiguous()}, d / "expected.safetensors")


def bpe_tokenizer(vocab_size=300):
    """A RoBERTa-style tokenizer: byte-level BPE with <s> ... </s> added."""
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(WORDS)] * 3 + TEXTS[:2], trainer)
    bpe.post_processor = processors.RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")),
                                                      trim_offsets=True, add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


def bpe_tokenizer_fixture(name):
    tok = bpe_tokenizer()
    d = ROOT / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    tok.backend_tokenizer.save(str(d / "tokenizer.json"))
    save_file(hf_ids(tok, d), d / "expected.safetensors")


def image_fixture(name, cfg, classifier):
    torch.manual_seed(zlib.crc32(name.encode()))
    model = (ViTForImageClassification if classifier else ViTModel)(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    d = ROOT / name
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    vit = model.vit if classifier else model
    with torch.no_grad():
        out = vit(pixel_values=pixels).last_hidden_state
    save_file({"pixel_values": pixels, "last_hidden_state": out.contiguous()}, d / "expected.safetensors")


def perturb(model, norm):
    """Non-trivial LayerNorm and bias values, so a wrong mapping shows."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if norm in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)


def clip_fixture(name, cfg, size, **processor):
    """A CLIPVisionModel, or a CLIPModel (`vision_model.` keys, a text tower
    vlmatch skips) for a CLIPConfig; `pooler_output` is post_layernorm(CLS).
    `preprocessor_config.json` is CLIPImageProcessor's with `processor`."""
    torch.manual_seed(zlib.crc32(name.encode()))
    model = (CLIPModel if isinstance(cfg, CLIPConfig) else CLIPVisionModel)(cfg).eval()
    perturb(model, "layer")  # layer_norm1/2, pre_layrnorm, post_layernorm
    d = ROOT / name
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size, **processor).save_pretrained(d)
    pixels = torch.randn(2, 3, size, size)
    # transformers 5 keeps CLIPVisionModel's tower at its top level (no
    # `vision_model.` prefix, which 4.x wrote); CLIPModel's is `vision_model`.
    vision = model.vision_model if isinstance(model, CLIPModel) else model
    with torch.no_grad():
        out = vision(pixel_values=pixels)
    save_file({"pixel_values": pixels, "last_hidden_state": out.last_hidden_state.contiguous(),
               "pooler_output": out.pooler_output.contiguous()}, d / "expected.safetensors")


def roberta_fixture(name, masked_lm, **arch):
    """RobertaForMaskedLM (`roberta.` keys, `lm_head.*`) or RobertaModel (a
    pooler), with a byte-level BPE trained here as its tokenizer.json."""
    tok = bpe_tokenizer(vocab_size=arch.pop("bpe_vocab"))
    cfg = RobertaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, type_vocab_size=1, **arch)
    torch.manual_seed(zlib.crc32(name.encode()))
    model = (RobertaForMaskedLM if masked_lm else RobertaModel)(cfg).eval()
    perturb(model, "LayerNorm" if not masked_lm else "orm")  # lm_head.layer_norm too
    d = ROOT / name
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    tok.backend_tokenizer.save(str(d / "tokenizer.json"))
    expected = hf_ids(tok, d)
    roberta = model.roberta if masked_lm else model
    with torch.no_grad():
        ids, mask = expected["input_ids"], expected["attention_mask"]
        expected["last_hidden_state"] = roberta(input_ids=ids, attention_mask=mask).last_hidden_state.contiguous()
        if masked_lm:
            expected["logits"] = model(input_ids=ids, attention_mask=mask).logits.contiguous()
    save_file(expected, d / "expected.safetensors")


common = dict(hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# BertModel keys (no prefix), 3 heads, with a vocab.txt and texts.
text_fixture(
    "bert-h48-3heads-vocab",
    BertConfig(vocab_size=len(VOCAB), hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
               intermediate_size=80, max_position_embeddings=64, **common),
    masked_lm=False, with_vocab=True)
# BertForMaskedLM keys (`bert.` prefix, MLM head), 5 heads.
text_fixture(
    "bert-mlm-h40-5heads",
    BertConfig(vocab_size=97, hidden_size=40, num_hidden_layers=3, num_attention_heads=5,
               intermediate_size=72, max_position_embeddings=40, **common),
    masked_lm=True, with_vocab=False)
# BertForMaskedLM with a vocab.txt: a fill model for NegGen (`fill_model`).
text_fixture(
    "bert-mlm-h32-4heads-vocab",
    BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=48, **common),
    masked_lm=True, with_vocab=True)
# ViTModel at 40 px, patch 8, 3 heads.
image_fixture(
    "vit-40px-p8-3heads",
    ViTConfig(image_size=40, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
              intermediate_size=96, **common),
    classifier=False)
# ViTForImageClassification keys (`vit.` prefix), 36 px, patch 6, 6 heads, no qkv bias.
image_fixture(
    "vit-cls-36px-p6-noqkvbias",
    ViTConfig(image_size=36, patch_size=6, hidden_size=36, num_hidden_layers=2, num_attention_heads=6,
              intermediate_size=64, qkv_bias=False, num_labels=3, **common),
    classifier=True)
# Tokenizer only: RoBERTa-style byte-level BPE.
bpe_tokenizer_fixture("tokenizer-roberta-bpe")
# CLIPVisionModel at 30 px, patch 6, 3 heads, quick_gelu (CLIP's default).
clip_fixture(
    "clip-vision-30px-p6-3heads",
    CLIPVisionConfig(image_size=30, patch_size=6, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=52, projection_dim=8),
    size=30, image_mean=[0.25, 0.5, 0.75], image_std=[0.125, 0.25, 0.5])
# CLIPModel (vision_config, `vision_model.` keys, a text tower), 24 px, patch 8, gelu.
clip_fixture(
    "clip-model-24px-p8-gelu",
    CLIPConfig(vision_config=dict(image_size=24, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=40, hidden_act="gelu"),
               text_config=dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=16, pad_token_id=1,
                                bos_token_id=0, eos_token_id=2),
               projection_dim=8),
    size=24)
# RobertaForMaskedLM: `roberta.` keys, lm_head, 5 heads, positions past padding_idx.
roberta_fixture("roberta-mlm-h40-5heads", masked_lm=True, bpe_vocab=300, hidden_size=40, num_hidden_layers=2,
                num_attention_heads=5, intermediate_size=72, max_position_embeddings=34, layer_norm_eps=1e-5, **common)
# RobertaModel (pooler, no prefix), 3 heads.
roberta_fixture("roberta-h24-3heads", masked_lm=False, bpe_vocab=280, hidden_size=24, num_hidden_layers=1,
                num_attention_heads=3, intermediate_size=40, max_position_embeddings=30, layer_norm_eps=1e-5, **common)
print("wrote", sorted(p.name for p in ROOT.iterdir()))

# Position-embedding interpolation (timm/ALBEF: bicubic, align_corners=False)
# for a ViT loaded at another resolution: 40 px / patch 8 (5x5) -> 48 px (6x6).
from safetensors.torch import load_file

pos = load_file(ROOT / "vit-40px-p8-3heads" / "model.safetensors")["embeddings.position_embeddings"]
cls, grid = pos[:, :1], pos[:, 1:]
d = grid.shape[-1]
grid = grid.reshape(1, 5, 5, d).permute(0, 3, 1, 2)
grid = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
out = torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, 36, d)], dim=1)
save_file({"input": pos.contiguous(), "output": out.contiguous()}, ROOT.parent / "pos_embed_5x5_to_6x6.safetensors")
