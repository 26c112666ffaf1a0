"""Randomly initialised checkpoints of ALBEF's backbone shapes in the
HuggingFace hub layout, written by `transformers` itself: a 12-layer
BERT-base (with the vocabulary given, e.g. vlmatch's built-in one from
`vlmatch bench`'s vocab.txt or `bert-base-uncased`'s) and a ViT-B/16 at 224
pixels. Used to check that the `base` preset trains from HuggingFace
checkpoints through configuration alone (6 text + 6 fusion layers taken
from the 12-layer BERT, ViT position embeddings interpolated to 256 px):

  python tests/golden/make_base_checkpoints.py --vocab VOCAB.txt --out /tmp/hf-base
  cargo xtask train --preset base --set model.text.init='"/tmp/hf-base/bert"' \
      --set model.fusion.init='"/tmp/hf-base/bert"' --set model.fusion.init_layer_offset=6 \
      --set model.image.init='"/tmp/hf-base/vit"' --set train.batch_size=4 --set train.steps=3
"""

import argparse
import os
import shutil

import torch
from transformers import BertConfig, BertForMaskedLM, ViTConfig, ViTModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    with open(args.vocab) as f:
        vocab_size = sum(1 for _ in f)
    bert_dir = os.path.join(args.out, "bert")
    bert = BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=768, num_hidden_layers=12,
                                      num_attention_heads=12, intermediate_size=3072))
    bert.save_pretrained(bert_dir, safe_serialization=True)
    shutil.copy(args.vocab, os.path.join(bert_dir, "vocab.txt"))
    vit = ViTModel(ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, image_size=224, patch_size=16),
                   add_pooling_layer=False)
    vit.save_pretrained(os.path.join(args.out, "vit"), safe_serialization=True)
    print(args.out)


if __name__ == "__main__":
    main()
