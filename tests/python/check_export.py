"""Round trip of `vlmatch export` through HuggingFace transformers.

Usage: python tests/python/check_export.py DIR

DIR holds the export (DIR/image, DIR/text) and `check.safetensors` written
by tests/export.rs: inputs and vlmatch's own encoder outputs, plus
`texts.json`. Loads each encoder with the `transformers` class its
`config.json` names (`ViTModel` or `CLIPVisionModel`; `BertModel` or
`RobertaModel`) and the tokenizer (`BertTokenizer` from `vocab.txt`, or
`PreTrainedTokenizerFast` from `tokenizer.json`), runs them on the same
inputs, prints one JSON line with the largest differences, and exits 1 if
any exceeds 1e-4 or the tokenizer gives other ids.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import (
    BertModel,
    BertTokenizer,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    RobertaModel,
    ViTModel,
)


def model_type(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["model_type"]


def image_states(path, pixels):
    """The image encoder's states as vlmatch returns them."""
    if model_type(path) == "clip_vision_model":
        m = CLIPVisionModel.from_pretrained(path).eval()
        # vlmatch applies CLIP's post_layernorm at every position (METER).
        out = m(pixel_values=pixels).last_hidden_state
        # (transformers 4 holds it under `vision_model`, 5 on the model.)
        tower = getattr(m, "vision_model", m)
        return "CLIPVisionModel", tower.post_layernorm(out)
    m = ViTModel.from_pretrained(path, add_pooling_layer=False).eval()
    return "ViTModel", m(pixel_values=pixels).last_hidden_state


def text_states(path, ids, mask):
    cls = RobertaModel if model_type(path) == "roberta" else BertModel
    m = cls.from_pretrained(path, add_pooling_layer=False).eval()
    return cls.__name__, m(input_ids=ids, attention_mask=mask).last_hidden_state


def tokenizer(path):
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return BertTokenizer.from_pretrained(path)


def main():
    d = sys.argv[1]
    ref = load_file(os.path.join(d, "check.safetensors"))
    with open(os.path.join(d, "texts.json")) as f:
        texts = json.load(f)
    with torch.no_grad():
        image_class, v = image_states(os.path.join(d, "image"), ref["pixel_values"])
        text_class, t = text_states(
            os.path.join(d, "text"), ref["input_ids"], ref["attention_mask"]
        )
    ids = tokenizer(os.path.join(d, "text"))(texts, padding="longest", return_tensors="pt")[
        "input_ids"
    ]
    real = ref["attention_mask"].bool()
    out = {
        "image_class": image_class,
        "text_class": text_class,
        "image_max_diff": (v - ref["image_expected"]).abs().max().item(),
        # Padded positions are not compared: the encoders' outputs there are
        # unspecified (only real tokens are attended to or used).
        "text_max_diff": (t - ref["text_expected"]).abs()[real].max().item(),
        "tokens_equal": ids.shape == ref["input_ids"].shape
        and bool((ids == ref["input_ids"]).all()),
    }
    print(json.dumps(out))
    ok = out["image_max_diff"] < 1e-4 and out["text_max_diff"] < 1e-4 and out["tokens_equal"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
