"""The tumour refiner's pieces: config checks, crops around the tumour, pasting back, conditioning augmentation."""

import pytest
import torch

from synthlearn.models.refiner import (
    RefinerConfig,
    TumourRefiner,
    augment_condition,
    paste_residuals,
    take_crops,
    tumour_corners,
)


@pytest.mark.parametrize("kwargs, match", [({"crop": (18, 16, 16), "channels": (16, 32, 64)}, "divisible"),
                                           ({"crop": (2, 16, 16)}, ">= 4"),
                                           ({"channels": (16,)}, "at least 2"),
                                           ({"channels": (12, 16)}, "norm_num_groups"),
                                           ({"sample_level": 1.5}, "sample_level"),
                                           ({"steps": 0}, "steps"),
                                           ({"jitter": -1}, "jitter"),
                                           ({"schedule": "sigmoid"}, "schedule")])
def test_config_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefinerConfig(**kwargs)


def _cases_with_tumour(centres, shape=(32, 32, 32)):
    x = torch.zeros(len(centres), 5, *shape)
    for i, (cx, cy, cz) in enumerate(centres):
        x[i, 4, cx - 1 : cx + 2, cy - 1 : cy + 2, cz - 1 : cz + 2] = 1.0
    return x


def test_crops_centre_on_the_tumour_and_stay_inside_the_case():
    x = _cases_with_tumour([(16, 16, 16), (1, 30, 10)])
    corners = tumour_corners(x, (8, 8, 8))
    assert corners.tolist() == [[12, 12, 12], [0, 24, 6]]  # centred; clipped at the case's faces
    crops = take_crops(x, corners, (8, 8, 8))
    assert crops.shape == (2, 5, 8, 8, 8)
    assert crops[:, 4].sum(dim=(1, 2, 3)).tolist() == [27.0, 27.0]  # each tumour whole inside its crop

    no_tumour = torch.zeros(1, 5, 32, 32, 32)
    assert tumour_corners(no_tumour, (8, 8, 8)).tolist() == [[12, 12, 12]]  # the case's centre
    faint = no_tumour.clone()
    faint[0, 4, 2:5, 2:5, 2:5] = 0.3  # below the 0.5 threshold: the soft mask still places the crop
    assert tumour_corners(faint, (8, 8, 8)).tolist() == [[0, 0, 0]]
    g = torch.Generator().manual_seed(0)
    jittered = tumour_corners(_cases_with_tumour([(16, 16, 16)] * 50), (8, 8, 8), jitter=2, generator=g)
    assert jittered.min() >= 10 and jittered.max() <= 14 and len(set(map(tuple, jittered.tolist()))) > 1
    with pytest.raises(ValueError, match="larger than the case grid"):
        tumour_corners(x, (40, 8, 8))


def test_paste_adds_the_residual_with_a_taper_inside_the_case_only():
    x = torch.zeros(2, 5, 16, 16, 16)
    corners = torch.tensor([[4, 4, 4], [0, 0, 0]])
    out = paste_residuals(x, torch.ones(2, 5, 8, 8, 8), corners, taper=2)
    inner = out[0, :, 4:12, 4:12, 4:12]
    assert torch.allclose(inner[:, 2:6, 2:6, 2:6], torch.ones(5, 4, 4, 4))  # full weight away from the faces
    assert 0 < float(inner[0, 0, 4, 4]) < float(inner[0, 1, 4, 4]) < 1  # faded toward the crop's faces
    assert float(out[0, 0, 3, 8, 8]) == 0 and float(out[0, 0, 12, 8, 8]) == 0  # nothing outside the crop
    assert float(out[1, 0, 0, 0, 0]) == 1.0  # no fading at the case's own faces
    assert float(out[1, 0, 7, 7, 7]) < 1.0  # but at the faces inside the case
    assert torch.equal(paste_residuals(x, torch.zeros(2, 5, 8, 8, 8), corners, 2), x)
    assert torch.equal(x, torch.zeros(2, 5, 16, 16, 16))  # the input is not changed in place


def test_conditioning_augmentation_grows_with_its_level():
    cfg = RefinerConfig(condition_blur=1.0, condition_noise=0.1)
    crops = torch.zeros(3, 5, 8, 8, 8)
    crops[:, :, 4, 4, 4] = 1.0
    g = torch.Generator().manual_seed(0)
    out = augment_condition(crops, torch.tensor([0.0, 0.5, 1.0]), cfg, g)
    assert torch.equal(out[0], crops[0])  # level 0: as decoded
    peaks = [float(out[i, 0, 4, 4, 4]) for i in range(3)]
    assert peaks[0] > peaks[1] > peaks[2]  # more blur
    background = [float((out[i] - crops[i]).abs()[:, 0, 0, 0].mean()) for i in range(3)]
    assert background[0] == 0 < background[1]


def test_network_maps_a_noisy_residual_to_its_shape():
    cfg = RefinerConfig(channels=(8, 16))
    net = TumourRefiner(cfg, channels=5, num_classes=2)
    x = torch.randn(2, 5, 16, 16, 16)
    out = net(x, torch.tensor([3, 900]), torch.rand(2, 5, 16, 16, 16), torch.tensor([0.0, 1.0]), torch.tensor([0, 2]))
    assert out.shape == x.shape
    assert float(net.residual_scale) == 1.0 and "residual_scale" in net.state_dict()
