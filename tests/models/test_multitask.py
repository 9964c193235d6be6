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


@pytest.mark.parametrize("pool, branch_in", [("global", 128), ("tumour", 128 + 64 + 32 + 16)])
def test_paper_widths_give_three_down_samplings_and_the_heads_read_the_bottleneck(pool, branch_in):
    torch.manual_seed(0)
    net = MultiTaskUNet(3, head_classes=(2, 2, 2, 3), pool=pool)
    assert net.divisor == 8 and net.branch[0].in_features == branch_in
    x = torch.randn(1, 4, 16, 16, 16)
    _, heads = net.forward_all(x)
    heads[0].sum().backward()
    assert all(p.grad is None for p in net.seg_head.parameters())  # the heads never train the segmentation head
    decoder_grad = net.decoder[-1][0].conv.weight.grad
    assert (decoder_grad is not None and decoder_grad.abs().sum() > 0) == (pool == "tumour")


def test_tumour_pooling_reads_the_features_where_the_network_draws_the_tumour():
    torch.manual_seed(0)
    net = MultiTaskUNet(3, head_classes=(2,), channels=(8, 16), norm_num_groups=4, pool="tumour").eval()
    seen = {}
    net.branch.register_forward_hook(lambda module, args, out: seen.update(x=args[0]))
    net.decoder[-1].register_forward_hook(lambda module, args, out: seen.update(feat=out))
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        net.seg_head.weight.zero_()
        for tumour, bias in ((False, [0.0, -30.0, -30.0, -30.0]), (True, [-30.0, 0.0, 0.0, 0.0])):
            net.seg_head.bias.copy_(torch.tensor(bias))
            net.forward_all(x)
            level = seen["x"][0, 16:]  # after the bottleneck's 16 global means: the decoder level's tumour mean
            if tumour:  # tumour everywhere: the plain mean of the decoder features
                assert torch.allclose(level, seen["feat"][0].flatten(1).mean(-1), atol=1e-5)
            else:  # no tumour drawn: nothing of the decoder features reaches the heads
                assert level.abs().max() < 1e-6


def test_voxel_heads_give_voxel_logits_and_case_probabilities_over_the_drawn_tumour():
    torch.manual_seed(0)
    net = MultiTaskUNet(3, head_classes=(2, 3), channels=(8, 16), norm_num_groups=4, pool="voxel").eval()
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.no_grad():
        seg, voxels = net.forward_voxels(x)
        assert [v.shape for v in voxels] == [(2, 2, 16, 16, 16), (2, 3, 16, 16, 16)]
        _, cases = net.forward_all(x)
        p = 1.0 - torch.softmax(seg, 1)[:, :1]
        for b in range(2):  # the tumour the network draws (p(background) < 0.5), else its soft tumour probability
            w = (p[b] > 0.5).float() if (p[b] > 0.5).any() else p[b]
            expected = (torch.softmax(voxels[1][b], 0) * w).flatten(1).sum(-1) / w.sum()
            assert torch.allclose(torch.softmax(cases[1][b], 0), expected, atol=1e-5)
        net.seg_head.bias.copy_(torch.tensor([-30.0, 30.0, 0.0, 0.0]))  # tumour everywhere: the plain voxel mean
        _, voxels = net.forward_voxels(x)
        _, cases = net.forward_all(x)
        assert torch.allclose(torch.softmax(cases[0], 1), torch.softmax(voxels[0], 1).flatten(2).mean(-1), atol=1e-5)
    assert net.voxel_heads and not MultiTaskUNet(3, channels=(8, 16), norm_num_groups=4, pool="global").voxel_heads
    with pytest.raises(ValueError, match="forward_voxels needs pool = 'voxel'"):
        MultiTaskUNet(3, channels=(8, 16), norm_num_groups=4, pool="global").forward_voxels(x)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        MultiTaskUNet(3, channels=(8, 8, 16), norm_num_groups=4)(torch.zeros(1, 4, 10, 16, 16))
    with pytest.raises(ValueError, match="5D"):
        MultiTaskUNet(3, channels=(8, 16), norm_num_groups=4)(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="heads of >= 2 classes"):
        MultiTaskUNet(3, head_classes=(1,))
    with pytest.raises(ValueError, match="pool must be one of"):
        MultiTaskUNet(3, pool="max")
