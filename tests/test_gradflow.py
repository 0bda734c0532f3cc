"""Fig. 1: gradient flow at initialisation against gamma, and E[tanh'(x)]."""

import numpy as np
import pytest
import torch

from bnrnn.data.mnist import load_mnist, to_sequences
from bnrnn.gradflow import expected_tanh_derivative, hidden_gradient_norms, main


def test_expected_tanh_derivative_matches_monte_carlo_and_falls_with_the_spread():
    sigma = np.array([1e-3, 0.5, 1.0, 2.0, 3.0])
    values = expected_tanh_derivative(sigma)
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0)).double()
    monte_carlo = [(1 - torch.tanh(s * z) ** 2).mean().item() for s in sigma]
    np.testing.assert_allclose(values, monte_carlo, atol=2e-3)
    assert values[0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(values) < 0)


def test_small_gamma_keeps_the_gradient_flowing_and_large_gamma_does_not(real_data):
    """Real sequential MNIST, 784 steps, the paper's 100 units. gamma = 0.1: ||dL/dh_t|| stays
    within a factor 1000 over all 784 steps (measured: 190). gamma = 1.0: at t = 0 it is over 1e6 times larger
    (or overflows), i.e. it explodes where the paper's Fig. 1a shows vanishing; see gradflow.py."""
    arrays = load_mnist(real_data, allow_download=False)
    x = to_sequences(arrays.train_images[:64]).t().unsqueeze(2).contiguous()
    y = arrays.train_labels[:64].long()
    small = hidden_gradient_norms("tanh", 0.1, x, y, 100, seed=1)
    large = hidden_gradient_norms("tanh", 1.0, x, y, 100, seed=1)
    assert np.all(np.isfinite(small)) and small.max() / small.min() < 1000
    assert not np.isfinite(large[0]) or large[0] > 1e6 * small[0]
    # Near the loss both see the same gradient: the difference is built up by the recurrence.
    assert large[-1] == pytest.approx(small[-1], rel=0.05)


def test_gradflow_command_writes_the_figure_and_the_table(fake_mnist, tmp_path, capsys):
    status = main(["--data-root", str(fake_mnist), "--out", str(tmp_path / "gf"), "--gammas", "0.1,1.0",
                   "--hidden", "8", "--batch", "8", "--steps", "40"])
    assert status == 0
    assert (tmp_path / "gf" / "gradflow.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "| 0.1 |" in out and "| 1.0 |" in out


def test_gradflow_without_data_is_one_sentence(tmp_path, capsys):
    assert main(["--data-root", str(tmp_path / "nothing"), "--out", str(tmp_path / "gf")]) == 2
    assert "MNIST not found" in capsys.readouterr().err
