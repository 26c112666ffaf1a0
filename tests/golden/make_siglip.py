"""Regenerate tests/fixtures/golden_siglip.json: SigLIP's pairwise sigmoid
loss (Zhai et al. 2023) and its gradients with respect to the image
features, the text features, t' (t = exp(t')) and b, computed by PyTorch's
autograd on small fixed inputs whose positive relation has off-diagonal
positives (captions of the same image id, and two pairs with one caption).

Run with the Python of the torch 2.11.0 venv that `cargo xtask setup` uses:
    ~/.cache/vlmatch/torch-2.11.0/bin/python tests/golden/make_siglip.py
"""
import json
import math
import pathlib

import torch
import torch.nn.functional as F

torch.manual_seed(0)


def siglip(images, texts, positives, log_scale, bias):
    """-1/N sum_ij log sigmoid(z_ij (t x_i . y_j + b)), z = +1 on positives."""
    logits = log_scale.exp() * images @ texts.t() + bias
    z = positives.double() * 2 - 1
    return -F.logsigmoid(z * logits).sum() / images.shape[0]


def case(n, dim, image_ids, same_caption, log_scale, bias, spread):
    images = F.normalize(torch.randn(n, dim, dtype=torch.float64) * spread, dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(n, dim, dtype=torch.float64), dim=-1)
    ids = torch.tensor(image_ids)
    positives = ids[:, None] == ids[None, :]
    for a, b in same_caption:
        positives[a, b] = positives[b, a] = True
    images.requires_grad_(True)
    texts.requires_grad_(True)
    t = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    loss = siglip(images, texts, positives, t, b)
    loss.backward()
    return {
        "images": images.detach().tolist(),
        "texts": texts.detach().tolist(),
        "positives": positives.tolist(),
        "log_scale": log_scale,
        "bias": bias,
        "loss": loss.item(),
        "grad_images": images.grad.tolist(),
        "grad_texts": texts.grad.tolist(),
        "grad_log_scale": t.grad.item(),
        "grad_bias": b.grad.item(),
    }


out = {
    # The paper's initialisation: t = 10, b = -10.
    "init": case(6, 5, [0, 1, 1, 2, 3, 3], [(0, 4)], math.log(10.0), -10.0, 1.0),
    # Further into training: a larger scale, a bias near 0.
    "trained": case(8, 4, [0, 1, 2, 2, 2, 3, 4, 5], [(1, 6), (0, 7)], math.log(37.0), -1.3, 1.0),
    "torch_version": torch.__version__,
}
path = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "golden_siglip.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {path}")
