"""FullKalman: the dense EKF against a hand-written one, LoKO as its diagonal, guards and checkpoints."""

import io

import pytest
import torch
from test_loko import data, dense_ekf_step, flat_params, tiny

from kalmanopt import FullKalman

from conftest import diagonal_loko as LoKO


@pytest.mark.parametrize("observation,noise", [("softmax", "moment"), ("logits", "fixed"), ("loss", "fixed")])
def test_matches_hand_written_ekf_over_several_steps(observation, noise):
    model, ref = tiny(), tiny()
    opt = FullKalman(model.parameters(), p0=0.2, r0=0.3, observation=observation, noise=noise)
    n = flat_params(model).numel()
    P = 0.2 * torch.eye(n, dtype=torch.float64)
    for k in range(4):
        x, y = data(k)
        m = 1 if observation == "loss" else 6
        R = None if noise == "moment" else (0.3 + 1e-3) * torch.eye(m, dtype=torch.float64)
        theta, P, _ = dense_ekf_step(ref, x, y, P, observation=observation, R=R)
        P = 0.5 * (P + P.T)
        with torch.no_grad():
            i = 0
            for p in ref.parameters():
                p.copy_(theta[i:i + p.numel()].view(p.shape))
                i += p.numel()
        opt.step(lambda x=x: model(x), y)
        torch.testing.assert_close(flat_params(model), theta, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(opt.covariance(), P, rtol=1e-7, atol=1e-9)


def test_loko_is_the_diagonal_of_its_first_step():
    model_full, model_diag = tiny(), tiny()
    x, y = data()
    full = FullKalman(model_full.parameters(), p0=0.1)
    diag = LoKO(model_diag.parameters(), p0=0.1, variance_update="fd", p_min=0.0)
    full.step(lambda: model_full(x), y)
    diag.step(lambda: model_diag(x), y)
    torch.testing.assert_close(flat_params(model_full), flat_params(model_diag), rtol=1e-7, atol=1e-9)
    p = torch.cat([diag.state[q]["p"].reshape(-1) for q in model_diag.parameters()])
    torch.testing.assert_close(torch.diagonal(full.covariance()), p, rtol=1e-7, atol=1e-9)


def test_layer_slices_cover_P():
    model = tiny()
    opt = FullKalman(model.parameters())
    slices = opt.layer_slices()
    assert [s.stop - s.start for s in slices] == [p.numel() for p in model.parameters()]
    assert slices[-1].stop == flat_params(model).numel()


def test_refuses_huge_models():
    with pytest.raises(ValueError, match="max_params"):
        FullKalman(torch.nn.Linear(200, 200).parameters())


def test_nan_output_skips():
    model = tiny()
    opt = FullKalman(model.parameters())
    x, y = data()
    opt.step(lambda: model(x), y)
    P, theta = opt.covariance().clone(), flat_params(model)
    opt.step(lambda: model(x) * float("nan"), y)
    assert torch.equal(P, opt.covariance()) and torch.equal(theta, flat_params(model))
    assert opt.skipped_steps == 1


def test_state_dict_round_trip():
    model = tiny()
    opt = FullKalman(model.parameters(), noise="ema", observation="softmax")
    for k in range(3):
        x, y = data(k)
        opt.step(lambda x=x: model(x), y)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    opt2 = FullKalman(model.parameters(), noise="ema", observation="softmax")
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.covariance(), opt.covariance())
    x, y = data(5)
    a = tiny()
    a.load_state_dict(model.state_dict())
    opt3 = FullKalman(a.parameters(), noise="ema", observation="softmax")
    opt3.load_state_dict(sd)
    opt.step(lambda: model(x), y)
    opt3.step(lambda: a(x), y)
    assert torch.equal(flat_params(a), flat_params(model))


def test_block_shares_of_the_covariance_experiment():
    from kalmanopt.bench.covariance import block_shares

    P = torch.tensor([[4.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    shares = block_shares(P, [slice(0, 1), slice(1, 2), slice(2, 3)], [slice(0, 2), slice(2, 3)])
    total = 16 + 1 + 1 + 1 + 1 + 1 + 1
    assert shares["diagonal"] == pytest.approx(18 / total)
    assert shares["tensor_blocks"] == pytest.approx(18 / total)
    assert shares["layer_blocks"] == pytest.approx(20 / total)
