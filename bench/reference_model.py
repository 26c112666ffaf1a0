"""The model of bench/reference.py (the PyTorch yardstick for `vlmatch
bench`): ViT, BERT, BERT layers with cross-attention as fusion, the ITM,
MLM and RTD heads, with vlmatch's parameter names, so that vlmatch's
initial weights load with `strict=True`; and `load_file`, which reads
them. bench/reference.py describes the whole yardstick."""

import json

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_file(path):
    """A safetensors file as a dict of tensors, read without the
    `safetensors` package (GPU machines have torch and nothing else): an
    8-byte little-endian header length, a JSON header, then the raw data."""
    dtypes = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
              "I32": torch.int32, "BF16": torch.bfloat16, "F16": torch.float16,
              "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        t = torch.frombuffer(data, dtype=dtypes[info["dtype"]], count=(b - a) // dtypes[info["dtype"]].itemsize,
                             offset=a) if b > a else torch.empty(0, dtype=dtypes[info["dtype"]])
        out[name] = t.reshape(info["shape"]).clone()
    return out


# --------------------------------------------------------------------------
# Model (parameter names as vlmatch's)


class Attention(nn.Module):
    def __init__(self, q_dim, kv_dim, dim, heads, bias=True):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(q_dim, dim, bias=bias)
        self.key = nn.Linear(kv_dim, dim, bias=bias)
        self.value = nn.Linear(kv_dim, dim, bias=bias)

    def forward(self, x, kv, kv_mask=None):
        b, lq, _ = x.shape
        lk = kv.shape[1]
        h = self.heads

        def split(t, n):
            return t.view(b, n, h, -1).transpose(1, 2)

        q = split(self.query(x), lq)
        k = split(self.key(kv), lk)
        v = split(self.value(kv), lk)
        mask = None if kv_mask is None else kv_mask.bool().view(b, 1, 1, lk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, lq, -1)


class DenseLN(nn.Module):
    def __init__(self, i, o, eps):
        super().__init__()
        self.dense = nn.Linear(i, o)
        self.LayerNorm = nn.LayerNorm(o, eps=eps)


class Dense(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.dense = nn.Linear(i, o)


class AttentionBlock(nn.Module):
    def __init__(self, h, kv, heads, eps):
        super().__init__()
        self.self = Attention(h, kv, h, heads)
        self.output = DenseLN(h, h, eps)

    def forward(self, x, kv, kv_mask):
        a = self.output.dense(self.self(x, kv, kv_mask))
        return self.output.LayerNorm(a + x)


class BertLayer(nn.Module):
    def __init__(self, h, heads, inter, eps, cross_width=None):
        super().__init__()
        self.attention = AttentionBlock(h, h, heads, eps)
        if cross_width is not None:
            self.crossattention = AttentionBlock(h, cross_width, heads, eps)
        else:
            self.crossattention = None
        self.intermediate = Dense(h, inter)
        self.output = DenseLN(inter, h, eps)

    def forward(self, x, mask, image=None, image_mask=None):
        x = self.attention(x, x, mask)
        if self.crossattention is not None and image is not None:
            x = self.crossattention(x, image, image_mask)
        y = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(y + x)


class Layers(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertEmbeddings(nn.Module):
    def __init__(self, vocab, h, max_pos, type_vocab, eps):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, h)
        self.position_embeddings = nn.Embedding(max_pos, h)
        self.token_type_embeddings = nn.Embedding(type_vocab, h)
        self.LayerNorm = nn.LayerNorm(h, eps=eps)


class Bert(nn.Module):
    def __init__(self, c, vocab):
        super().__init__()
        h, eps = c["hidden_size"], c.get("layer_norm_eps", 1e-12)
        self.embeddings = BertEmbeddings(
            vocab, h, c.get("max_position_embeddings", 512), c.get("type_vocab_size", 2), eps
        )
        self.encoder = Layers(
            [
                BertLayer(h, c["num_attention_heads"], c["intermediate_size"], eps)
                for _ in range(c["num_hidden_layers"])
            ]
        )

    def forward(self, ids, mask):
        e = self.embeddings
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = e.word_embeddings(ids) + e.position_embeddings(pos)[None] + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


class PatchEmbeddings(nn.Module):
    def __init__(self, h, p):
        super().__init__()
        self.projection = nn.Conv2d(3, h, p, stride=p)


class VitEmbeddings(nn.Module):
    def __init__(self, h, p, n):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, h))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n + 1, h))
        self.patch_embeddings = PatchEmbeddings(h, p)


class VitAttention(nn.Module):
    def __init__(self, h, heads, bias):
        super().__init__()
        self.attention = Attention(h, h, h, heads, bias)
        self.output = Dense(h, h)


class VitLayer(nn.Module):
    def __init__(self, h, heads, inter, eps, bias):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(h, eps=eps)
        self.attention = VitAttention(h, heads, bias)
        self.layernorm_after = nn.LayerNorm(h, eps=eps)
        self.intermediate = Dense(h, inter)
        self.output = Dense(inter, h)

    def forward(self, x):
        y = self.layernorm_before(x)
        x = self.attention.output.dense(self.attention.attention(y, y)) + x
        y = self.layernorm_after(x)
        return self.output.dense(F.gelu(self.intermediate.dense(y))) + x


class Vit(nn.Module):
    def __init__(self, c, image_size):
        super().__init__()
        h, p, eps = c["hidden_size"], c["patch_size"], c.get("layer_norm_eps", 1e-12)
        self.embeddings = VitEmbeddings(h, p, (image_size // p) ** 2)
        self.encoder = Layers(
            [
                VitLayer(h, c["num_attention_heads"], c["intermediate_size"], eps, c.get("qkv_bias", True))
                for _ in range(c["num_hidden_layers"])
            ]
        )
        self.layernorm = nn.LayerNorm(h, eps=eps)

    def forward(self, images):
        e = self.embeddings
        x = e.patch_embeddings.projection(images).flatten(2).transpose(1, 2)
        x = torch.cat([e.cls_token.expand(x.shape[0], -1, -1), x], 1) + e.position_embeddings
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)


class Fusion(nn.Module):
    def __init__(self, c, text_width, image_width):
        super().__init__()
        eps = c.get("layer_norm_eps", 1e-12)
        self.layer = nn.ModuleList(
            [
                BertLayer(text_width, c["num_attention_heads"], c["intermediate_size"], eps, image_width)
                for _ in range(c["num_hidden_layers"])
            ]
        )

    def forward(self, text, text_mask, image, image_mask):
        x = text
        for layer in self.layer:
            x = layer(x, text_mask, image, image_mask)
        return x


class Transform(nn.Module):
    def __init__(self, h, eps):
        super().__init__()
        self.dense = nn.Linear(h, h)
        self.LayerNorm = nn.LayerNorm(h, eps=eps)


class Predictions(nn.Module):
    def __init__(self, h, vocab, eps):
        super().__init__()
        self.transform = Transform(h, eps)
        self.bias = nn.Parameter(torch.zeros(vocab))


class Cls(nn.Module):
    def __init__(self, h, vocab, eps):
        super().__init__()
        self.predictions = Predictions(h, vocab, eps)


class MlmHead(nn.Module):
    """BERT's MLM head, its decoder tied to the text word embeddings."""

    def __init__(self, h, vocab, eps):
        super().__init__()
        self.cls = Cls(h, vocab, eps)

    def forward(self, x, word_embeddings):
        t = self.cls.predictions.transform
        x = t.LayerNorm(F.gelu(t.dense(x)))
        return x @ word_embeddings.t() + self.cls.predictions.bias


class RtdHead(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.dense = nn.Linear(h, h)
        self.out = nn.Linear(h, 1)


class Model(nn.Module):
    def __init__(self, cfg, meta):
        super().__init__()
        m = cfg["model"]
        for role, plugin in [("image", "vit"), ("text", "bert"), ("fusion", "cross_attention"),
                             ("discriminator", "linear")]:
            if m[role]["plugin"] != plugin:
                raise SystemExit(f"reference: model.{role}.plugin = {m[role]['plugin']!r} is not "
                                 f"implemented here (only {plugin!r})")
        for role in ("image", "text"):
            if m[role].get("init"):
                raise SystemExit(f"reference: model.{role}.init is not supported (random init only)")
        vocab = meta["vocab_size"]
        image_size = cfg["data"]["image_size"]
        hv, ht = m["image"]["hidden_size"], m["text"]["hidden_size"]
        self.vision_encoder = Vit(m["image"], image_size)
        self.text_encoder = Bert(m["text"], vocab)
        self.fusion = Fusion(m["fusion"], ht, hv)
        e = m.get("embed_dim", 256)
        self.vision_proj = nn.Linear(hv, e)
        self.text_proj = nn.Linear(ht, e)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.itm_head = nn.Linear(ht, 2)
        self.rtd_head = RtdHead(ht)
        gen = m.get("generator")
        if gen is not None:
            if gen["plugin"] != "mlm_head":
                raise SystemExit(f"reference: generator {gen['plugin']!r} is not implemented here")
            self.generator = MlmHead(ht, vocab, gen.get("layer_norm_eps", 1e-12))
        else:
            self.generator = None

    def fuse(self, text, text_mask, image):
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        return self.fusion(text, text_mask, image, image_mask)

    def mlm_logits(self, states):
        return self.generator(states, self.text_encoder.embeddings.word_embeddings.weight)
