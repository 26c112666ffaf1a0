"""Round trip of `vlmatch export` through HuggingFace transformers.

Usage: python tests/python/check_export.py DIR

DIR holds the export (DIR/image, DIR/text) and `check.safetensors` written
by tests/export.rs: inputs and vlmatch's own encoder outputs, plus
`texts.json`. Loads the encoders with `ViTModel` / `BertModel` and the
tokenizer with `BertTokenizer`, runs them on the same inputs, prints one JSON
line with the largest differences, and exits 1 if any exceeds 1e-4 or the
tokenizer gives other ids.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import BertModel, BertTokenizer, ViTModel


def main():
    d = sys.argv[1]
    ref = load_file(os.path.join(d, "check.safetensors"))
    with open(os.path.join(d, "texts.json")) as f:
        texts = json.load(f)
    vit = ViTModel.from_pretrained(os.path.join(d, "image"), add_pooling_layer=False).eval()
    bert = BertModel.from_pretrained(os.path.join(d, "text"), add_pooling_layer=False).eval()
    tok = BertTokenizer.from_pretrained(os.path.join(d, "text"))
    with torch.no_grad():
        v = vit(pixel_values=ref["pixel_values"]).last_hidden_state
        t = bert(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
    ids = tok(texts, padding="longest", return_tensors="pt")["input_ids"]
    real = ref["attention_mask"].bool()
    out = {
        "vit_max_diff": (v - ref["vit_expected"]).abs().max().item(),
        # Padded positions are not compared: BERT's outputs there are
        # unspecified (only real tokens are attended to or used).
        "bert_max_diff": (t - ref["bert_expected"]).abs()[real].max().item(),
        "tokens_equal": ids.shape == ref["input_ids"].shape and bool((ids == ref["input_ids"]).all()),
    }
    print(json.dumps(out))
    ok = out["vit_max_diff"] < 1e-4 and out["bert_max_diff"] < 1e-4 and out["tokens_equal"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
