import math

import torch

from celltally.losses import gaussian_nll, segmentation_loss, total_variation


def test_gaussian_nll_hand_computed():
    pred = torch.tensor([1.0, 2.0])
    target = torch.tensor([2.0, 2.0])
    log_var = torch.tensor([0.0, math.log(4.0)])
    # 0.5 * (1/1) * 1 + 0 ; 0.5 * (1/4) * 0 + 0.5 * log 4  -> mean
    expected = (0.5 + 0.5 * math.log(4.0)) / 2
    assert math.isclose(float(gaussian_nll(pred, target, log_var)), expected, rel_tol=1e-6)


def test_gaussian_nll_minimised_at_true_variance():
    pred = torch.zeros(1)
    target = torch.tensor([3.0])
    grid = torch.linspace(-2, 5, 701)
    losses = [float(gaussian_nll(pred, target, torch.tensor([s]))) for s in grid]
    best = float(grid[int(torch.tensor(losses).argmin())])
    assert math.isclose(best, math.log(9.0), abs_tol=0.01)


def test_beta_nll_weights_by_variance():
    pred, target = torch.zeros(1), torch.ones(1)
    log_var = torch.tensor([math.log(4.0)])
    plain = float(gaussian_nll(pred, target, log_var))
    beta = float(gaussian_nll(pred, target, log_var, beta=0.5))
    assert math.isclose(beta, plain * 2.0, rel_tol=1e-6)  # sigma**(2*0.5) = 2


def test_total_variation_hand_computed():
    image = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    # vertical diffs: [1, 0] -> mean 0.5; horizontal: [1, 0] -> mean 0.5
    assert math.isclose(float(total_variation(image)), 1.0)
    assert float(total_variation(torch.ones(1, 1, 5, 5))) == 0.0


def test_segmentation_loss_sums_levels():
    target = torch.ones(1, 1, 8, 8)
    outs = [
        (torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)),
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)),
    ]
    # level 1: perfect -> 0; level 2: error 1 everywhere -> 0.5; TV 0
    assert math.isclose(float(segmentation_loss(outs, target, tv_weight=1.0)), 0.5)


def test_total_variation_of_a_one_pixel_side_is_finite():
    assert total_variation(torch.ones(1, 1, 1, 1)).item() == 0.0
    row = torch.tensor([[[[0.0, 1.0, 3.0]]]])  # 1 x 3: only horizontal neighbours
    assert total_variation(row).item() == 1.5
    assert total_variation(row.transpose(-1, -2)).item() == 1.5
