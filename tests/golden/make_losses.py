"""Regenerate tests/fixtures/golden_losses.json: each VL-Match loss computed
by PyTorch's own functions on small fixed random inputs.

Run with the Python of the torch 2.11.0 venv that `cargo xtask setup` uses:
    ~/.cache/vlmatch/torch-2.11.0/bin/python tests/golden/make_losses.py
"""
import json
import pathlib

import torch
import torch.nn.functional as F

torch.manual_seed(0)
out = {}

# ITC (ALBEF): soft targets spread over every caption of the same image id.
image_ids = torch.tensor([0, 1, 1, 2, 3, 3])
sim = torch.randn(6, 6) * 5
pos = (image_ids[:, None] == image_ids[None, :]).float()
targets = pos / pos.sum(1, keepdim=True)
i2t = -(F.log_softmax(sim, dim=1) * targets).sum(1).mean()
t2i = -(F.log_softmax(sim.t(), dim=1) * targets.t()).sum(1).mean()
out["itc"] = {"image_ids": image_ids.tolist(), "sim": sim.tolist(), "loss": ((i2t + t2i) / 2).item()}

# ITM: 2-way cross-entropy; slots without a negative (weight 0) are dropped.
logits = torch.randn(9, 2) * 2
labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
weights = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 0], dtype=torch.float)
keep = weights.bool()
out["itm"] = {
    "logits": logits.tolist(),
    "labels": labels.tolist(),
    "weights": weights.tolist(),
    "loss": F.cross_entropy(logits[keep], labels[keep]).item(),
}

# MLM / VL-RTD generator: cross-entropy on the chosen positions only.
logits = torch.randn(2, 5, 11) * 3
targets = torch.randint(0, 11, (2, 5))
positions = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
out["mlm"] = {
    "logits": logits.tolist(),
    "targets": targets.tolist(),
    "positions": positions.tolist(),
    "loss": F.cross_entropy(logits[positions], targets[positions]).item(),
}

# VL-RTD discriminator: binary cross-entropy over non-pad tokens.
logits = torch.randn(2, 6) * 2
labels = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.float)
attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
real = attention.bool()
out["rtd"] = {
    "logits": logits.tolist(),
    "labels": labels.tolist(),
    "attention": attention.tolist(),
    "loss": F.binary_cross_entropy_with_logits(logits[real], labels[real]).item(),
}

out["torch_version"] = torch.__version__
path = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "golden_losses.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {path}")
