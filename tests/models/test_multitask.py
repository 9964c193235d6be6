"""The multi-task UNet of Ren et al.: shapes in 2D and 3D, the paper's widths, refusals."""

import pytest
import torch

from synthlearn.models.multitask import MultiTaskUNet


@pytest.mark.parametrize("dims", [2, 3])
def test_segmentation_logits_and_one_logit_vector_per_head(dims):
    net = MultiTaskUNet(dims, in_channels=2, seg_classes=4, head_classes=(2, 3), channels=(8, 8, 16), norm_num_groups=4)
    x = torch.randn(3, 2, *([16] * dims))
    seg, heads = net.forward_all(x)
    assert seg.shape == (3, 4, *([16] * dims)) and [h.shape for h in heads] == [(3, 2), (3, 3)]
    assert torch.equal(net(x), seg)  # forward: the segmentation alone (what the segmentation tools read)


def test_paper_widths_give_three_down_samplings_and_the_heads_read_the_bottleneck():
    net = MultiTaskUNet(3, head_classes=(2, 2, 2, 3))
    assert net.divisor == 8 and net.branch[0].in_features == 128
    x = torch.zeros(1, 4, 16, 16, 16, requires_grad=True)
    _, heads = net.forward_all(x)
    heads[0].sum().backward()
    assert all(p.grad is None for p in net.seg_head.parameters())  # the heads do not pass through the decoder


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        MultiTaskUNet(3, channels=(8, 8, 16), norm_num_groups=4)(torch.zeros(1, 4, 10, 16, 16))
    with pytest.raises(ValueError, match="5D"):
        MultiTaskUNet(3, channels=(8, 16), norm_num_groups=4)(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="heads of >= 2 classes"):
        MultiTaskUNet(3, head_classes=(1,))
