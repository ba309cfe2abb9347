"""The built-in encoders: GPFM and the three experts it was distilled from (UNI, Phikon, CONCH).

Facts (architecture, preprocessing, field of view, checkpoint layout) follow each model's
official inference code; see docs and ``napari_gpfm/encoders/weights/README.md``.
"""

from __future__ import annotations

from napari_gpfm.encoders.builders import ConchBuilder, TimmBuilder
from napari_gpfm.encoders.registry import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CC_BY_NC_ND = "CC-BY-NC-ND-4.0 (non-commercial research use)"

GPFM = register(
    EncoderSpec(
        name="gpfm",
        display_name="GPFM (ViT-L/14, DINOv2 + expert distillation)",
        builder=TimmBuilder(
            "vit_large_patch14_dinov2",
            (
                ("dynamic_img_size", True),
                ("img_size", 224),
                ("init_values", 1e-5),
                ("num_classes", 0),
            ),
        ),
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bicubic",
        native_mpp=0.5,
        native_read_size=256,
        embed_dim=1024,
        token_dim=1024,
        patch_size=14,
        patch_grid=16,
        layouts=("dinov2", "timm"),
        weights_filenames=("GPFM.pth", "gpfm.pth", "gpfm.safetensors", "GPFM.safetensors"),
        licence=CC_BY_NC_ND,
        citation=(
            "Ma et al., A generalizable pathology foundation model using a unified knowledge "
            "distillation pretraining framework, Nat. Biomed. Eng. (2025), "
            "doi:10.1038/s41551-025-01488-4"
        ),
        url="https://github.com/birkhoffkiki/GPFM/releases/download/ckpt/GPFM.pth",
        notes=(
            "EMA teacher of the official release; embedding = final-LayerNorm CLS token. "
            "Field of view 512 px at 40x = 256 px at 0.5 um/px, resized to 224."
        ),
    )
)

UNI = register(
    EncoderSpec(
        name="uni",
        display_name="UNI (ViT-L/16, Mass-100K DINOv2)",
        builder=TimmBuilder(
            "vit_large_patch16_224",
            (
                ("dynamic_img_size", True),
                ("img_size", 224),
                ("init_values", 1e-5),
                ("num_classes", 0),
            ),
        ),
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bilinear",
        native_mpp=0.5,
        native_read_size=224,
        embed_dim=1024,
        token_dim=1024,
        patch_size=16,
        patch_grid=14,
        layouts=("timm",),
        weights_filenames=("uni.bin", "uni.safetensors", "UNI.pth", "uni/pytorch_model.bin"),
        licence=CC_BY_NC_ND + ", gated on Hugging Face",
        citation=(
            "Chen et al., Towards a general-purpose foundation model for computational "
            "pathology, Nat. Med. 30, 850-862 (2024)"
        ),
        url="https://huggingface.co/MahmoodLab/UNI",
        notes="timm state dict (pytorch_model.bin); embedding = final-norm CLS token.",
    )
)

PHIKON = register(
    EncoderSpec(
        name="phikon",
        display_name="Phikon (ViT-B/16, iBOT on TCGA)",
        # The Hugging Face config of owkin/phikon sets layer_norm_eps=1e-12.
        builder=TimmBuilder(
            "vit_base_patch16_224",
            (
                ("dynamic_img_size", True),
                ("img_size", 224),
                ("layer_norm_eps", 1e-12),
                ("num_classes", 0),
            ),
        ),
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bilinear",
        native_mpp=0.5,
        native_read_size=224,
        embed_dim=768,
        token_dim=768,
        patch_size=16,
        patch_grid=14,
        layouts=("hf-vit", "timm"),
        weights_filenames=(
            "phikon.safetensors",
            "phikon.bin",
            "phikon/model.safetensors",
            "phikon/pytorch_model.bin",
        ),
        licence="Owkin non-commercial licence (see the model card)",
        citation=(
            "Filiot et al., Scaling self-supervised learning for histopathology with masked "
            "image modeling, medRxiv (2023), doi:10.1101/2023.07.21.23292757"
        ),
        url="https://huggingface.co/owkin/phikon",
        notes=(
            "Hugging Face ViTModel state dict mapped onto timm; embedding = "
            "last_hidden_state[:, 0] (CLS after the final LayerNorm), no pooler."
        ),
    )
)

CONCH = register(
    EncoderSpec(
        name="conch",
        display_name="CONCH (ViT-B/16 image tower, vision-language)",
        builder=ConchBuilder(image_size=448),
        input_size=448,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        interpolation="bicubic",
        native_mpp=0.5,
        native_read_size=448,
        embed_dim=512,
        token_dim=768,
        patch_size=16,
        patch_grid=28,
        layouts=("conch",),
        weights_filenames=("conch.pth", "conch.bin", "conch/pytorch_model.bin"),
        licence=CC_BY_NC_ND + ", gated on Hugging Face",
        citation=(
            "Lu et al., A visual-language foundation model for computational pathology, "
            "Nat. Med. 30, 863-874 (2024)"
        ),
        url="https://huggingface.co/MahmoodLab/CONCH",
        notes=(
            "embedding = attention-pooled contrastive projection (512-d) before CONCH's L2 "
            "normalisation; patch tokens = trunk tokens (768-d)."
        ),
    )
)
