"""``bnrnn gradflow``: the paper's Fig. 1, gradient flow at initialisation against gamma.

Fig. 1a: on sequential MNIST at initialisation, the norm of the total gradient dL/dh_t of
the classification loss (from the last state) with respect to every hidden state h_t, for
batch-normalised recurrent nets whose gamma starts at 0.1 .. 1.0, with the batch
statistics in the graph as in training. Shown for a BN tanh-RNN (both terms normalised,
as in the BN-LSTM) and for our BN-LSTM.

The paper argues that a large gamma saturates tanh and makes the gradient *vanish* at
early t. Measured here (real MNIST, 100 units, batch 64), gamma = 0.1 keeps the gradient
flowing over all 784 steps, but a large gamma makes it *explode* at early t instead: BN's
backward gain gamma / sigma_t grows where the batch spread sigma_t of W_h h shrinks (the
black leading pixels give every example the same input). Either way only a small gamma
gives usable gradient flow, which is the paper's recommendation.

Fig. 1b: E[tanh'(x)] for x ~ N(0, sigma^2) against sigma, the per-step gain of the
gradient through a tanh whose input has standard deviation sigma (gamma, after BN).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnrnn.data.mnist import load_mnist, to_sequences
from bnrnn.errors import BnrnnError
from bnrnn.nn import LSTMLayer, TimeBatchNorm
from bnrnn.nn.reference import reference_forward

GAMMAS = (0.1, 0.3, 0.5, 0.7, 1.0)


class BNTanhRNN(nn.Module):
    """h_t = tanh(BN(W_h h_{t-1}; gamma) + BN(W_x x_t; gamma) + b): the network of Fig. 1a.

    Parameters: weight_ih (H, I), weight_hh (H, H) orthogonal, bias (H,); h0 = 0.
    """

    def __init__(self, input_size: int, hidden_size: int, max_steps: int, gamma_init: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(nn.init.orthogonal_(torch.empty(hidden_size, input_size)))
        self.weight_hh = nn.Parameter(nn.init.orthogonal_(torch.empty(hidden_size, hidden_size)))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.bn_x = TimeBatchNorm(hidden_size, max_steps, gamma_init)
        self.bn_h = TimeBatchNorm(hidden_size, max_steps, gamma_init)

    def forward(self, x: torch.Tensor, step_hook=None) -> torch.Tensor:
        """x (T, B, I) -> h_T (B, H); ``step_hook(t, h_t)`` sees every state."""
        wx = self.bn_x.forward_sequence(torch.matmul(x, self.weight_ih.t())) + self.bias
        # h0 ~ N(0, 0.1^2) per example: with a shared h0 and the black leading pixels every
        # example would have the same state, zero batch variance, and BN's gain gamma/sqrt(eps)
        # would blow the gradient up before the figure could show anything.
        h = 0.1 * torch.randn(x.shape[1], self.hidden_size)
        for t, wx_t in enumerate(wx.unbind(0)):
            h = torch.tanh(wx_t + self.bn_h(h @ self.weight_hh.t(), t))
            if step_hook is not None:
                step_hook(t, h)
        return h


def hidden_gradient_norms(kind: str, gamma: float, x: torch.Tensor, y: torch.Tensor, hidden: int, seed: int) -> np.ndarray:
    """||dL/dh_t|| for t = 0 .. T-1 at initialisation: (T,) float64.

    kind: "tanh" (BN tanh-RNN) or "lstm" (BN-LSTM, reference path); x (T, B, 1), y (B,).
    """
    torch.manual_seed(seed)
    T = x.shape[0]
    if kind == "tanh":
        rnn = BNTanhRNN(x.shape[2], hidden, T, gamma)
    else:
        # A little h0 noise, as in training: with a shared h0 and black leading pixels the
        # batch variance of W_h h is 0 and BN's gain would make these gradients meaningless.
        rnn = LSTMLayer(x.shape[2], hidden, T, gamma_init=gamma, h0_noise=0.1)
    head = nn.Linear(hidden, 10)
    rnn.train()
    states: list[torch.Tensor] = []

    def keep(t: int, h: torch.Tensor) -> None:
        h.retain_grad()
        states.append(h)

    if kind == "tanh":
        h_last = rnn(x, step_hook=keep)
    else:
        _, (h_last, _) = reference_forward(rnn, x, step_hook=keep)
    nn.functional.cross_entropy(head(h_last), y).backward()
    return np.array([h.grad.norm().item() for h in states])


def expected_tanh_derivative(sigma: np.ndarray, nodes: int = 80) -> np.ndarray:
    """E[1 - tanh(x)^2] for x ~ N(0, sigma^2), by Gauss-Hermite quadrature: same shape as sigma."""
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(-x^2 / 2)
    weights = weights / weights.sum()
    values = 1.0 - np.tanh(np.multiply.outer(sigma, points)) ** 2
    return values @ weights


def plot(norms: dict[str, dict[float, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(next(iter(norms.values())))))
    titles = {"tanh": "Fig. 1a: BN tanh-RNN", "lstm": "BN-LSTM"}
    for ax, (kind, by_gamma) in zip(axes, norms.items()):
        for colour, (gamma, values) in zip(colours, by_gamma.items()):
            shown = np.where(np.isfinite(values), np.maximum(values, 1e-30), np.nan)  # overflowed: a gap
            ax.semilogy(np.arange(len(values)), shown, color=colour, label=f"gamma={gamma}")
        ax.set_title(f"{titles[kind]}: ||dL/dh_t|| at initialisation")
        ax.set_xlabel("t (pixel)")
        ax.set_ylabel("gradient norm")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    sigma = np.linspace(0.01, 3.0, 200)
    axes[2].plot(sigma, expected_tanh_derivative(sigma))
    axes[2].set_title("Fig. 1b: E[tanh'(x)], x ~ N(0, sigma^2)")
    axes[2].set_xlabel("sigma (input standard deviation)")
    axes[2].set_ylabel("expected derivative")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnrnn gradflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="data", help="folder holding MNIST/raw/*.gz (default ./data)")
    parser.add_argument("--download", action="store_true", help="download MNIST if it is missing")
    parser.add_argument("--out", type=Path, default=Path("gradflow"), help="output folder (default ./gradflow)")
    parser.add_argument("--gammas", default=",".join(map(str, GAMMAS)), help="comma-separated initial gammas")
    parser.add_argument("--hidden", type=int, default=100, help="hidden units (paper: 100)")
    parser.add_argument("--batch", type=int, default=64, help="training images in the batch")
    parser.add_argument("--steps", type=int, default=784, help="pixels per sequence (<= 784)")
    parser.add_argument("--seed", type=int, default=1)
    opts = parser.parse_args(argv)
    try:
        gammas = [float(g) for g in opts.gammas.split(",")]
    except ValueError:
        parser.error(f"--gammas '{opts.gammas}' is not a comma-separated list of numbers")
    if not all(g > 0 for g in gammas) or not 1 <= opts.steps <= 784 or opts.hidden < 1 or opts.batch < 2:
        parser.error("gammas must be positive, 1 <= --steps <= 784, --hidden >= 1 and --batch >= 2")
    try:
        arrays = load_mnist(opts.data_root, allow_download=opts.download)
    except BnrnnError as exc:
        print(f"bnrnn: error: {exc}", file=sys.stderr)
        return 2
    x = to_sequences(arrays.train_images[: opts.batch])[:, : opts.steps].t().unsqueeze(2).contiguous()
    y = arrays.train_labels[: opts.batch].long()
    norms = {kind: {g: hidden_gradient_norms(kind, g, x, y, opts.hidden, opts.seed) for g in gammas}
             for kind in ("tanh", "lstm")}
    opts.out.mkdir(parents=True, exist_ok=True)
    plot(norms, opts.out / "gradflow.png")
    summary = {kind: {str(g): {"t0": v[0], "t_mid": v[len(v) // 2], "t_last": v[-1]} for g, v in by_gamma.items()}
               for kind, by_gamma in norms.items()}
    (opts.out / "gradflow.json").write_text(json.dumps(summary, indent=2))
    print("| gamma | tanh-RNN ||dL/dh_0|| | tanh-RNN ||dL/dh_T|| | BN-LSTM ||dL/dh_0|| | BN-LSTM ||dL/dh_T|| |")
    print("|---:|---:|---:|---:|---:|")
    for g in gammas:
        t, lstm = norms["tanh"][g], norms["lstm"][g]
        print(f"| {g} | {t[0]:.3e} | {t[-1]:.3e} | {lstm[0]:.3e} | {lstm[-1]:.3e} |")
    print(f"figure: {opts.out / 'gradflow.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
