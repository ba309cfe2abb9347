"""The colour-histogram expert: the evaluation baseline's feature, distilled like any CLS expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_run import tiny_overrides
from lightning.pytorch.callbacks import Callback

from gpfm_train.cli import fit, load_run_config
from gpfm_train.models.colour_expert import ColourHistogramExpert
from gpfm_train.module import ExpertSource, GPFMPretrainModule, PretrainConfig
from napari_gpfm.errors import ConfigError, ParameterError
from napari_gpfm.evaluation.features import ColourHistogram

COLOUR = {"name": "colour", "encoder": "baseline:colour-histogram", "cls_weight": 1.0}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _small_config(**expert_changes) -> PretrainConfig:
    return PretrainConfig.from_mapping(
        {
            "backbone": {
                "arch": "vit_small_patch14_dinov2",
                "img_size": 56,
                "kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 2},
            },
            "distill": {
                "n_local": 2,
                "out_dim": 64,
                "head_hidden_dim": 32,
                "head_bottleneck_dim": 16,
            },
            "experts": [{**COLOUR, **expert_changes}],
        }
    )


def _sample_tiles(sample_slide_path) -> np.ndarray:
    from napari_gpfm.slides import open_slide

    with open_slide(sample_slide_path) as slide:  # background, dermis, epidermis, keratin
        return np.stack(
            [
                slide.read_region_mpp(xy, 56, 1.0)
                for xy in ((300, 400), (1000, 2600), (1200, 800), (1450, 1000))
            ]
        )


def test_the_expert_sees_the_crops_as_the_evaluation_baseline_does(sample_slide_path):
    tiles = _sample_tiles(sample_slide_path)
    module = GPFMPretrainModule(_small_config())
    distiller = module.distiller
    expert = distiller.experts["colour"]
    assert isinstance(expert, ColourHistogramExpert) and expert.embed_dim == 512
    assert distiller.student["expert_heads"]["colour"].last_layer.weight.shape[0] == 512
    assert not any("colour" in k and "expert_heads" not in k for k in module.state_dict())
    assert module.hparams["experts"][0]["encoder"] == "baseline:colour-histogram"

    # The crops arrive as the augmentation leaves them: scaled to [0, 1], ImageNet-normalised.
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    (ecfg,) = distiller.cfg.experts
    got = distiller._run_expert(ecfg, x)["cls"].numpy()
    expected = ColourHistogram(bins=8).embed(tiles)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # The four tissues have different colour distributions (the target is informative).
    cos = torch.nn.functional.normalize(torch.from_numpy(got), dim=1)
    assert float((cos @ cos.T).triu(1).max()) < 0.95


def test_colour_expert_options_that_cannot_apply_are_refused():
    for changes, word in (
        ({"weights": "hist.safetensors"}, "weights"),
        ({"patch_weight": 0.25}, "patch_weight"),
        ({"input_mean": [0.5, 0.5, 0.5], "input_std": [0.2, 0.2, 0.2]}, "input_mean"),
    ):
        with pytest.raises(ConfigError, match=word) as err:
            _small_config(**changes)
        assert "colour" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="patch tokens"):
        ColourHistogramExpert()(torch.zeros(1, 3, 14, 14), patch_tokens=True)
    with pytest.raises(ParameterError, match="bins=7"):
        ColourHistogramExpert(bins=7)


def test_the_log_scale_lets_a_few_percent_of_rare_colour_move_the_target(sample_slide_path):
    background, _, _, keratin = _sample_tiles(sample_slide_path)
    flakes = background.copy()
    flakes[:12, :12] = keratin[:12, :12]  # 4.6% of the tile: keratin flakes on glass
    tiles = np.stack([background, flakes])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    linear = ColourHistogramExpert()(x)["cls"]
    log = ColourHistogramExpert(scale="log")(x)["cls"]
    np.testing.assert_allclose(log.numpy(), np.log1p(ColourHistogram(bins=8).embed(tiles)),
                               rtol=1e-6)
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(linear[:1], linear[1:])) > 0.999  # 1 - cos cannot tell them apart
    assert float(cos(log[:1], log[1:])) < 0.9

    module = GPFMPretrainModule(_small_config(histogram_scale="log"))
    assert module.distiller.experts["colour"].scale == "log"
    assert module.hparams["experts"][0]["histogram_scale"] == "log"
    assert GPFMPretrainModule(_small_config()).distiller.experts["colour"].scale == "linear"


def test_a_histogram_scale_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="histogram_scale='sqrt'") as err:
        _small_config(histogram_scale="sqrt")
    assert "colour" in str(err.value) and "linear, log" in str(err.value)
    with pytest.raises(ConfigError, match="colour-histogram expert only"):
        ExpertSource(name="uni", histogram_scale="log")
    with pytest.raises(ConfigError, match="histogram_scale='exp'"):
        ColourHistogramExpert(scale="exp")


class _HeadSnapshot(Callback):
    def on_train_start(self, trainer, module):
        head = module.distiller.student["expert_heads"]["colour"]
        self.before = {k: v.detach().clone() for k, v in head.named_parameters()}


def test_a_fit_with_the_colour_expert_trains_its_head_without_weights_files(tmp_path):
    run = load_run_config(
        "tiny_cpu.yaml",
        tiny_overrides(
            tmp_path,
            **{
                "trainer.max_steps": 2,
                "model.schedule.warmup_epochs": 0,
                "model.experts": [COLOUR],
            },
        ),
    )
    snapshot = _HeadSnapshot()
    done = fit(run, callbacks=[snapshot])
    logged = done.trainer.logged_metrics
    loss = float(logged["loss/expert/colour/cls"])
    assert 0.0 < loss < 2.0  # 1 - cos of non-negative histograms
    assert "loss/expert/colour/patch" not in logged
    head = done.module.distiller.student["expert_heads"]["colour"]
    moved = [k for k, v in head.named_parameters() if not torch.equal(v, snapshot.before[k])]
    assert moved, "the colour expert's loss must reach the student's head"


def test_either_spelling_names_the_colour_expert():
    module = GPFMPretrainModule(_small_config(encoder=" Baseline:Color-Histogram "))
    assert isinstance(module.distiller.experts["colour"], ColourHistogramExpert)
    with pytest.raises(ConfigError, match="no weights"):
        _small_config(encoder="baseline:color-histogram", weights="x.safetensors")


# ------------------------------------------------------------------ the clean-crop target
def _augment(tiles, **changes):
    from gpfm_train.data.augment import MultiCropAugmentation, MultiCropConfig

    config = MultiCropConfig(
        global_crops_size=56, local_crops_size=28, local_crops_number=2, **changes
    )
    return [MultiCropAugmentation(config)(tile, seed=7 + i) for i, tile in enumerate(tiles)]


def test_clean_global_crops_keep_the_geometry_and_drop_only_the_photometric_changes(
    sample_slide_path,
):
    tiles = _sample_tiles(sample_slide_path)
    plain = _augment(tiles, color_jitter_p=1.0)
    clean = _augment(tiles, color_jitter_p=1.0, clean_global_crops=True)
    # Asking for the clean crops draws nothing: every other crop is the one the recipe makes.
    for a, b in zip(plain, clean, strict=True):
        assert "global_crops_clean" not in a
        for key in ("global_crops", "local_crops"):
            for x, y in zip(a[key], b[key], strict=True):
                assert torch.equal(x, y)
    # The first global crop is drawn first, so a run without any photometric change gives its
    # clean crop exactly; the jittered crop differs from it.
    bare = _augment(
        tiles, color_jitter_p=0.0, grayscale_p=0.0, blur_p=(1.0, 1.0, 1.0), solarize_p=0.0
    )
    for sample, reference in zip(clean, bare, strict=True):
        assert torch.equal(sample["global_crops_clean"][0], reference["global_crops"][0])
        assert not torch.equal(sample["global_crops_clean"][0], sample["global_crops"][0])
        assert sample["global_crops_clean"][1].shape == sample["global_crops"][1].shape


def _clean_batch(tiles):
    from gpfm_train.data.collate import MaskConfig, collate_multicrop

    samples = _augment(tiles, color_jitter_p=1.0, clean_global_crops=True)
    return collate_multicrop(samples, MaskConfig(), np.random.default_rng(0))


def test_an_expert_with_clean_input_reads_the_clean_crops(sample_slide_path):
    tiles = _sample_tiles(sample_slide_path)
    batch = _clean_batch(tiles)
    assert batch["global_crops_clean"].shape == batch["global_crops"].shape
    torch.manual_seed(0)
    distiller = GPFMPretrainModule(_small_config(clean_input=True)).distiller.eval()  # no drop path
    (ecfg,) = distiller.cfg.experts
    assert ecfg.clean_input

    def expert_loss(clean_crops):
        with torch.no_grad():
            losses = distiller({**batch, "global_crops_clean": clean_crops}, teacher_temp=0.04)
        return float(losses["expert/colour/cls"])

    clean = expert_loss(batch["global_crops_clean"])
    # A mirrored clean crop has the same histogram; the jittered crops have another.
    assert expert_loss(batch["global_crops_clean"].flip(-1)) == pytest.approx(clean, rel=1e-5)
    assert abs(expert_loss(batch["global_crops"]) - clean) > 1e-4
    # Without clean_input the same expert reads the jittered crops the student sees.
    plain = GPFMPretrainModule(_small_config()).distiller.eval()
    plain.load_state_dict(distiller.state_dict())
    with torch.no_grad():
        jittered = float(plain(batch, teacher_temp=0.04)["expert/colour/cls"])
    assert jittered == pytest.approx(expert_loss(batch["global_crops"]), rel=1e-5)

    missing = {k: v for k, v in batch.items() if k != "global_crops_clean"}
    with pytest.raises(ConfigError, match="data.crops.clean_global_crops: true"):
        distiller(missing, teacher_temp=0.04)


def test_clean_input_needs_the_clean_crops_and_with_them_a_fit_runs(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"model.experts": [{**COLOUR, "clean_input": True}]})
    with pytest.raises(ConfigError, match="clean_global_crops") as err:
        load_run_config("tiny_cpu.yaml", overrides)
    assert "colour" in str(err.value)
    run = load_run_config(
        "tiny_cpu.yaml",
        tiny_overrides(
            tmp_path,
            **{
                "model.experts": [{**COLOUR, "clean_input": True}],
                "data.crops.clean_global_crops": True,
                "trainer.max_steps": 2,
                "model.schedule.warmup_epochs": 0,
            },
        ),
    )
    done = fit(run)
    assert 0.0 < float(done.trainer.logged_metrics["loss/expert/colour/cls"]) < 2.0
