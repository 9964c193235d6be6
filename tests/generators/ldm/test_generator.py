"""Generator training helpers: config checks, DDP batch dealing, patch sampling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from synthlearn.generators.ldm.config import GeneratorConfig, load_generator_config
from synthlearn.generators.ldm.stages import Runtime, _batches, _patch_corner, latent_scale_factor

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.parametrize("name", ["tiny", "cpu", "demo", "demo_long", "demo_s2d", "paper"])
def test_shipped_configs_load(name):
    cfg = load_generator_config(CONFIGS / f"generator_{name}.toml")
    assert cfg.label == "idh"


def test_long_demo_config_is_the_demo_generator_trained_three_times_as_long():
    """generator_demo_long.toml (docs/benchmarks.md, section 15) changes only the epochs and the guidance."""
    demo = load_generator_config(CONFIGS / "generator_demo.toml")
    long = load_generator_config(CONFIGS / "generator_demo_long.toml")
    assert long.autoencoder.epochs == 3 * demo.autoencoder.epochs
    assert long.autoencoder.adv_start_epoch == 3 * demo.autoencoder.adv_start_epoch
    assert long.diffusion.epochs == 3 * demo.diffusion.epochs
    assert long.sampling.guidance_scale == 1.5
    back = dataclasses.replace(  # undo those three changes inside the long config's own tables: the rest must match
        long,
        autoencoder=dataclasses.replace(long.autoencoder, epochs=demo.autoencoder.epochs,
                                        adv_start_epoch=demo.autoencoder.adv_start_epoch),
        diffusion=dataclasses.replace(long.diffusion, epochs=demo.diffusion.epochs),
        sampling=dataclasses.replace(long.sampling, guidance_scale=demo.sampling.guidance_scale))
    assert back == demo


def test_paper_config_is_paper_scale():
    cfg = load_generator_config(CONFIGS / "generator_paper.toml")
    assert cfg.shape == (128, 192, 192)
    assert (cfg.autoencoder.latent_channels, *cfg.latent_shape) == (8, 16, 32, 32)
    assert cfg.autoencoder.batch_size == 1 and cfg.precision == "bf16"


@pytest.mark.parametrize("kwargs, match", [
    (dict(label="mgmt"), "label must be one of"),
    (dict(precision="fp8"), "precision"),
    (dict(latent_shape=(64, 64, 64)), "more than twice"),
    (dict(latent_shape=(6, 6, 6)), "divisible"),
    (dict(tumour_patch_fraction=2.0), "tumour_patch_fraction"),
    (dict(shape=(33, 33, 33), latent_shape=(8, 8, 8)), "divisible"),
])
def test_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GeneratorConfig(**{"shape": (32, 32, 32), "latent_shape": (8, 8, 8), **kwargs})


def test_unknown_config_key_is_refused(tmp_path):
    from synthlearn.config import ConfigError

    path = tmp_path / "g.toml"
    path.write_text('base = "%s"\n[sampling]\nguidance = 3\n' % (CONFIGS / "generator_tiny.toml"))
    with pytest.raises(ConfigError, match="sampling.guidance"):
        load_generator_config(path)


def test_batches_single_process_and_ddp_ranks_take_equal_steps():
    g = torch.Generator().manual_seed(0)
    single = _batches(7, 2, g, Runtime(torch.device("cpu"), "fp32"))
    assert [len(b) for b in single] == [2, 2, 2, 1]
    assert sorted(torch.cat(single).tolist()) == list(range(7))
    per_rank = []
    for rank in range(3):
        per_rank.append(_batches(7, 2, torch.Generator().manual_seed(0), Runtime(torch.device("cpu"), "fp32",
                                                                                rank=rank, world_size=3)))
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    covered = torch.cat([torch.cat(b) for b in per_rank]).unique()
    assert covered.tolist() == list(range(7))


def test_patch_corner_uniform_and_tumour_centred():
    g = torch.Generator().manual_seed(0)
    assert _patch_corner((16, 16, 16), None, g) is None
    assert _patch_corner((16, 16, 16), (16, 16, 16), g) is None
    for _ in range(20):
        corner = _patch_corner((16, 16, 16), (8, 8, 8), g)
        assert all(0 <= c <= 8 for c in corner)
    mask = torch.zeros(1, 16, 16, 16)
    mask[0, 13, 2, 7] = 1
    for _ in range(5):
        corner = _patch_corner((16, 16, 16), (8, 8, 8), g, mask, tumour_fraction=1.0)
        assert corner == (8, 0, 3)  # centred on the tumour voxel, clamped to the volume


def test_latent_scale_factor():
    mu = torch.randn(64, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    scale = latent_scale_factor(mu, torch.zeros_like(mu), torch.Generator().manual_seed(1))
    assert scale == pytest.approx(1 / 3, rel=0.05)
    with pytest.raises(ValueError, match="did not train"):
        latent_scale_factor(torch.zeros(2, 1, 2, 2, 2), torch.zeros(2, 1, 2, 2, 2), torch.Generator())


def test_latent_normalisation_per_channel_and_global():
    from synthlearn.generators.ldm.stages import latent_norm_tensors, latent_normalisation

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(32, 3, 4, 4, 4, generator=g) * torch.tensor([0.1, 1.0, 5.0]).view(1, 3, 1, 1, 1)
    mu = mu + torch.tensor([2.0, 0.0, -1.0]).view(1, 3, 1, 1, 1)
    sigma = torch.zeros_like(mu)
    norm = latent_normalisation(mu, sigma, torch.Generator().manual_seed(1), "channel")
    shift, scale = latent_norm_tensors(norm, 3)
    z = (mu - shift.view(1, 3, 1, 1, 1)) * scale.view(1, 3, 1, 1, 1)
    torch.testing.assert_close(z.transpose(0, 1).flatten(1).std(1), torch.ones(3), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(z.transpose(0, 1).flatten(1).mean(1), torch.zeros(3), rtol=1e-3, atol=1e-3)
    assert norm["latent_channel_std"][2] / norm["latent_channel_std"][0] == pytest.approx(50, rel=0.1)
    glob = latent_normalisation(mu, sigma, torch.Generator().manual_seed(1), "global")
    assert glob["latent_shift"] == [0.0] * 3 and len(set(glob["latent_scale"])) == 1
    assert glob["latent_scale"][0] == pytest.approx(glob["latent_scale_factor"])
    # an artifact written before per-channel scaling: its one factor for every channel, no shift
    shift, scale = latent_norm_tensors({"latent_scale_factor": 0.5}, 3)
    assert shift.tolist() == [0.0] * 3 and scale.tolist() == [0.5] * 3
    for bad in ({"latent_shift": [0.0] * 2, "latent_scale": [1.0] * 3}, {"latent_shift": [0.0] * 3,
                "latent_scale": [1.0, 0.0, 1.0]}, {"latent_shift": ["a"] * 3, "latent_scale": [1.0] * 3},
                {"latent_scale_factor": float("nan")}, {"latent_scale_factor": None}):
        with pytest.raises(ValueError, match="latent_"):
            latent_norm_tensors(bad, 3)
    with pytest.raises(ValueError, match="did not train"):
        latent_normalisation(torch.zeros(2, 2, 2, 2, 2), torch.zeros(2, 2, 2, 2, 2), torch.Generator(), "channel")


def test_fp16_needs_cuda():
    from synthlearn.generators.ldm.stages import setup_runtime

    cfg = dataclasses.replace(load_generator_config(CONFIGS / "generator_tiny.toml"), precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs CUDA"):
            setup_runtime(cfg)


@pytest.mark.parametrize("schedule", ["poly", "constant"])
def test_autoencoder_lr_schedule_decays_per_step(schedule, tmp_path):
    """``autoencoder.lr_schedule = "poly"``: the rates at the last step are nnU-Net's poly decay of that step;
    ``constant`` keeps them."""
    from synthlearn.models.autoencoder import GeneratorAutoencoder
    from synthlearn.training.checkpoint import load_checkpoint
    from synthlearn.generators.ldm.stages import _train_autoencoder, setup_runtime
    from synthlearn.training.trainer import poly_lr

    cfg = load_generator_config(CONFIGS / "generator_tiny.toml")
    cfg = dataclasses.replace(cfg, shape=(16, 16, 16), latent_shape=(4, 4, 4), autoencoder=dataclasses.replace(
        cfg.autoencoder, lr_schedule=schedule, epochs=2, batch_size=2, lr=1e-3, disc_lr=5e-4, adv_start_epoch=1))
    x = torch.rand(4, 5, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:, 4] = (x[:, 4] > 0.9).float()
    torch.manual_seed(0)
    ae = GeneratorAutoencoder(cfg.autoencoder, cfg.shape, cfg.latent_shape)
    ckpt = tmp_path / "ae.pt"
    _train_autoencoder(ae, x, cfg, setup_runtime(cfg), seed=0, ckpt=ckpt, progress=False)
    state = load_checkpoint(ckpt)
    lr, disc_lr = state["optimizer"]["param_groups"][0]["lr"], state["disc_optimizer"]["param_groups"][0]["lr"]
    if schedule == "poly":  # 2 epochs x 2 batches: the last step is step 3 of 4
        assert lr == pytest.approx(poly_lr(1e-3, 3, 4)) and disc_lr == pytest.approx(poly_lr(5e-4, 3, 4))
        assert lr < 0.3e-3
    else:
        assert (lr, disc_lr) == (1e-3, 5e-4)


def test_autoencoder_trains_channels_last_on_cpu_and_hands_back_the_default_layout(tmp_path, monkeypatch):
    """On CPU the stage runs in channels-last layout (oneDNN is faster there); afterwards every weight is back
    in the default contiguous layout, as encode_site, stage 2 and the artifact writer expect."""
    from synthlearn.models.autoencoder import GeneratorAutoencoder
    from synthlearn.generators.ldm import stages as gen_mod

    cfg = load_generator_config(CONFIGS / "generator_tiny.toml")
    cfg = dataclasses.replace(cfg, shape=(16, 16, 16), latent_shape=(4, 4, 4), autoencoder=dataclasses.replace(
        cfg.autoencoder, epochs=1, batch_size=2, adv_start_epoch=0))
    x = torch.rand(2, 5, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:, 4] = (x[:, 4] > 0.9).float()
    torch.manual_seed(0)
    ae = GeneratorAutoencoder(cfg.autoencoder, cfg.shape, cfg.latent_shape)
    before = {k: v.clone() for k, v in ae.ae.state_dict().items()}
    seen = []
    step_forward = gen_mod._AutoencoderStep.forward

    def spy(self, xb, eps, classes=None):
        seen.append(xb.is_contiguous(memory_format=torch.channels_last_3d) and not xb.is_contiguous())
        return step_forward(self, xb, eps, classes)

    monkeypatch.setattr(gen_mod._AutoencoderStep, "forward", spy)
    gen_mod._train_autoencoder(ae, x, cfg, gen_mod.setup_runtime(cfg), seed=0, ckpt=tmp_path / "ae.pt",
                               progress=False)
    assert seen == [True]
    conv_weights = [p for p in ae.ae.parameters() if p.ndim == 5]
    assert conv_weights and all(p.is_contiguous() for p in conv_weights)
    assert any(not torch.equal(before[k], v) for k, v in ae.ae.state_dict().items())


def test_autoencoder_lr_schedule_is_checked():
    from synthlearn.models.autoencoder import AutoencoderConfig

    with pytest.raises(ValueError, match="lr_schedule must be poly or constant, found 'cosine'"):
        AutoencoderConfig(lr_schedule="cosine")


def _tumour_contrast(images, seg):
    """Per sequence: mean z-score (over the brain) inside the tumour minus outside it."""
    import numpy as np

    brain, tumour = np.any(images != 0, axis=0), seg > 0
    out = []
    for c in range(4):
        v = images[c][brain]
        z = (images[c] - v.mean()) / v.std()
        out.append(float(z[tumour].mean() - z[brain & ~tumour].mean()))
    return np.asarray(out)


def test_generator_input_keeps_the_tumour_contrast_the_task_model_sees(tiny_study):
    """The generator sees each case as the task models do (z-scored at the case's own resolution, then fitted
    to the grid); fitting raw intensities first blends the brain's edge with the zero background and shifts
    and shrinks the tumour's contrast (-0.74 -> -0.18 SD in T1 on the default phantom)."""
    import numpy as np

    from synthlearn.data.io import read_case
    from synthlearn.data.layouts import open_study
    from synthlearn.data.preprocess import PreprocessConfig, preprocess_case
    from synthlearn.generators.ldm.data import load_site_tensors

    cfg = dataclasses.replace(load_generator_config(CONFIGS / "generator_tiny.toml"), shape=(16, 16, 16),
                              latent_shape=(4, 4, 4))  # a coarser grid than the 32^3 cases: they are resampled
    cases = open_study(tiny_study).site("tcga").cases[:3]
    data = load_site_tensors(tuple(cases), cfg)
    for case, x in zip(cases, data.x.numpy()):
        arrays = read_case(case)
        task_images, task_seg = preprocess_case(arrays.images, arrays.seg, PreprocessConfig(shape=(16, 16, 16)))
        seg = (x[4] > 0.5).astype(np.int64)
        np.testing.assert_array_equal(seg, task_seg > 0)
        raw_images, _ = preprocess_case(arrays.images, arrays.seg, PreprocessConfig(shape=(16, 16, 16), zscore=False))
        expected, found = _tumour_contrast(task_images, task_seg), _tumour_contrast(x[:4], seg)
        assert np.abs(found - expected).max() < 0.05, (case.case_id, found, expected)
        assert np.abs(_tumour_contrast(raw_images, task_seg) - expected).max() > 0.05  # the check can tell them apart


def test_latent_tumour_map_follows_encode_sites_order_and_weighted_mse_normalises():
    from synthlearn.models.diffusion import DiffusionConfig
    from synthlearn.generators.ldm.stages import latent_tumour_map, weighted_mse

    x = torch.zeros(2, 5, 16, 16, 16)
    x[0, 4, 0:3, 4:6, 4:6] = 1.0  # case 0: a tumour on the low-x side (a corner of latent voxel x=0)
    tmap = latent_tumour_map(x, (4, 4, 4), flips=True)
    assert tmap.shape == (4, 1, 4, 4, 4)
    assert tmap[0, 0, 0].sum() == 1 and tmap[0].sum() == 1  # the pooled corner counts
    assert tmap[1].sum() == 0 and tmap[3].sum() == 0  # case 1 has no tumour, nor has its flipped copy
    assert tmap[2, 0, 3].sum() == 1 and tmap[2].sum() == 1  # the flipped copy of case 0: the high-x side
    pred, target = torch.zeros(4, 2, 4, 4, 4), torch.full((4, 2, 4, 4, 4), 0.5)
    w = 1.0 + 4.0 * tmap
    assert float(weighted_mse(pred, target, w)) == pytest.approx(0.25)  # uniform error: the plain mean
    assert float(weighted_mse(pred, target, None)) == pytest.approx(0.25)
    pred[0, :, 0, 1, 1] = 0.5  # fix the error at the tumour position only
    assert float(weighted_mse(pred, target, w)) < float(weighted_mse(pred, target, None))
    with pytest.raises(ValueError, match="tumour_weight"):
        DiffusionConfig(tumour_weight=0.0)
    with pytest.raises(ValueError, match="tumour_weighting"):
        DiffusionConfig(tumour_weighting="x")
    with pytest.raises(ValueError, match="latent_scaling"):
        DiffusionConfig(latent_scaling="x")


def test_case_tumour_weighting_gives_every_tumour_the_same_total():
    from synthlearn.generators.ldm.stages import latent_tumour_map

    x = torch.zeros(3, 5, 16, 16, 16)
    x[0, 4, 0:8, 0:8, 0:8] = 1.0   # a large tumour: 8 latent positions of a 4^3 grid
    x[1, 4, 0:2, 0:2, 0:2] = 1.0   # a small one: 1 position
    touched = latent_tumour_map(x, (4, 4, 4), flips=False)
    assert touched.flatten(1).sum(1).tolist() == [8.0, 1.0, 0.0]
    case = latent_tumour_map(x, (4, 4, 4), flips=False, mode="case")
    totals = case.flatten(1).sum(1)
    assert totals[0] == pytest.approx(4.5) and totals[1] == pytest.approx(4.5) and totals[2] == 0  # mean of 8 and 1
    assert torch.equal(case > 0, touched > 0)  # the same positions
    with pytest.raises(ValueError, match="mode"):
        latent_tumour_map(x, (4, 4, 4), flips=False, mode="x")


def test_diffusion_trains_with_a_tumour_weighted_loss_and_checks_the_map(tmp_path):
    from synthlearn.models.diffusion import ClassConditionedUNet
    from synthlearn.generators.ldm.stages import _train_diffusion

    cfg = load_generator_config(CONFIGS / "generator_tiny.toml")
    dcfg = dataclasses.replace(cfg.diffusion, channels=(8, 8), attention_levels=(False, True), num_head_channels=4,
                               norm_num_groups=4, cross_attention_dim=8, epochs=1, batch_size=2, tumour_weight=5.0)
    cfg = dataclasses.replace(cfg, diffusion=dcfg)
    torch.manual_seed(0)
    model = ClassConditionedUNet(dcfg, latent_channels=2, num_classes=2)
    mu, sigma = torch.randn(4, 2, 4, 4, 4), torch.full((4, 2, 4, 4, 4), 0.01)
    classes = torch.tensor([0, 1, 0, 1])
    tumour = torch.zeros(4, 1, 4, 4, 4)
    tumour[:, :, 1:3, 1:3, 1:3] = 1.0
    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    history, _ = _train_diffusion(model, mu, sigma, classes, 1.0, cfg, rt, seed=0, ckpt=tmp_path / "d.pt",
                                  progress=False, tumour=tumour)
    assert len(history["mse"]) == 1 and history["mse"][0] > 0
    with pytest.raises(ValueError, match="tumour map"):
        _train_diffusion(model, mu, sigma, classes, 1.0, cfg, rt, seed=0, ckpt=tmp_path / "e.pt", progress=False,
                         tumour=tumour[:, :, :2])


def test_filled_background_has_no_step_at_the_brain_edge_and_a_brain_channel(tiny_study):
    """``background = "filled"``: outside the brain each sequence holds the nearest brain voxel's value, a sixth
    channel is the brain mask, and inside the brain nothing changes."""
    import numpy as np

    from synthlearn.data.layouts import open_study
    from synthlearn.synthesis.cases import postprocess_sample
    from synthlearn.generators.ldm.data import fill_background, load_site_tensors

    cfg = load_generator_config(CONFIGS / "generator_tiny.toml")
    filled_cfg = dataclasses.replace(cfg, background="filled")
    assert (cfg.channels, filled_cfg.channels) == (5, 6)
    cases = tuple(open_study(tiny_study).site("tcga").cases[:2])
    zero, filled = load_site_tensors(cases, cfg).x.numpy(), load_site_tensors(cases, filled_cfg).x.numpy()
    assert filled.shape[1] == 6
    for z, f in zip(zero, filled):
        brain = (z[:4] > 0).any(0)
        np.testing.assert_array_equal(f[5] > 0.5, brain)
        np.testing.assert_array_equal(f[:5][:, brain], z[:5][:, brain])
        assert (f[:4][:, ~brain] >= 0.2).all()  # no voxel of the background at 0: no edge to draw
        np.testing.assert_array_equal(f[4], z[4])
        case = postprocess_sample(f)  # the brain comes from the sixth channel, the background is 0 again
        np.testing.assert_array_equal(case.images.any(0), brain)
        assert case.tumour_voxels == int((z[4] > 0.5).sum())
    img = np.zeros((1, 5, 1, 1), np.float32)
    img[0, 1:3, 0, 0] = [3.0, 7.0]
    out = fill_background(img, img[0] > 0)
    assert out[0, :, 0, 0].tolist() == [3.0, 3.0, 7.0, 7.0, 7.0]
    with pytest.raises(ValueError, match="background"):
        dataclasses.replace(cfg, background="x")
