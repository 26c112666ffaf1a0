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

Modules: this entry point (command line, timing, evaluation loop),
bench/reference_model.py (the modules and `load_file`) and
bench/reference_objectives.py (positives, hard negatives, `Step`).

Usage: python bench/reference.py --dir target/bench

The same model and objectives also train on their own data stream in
bench/reference_train.py (training-dynamics parity, bench/parity.py).
"""


import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tomllib

import torch
import torch.nn.functional as F

# The model and objectives live in sibling modules; scripts that import this
# one (bench/reference_train.py, bench/false_negatives.py) get them from here.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_model import Model, load_file  # noqa: E402
from reference_objectives import Step, batch_positives, hard_negatives  # noqa: E402

__all__ = ["Model", "Step", "batch_positives", "hard_negatives", "load_file", "param_groups"]


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
