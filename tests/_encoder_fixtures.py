"""Random-weight checkpoints in each native layout, and independent reference forwards.

No real weights exist offline, so tests write random weights in the layout each model's
authors publish (GPFM's DINOv2 release, Hugging Face ViT, CONCH's CoCa checkpoint) and check
that loading them reproduces a reference computed without our loader.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from napari_gpfm.encoders.builders import instantiate_on_meta
from napari_gpfm.encoders.registry import EncoderSpec


def random_state_dict(spec: EncoderSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the backbone's own layout, scaled so every block matters.

    Drawing 300M normal samples for a ViT-L takes many seconds on a busy CPU, so each tensor
    is a slice of one shared pool of samples at its own random offset: every tensor still
    differs from every other, which is all the layout tests need.
    """
    model = instantiate_on_meta(spec.builder)
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=generator)
    span = pool.numel() // 2
    out = {}
    for name, meta in model.state_dict().items():
        if not meta.dtype.is_floating_point:  # counters such as BatchNorm's num_batches_tracked
            out[name] = torch.zeros(meta.shape, dtype=meta.dtype)
            continue
        flat = torch.empty(meta.numel())
        for begin in range(0, flat.numel(), span):
            length = min(span, flat.numel() - begin)
            start = int(torch.randint(0, span, (1,), generator=generator))
            flat[begin : begin + length] = pool[start : start + length]
        if re.search(r"(^|\.)(norm\d?|ln_\w+|layernorm\w*)\.weight$", name):
            flat.mul_(0.1).add_(1.0)
        elif name.endswith("running_var"):
            flat.abs_().add_(0.5)  # a variance must be positive
        elif name.endswith(".gamma"):
            flat.mul_(0.1)  # LayerScale: large enough that each block shows
        else:
            flat.mul_(0.02)
        out[name] = flat.reshape(meta.shape)
    return out


def to_dinov2_release(
    state: dict[str, torch.Tensor], *, depth: int, chunks: int, embed_dim: int, seed: int = 7
) -> dict[str, dict[str, torch.Tensor]]:
    """GPFM's release layout: teacher backbone with FSDP-chunked blocks, plus the DINO head."""
    per_chunk = depth // chunks
    generator = torch.Generator().manual_seed(seed)
    teacher: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if block:
            index = int(block.group(1))
            key = f"blocks.{index // per_chunk}.{index}.{block.group(2)}"
        teacher[f"backbone.{key}"] = value
    teacher["backbone.mask_token"] = torch.randn(1, embed_dim, generator=generator)
    head_shapes = {
        "dino_head.mlp.0.weight": (2048, embed_dim),
        "dino_head.mlp.0.bias": (2048,),
        "dino_head.mlp.2.weight": (2048, 2048),
        "dino_head.mlp.2.bias": (2048,),
        "dino_head.mlp.4.weight": (256, 2048),
        "dino_head.mlp.4.bias": (256,),
        "dino_head.last_layer.weight_g": (65536, 1),
        "dino_head.last_layer.weight_v": (65536, 256),
    }
    for key, shape in head_shapes.items():
        teacher[key] = torch.randn(shape, generator=generator)
    return {"teacher": teacher}


def to_hf_vit(state: dict[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """A timm ViT state dict rewritten as a Hugging Face ``ViTModel`` state dict (with pooler)."""
    names = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    blocks = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in names:
            out[names[key]] = value.clone()
            continue
        index, rest = re.match(r"^blocks\.(\d+)\.(.+)$", key).groups()
        part, _, param = rest.rpartition(".")
        layer = f"encoder.layer.{index}"
        if part == "attn.qkv":
            for name, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"{layer}.attention.attention.{name}.{param}"] = chunk.clone()
        else:
            out[f"{layer}.{blocks[part]}.{param}"] = value.clone()
    dim = state["cls_token"].shape[-1]
    out["pooler.dense.weight"] = torch.randn(dim, dim)
    out["pooler.dense.bias"] = torch.zeros(dim)
    return {f"{prefix}{k}": v for k, v in out.items()}


def hf_vit_reference(
    hf: dict[str, torch.Tensor], x: torch.Tensor, *, heads: int, eps: float
) -> torch.Tensor:
    """``last_hidden_state`` of a Hugging Face ViTModel, computed from its own keys."""
    h = F.conv2d(
        x,
        hf["embeddings.patch_embeddings.projection.weight"],
        hf["embeddings.patch_embeddings.projection.bias"],
        stride=hf["embeddings.patch_embeddings.projection.weight"].shape[-1],
    )
    h = h.flatten(2).transpose(1, 2)
    cls = hf["embeddings.cls_token"].expand(h.shape[0], -1, -1)
    h = torch.cat([cls, h], dim=1) + hf["embeddings.position_embeddings"]
    dim = h.shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer."))
    for i in range(layers):
        p = f"encoder.layer.{i}."

        def lin(t, name, p=p):
            return F.linear(t, hf[p + name + ".weight"], hf[p + name + ".bias"])

        normed = F.layer_norm(
            h, (dim,), hf[p + "layernorm_before.weight"], hf[p + "layernorm_before.bias"], eps
        )
        q, k, v = (
            lin(normed, f"attention.attention.{n}")
            .view(h.shape[0], -1, heads, dim // heads)
            .transpose(1, 2)
            for n in ("query", "key", "value")
        )
        scores = (q @ k.transpose(-1, -2)) / (dim // heads) ** 0.5
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
        h = h + lin(context, "attention.output.dense")
        normed = F.layer_norm(
            h, (dim,), hf[p + "layernorm_after.weight"], hf[p + "layernorm_after.bias"], eps
        )
        h = h + lin(F.gelu(lin(normed, "intermediate.dense")), "output.dense")
    return F.layer_norm(h, (dim,), hf["layernorm.weight"], hf["layernorm.bias"], eps)


def to_conch_checkpoint(state: dict[str, torch.Tensor], seed: int = 11) -> dict[str, torch.Tensor]:
    """CONCH's CoCa checkpoint: our image tower under ``visual.``, plus caption pooler and text."""
    generator = torch.Generator().manual_seed(seed)
    out = {f"visual.{k}": v.clone() for k, v in state.items()}
    extra = {
        "visual.attn_pool_caption.query": (256, 768),
        "visual.attn_pool_caption.attn.in_proj_weight": (2304, 768),
        "visual.attn_pool_caption.attn.in_proj_bias": (2304,),
        "visual.attn_pool_caption.attn.out_proj.weight": (768, 768),
        "visual.attn_pool_caption.attn.out_proj.bias": (768,),
        "visual.attn_pool_caption.ln_q.weight": (768,),
        "visual.attn_pool_caption.ln_q.bias": (768,),
        "visual.attn_pool_caption.ln_k.weight": (768,),
        "visual.attn_pool_caption.ln_k.bias": (768,),
        "visual.ln_caption.weight": (768,),
        "visual.ln_caption.bias": (768,),
        "text.token_embedding.weight": (32007, 768),
        "text.positional_embedding": (128, 768),
        "text.text_projection": (768, 512),
        "text_decoder.ln_final.weight": (768,),
        "logit_scale": (),
    }
    for key, shape in extra.items():
        out[key] = torch.randn(shape, generator=generator)
    return out


def conch_pool_reference(ckpt: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """CONCH's contrastive embedding from trunk tokens, written out from the checkpoint keys."""
    p = "visual.attn_pool_contrast."
    context = F.layer_norm(tokens, (768,), ckpt[p + "ln_k.weight"], ckpt[p + "ln_k.bias"], 1e-5)
    query = F.layer_norm(ckpt[p + "query"], (512,), ckpt[p + "ln_q.weight"], ckpt[p + "ln_q.bias"])
    bias_q, bias_k, bias_v = ckpt[p + "attn.in_proj_bias"].chunk(3)
    heads, head_dim = 8, 64
    q = F.linear(query, ckpt[p + "attn.q_proj_weight"], bias_q)  # (1, 512)
    k = F.linear(context, ckpt[p + "attn.k_proj_weight"], bias_k)  # (B, N, 512)
    v = F.linear(context, ckpt[p + "attn.v_proj_weight"], bias_v)
    batch = tokens.shape[0]
    q = q.view(1, heads, head_dim).transpose(0, 1).unsqueeze(0)  # (1, H, 1, d)
    k = k.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, H, N, d)
    v = v.view(batch, -1, heads, head_dim).transpose(1, 2)
    attn = ((q @ k.transpose(-1, -2)) / head_dim**0.5).softmax(-1)
    pooled = (attn @ v).transpose(1, 2).reshape(batch, 512)
    pooled = F.linear(pooled, ckpt[p + "attn.out_proj.weight"], ckpt[p + "attn.out_proj.bias"])
    pooled = F.layer_norm(
        pooled, (512,), ckpt["visual.ln_contrast.weight"], ckpt["visual.ln_contrast.bias"]
    )
    return pooled @ ckpt["visual.proj_contrast"]
