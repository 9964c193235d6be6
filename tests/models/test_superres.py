"""Stage 2: an untrained module is the identity, and at inference its UNet is not run."""

import torch

from synthlearn.models.superres import SuperResConfig, SuperResolution


def test_untrained_module_is_the_identity_and_skips_the_unet(monkeypatch):
    sr = SuperResolution(SuperResConfig(channels=(4, 8), norm_num_groups=4), (8, 8, 8)).eval()
    x = torch.rand(1, 5, 8, 8, 8)
    calls = []
    monkeypatch.setattr(sr.unet, "forward", lambda t: calls.append(1) or torch.zeros(t.shape[0], 4, *t.shape[2:]))
    with torch.no_grad():
        assert torch.equal(sr(x), x)
    assert not calls  # nothing to refine: the UNet is not run
    assert torch.equal(sr(x), x) and calls  # with gradients (training) it runs, and its zero head adds nothing
    torch.nn.init.constant_(sr.head.bias, 0.5)
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(sr(x), x + 0.5)
    assert calls
