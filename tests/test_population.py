"""Population statistics after training: re-estimation and the batch-statistics mode, each an
explicit argument of the forward (bnrnn.nn.norms.Statistics)."""

import torch

from bnrnn.nn import LSTMLayer
from bnrnn.nn.norms import Statistics
from bnrnn.nn.population import reestimate_population_statistics


def make_layer(**kwargs) -> LSTMLayer:
    torch.manual_seed(0)
    return LSTMLayer(3, 5, max_steps=4, momentum=0.3, **kwargs)


def batch_stats_per_step(layer: LSTMLayer, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, var) of W_h h_{t-1} at each step, recomputed naively from the hidden states."""
    with torch.no_grad():
        output, _ = layer(x, stats=Statistics.BATCH)
        h_prev = torch.cat([layer.h0.expand(1, x.shape[1], -1), output[:-1]])
        wh = h_prev @ layer.weight_hh.t()
        return [(wh[t].mean(0), wh[t].var(0, unbiased=False)) for t in range(x.shape[0])]


def test_reestimation_is_the_plain_average_of_batch_statistics():
    layer = make_layer()
    batches = [torch.randn(6, 8, 3) for _ in range(3)]  # 6 steps > T_max = 4
    layer.eval()
    expected = [batch_stats_per_step(layer, x) for x in batches]
    used = reestimate_population_statistics(layer, batches, lambda m, x, stats: m(x, stats=stats))
    assert used == 3
    for t in range(4):
        mean = torch.stack([e[t][0] for e in expected]).mean(0)
        var = torch.stack([e[t][1] for e in expected]).mean(0)
        torch.testing.assert_close(layer.norm_h.running_mean[t], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.norm_h.running_var[t], var, rtol=1e-5, atol=1e-6)
    assert layer.norm_h.num_batches_tracked.tolist() == [3, 3, 3, 3]
    assert layer.norm_h.momentum == 0.3 and not layer.training and not layer.norm_h.training
    # and a training forward after it goes on with the EMA
    before = layer.norm_h.running_mean[0].clone()
    layer.train()(batches[0])
    torch.testing.assert_close(layer.norm_h.running_mean[0], 0.7 * before + 0.3 * expected[0][0][0], rtol=1e-5,
                               atol=1e-6)


def test_batch_statistics_mode_equals_training_mode_without_touching_the_population():
    layer = make_layer()  # h0_noise 0: training mode is deterministic
    x = torch.randn(6, 8, 3)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    out_batch, _ = layer(x, stats=Statistics.BATCH)
    population, _ = layer(x)
    torch.testing.assert_close(layer(x, stats=Statistics.POPULATION)[0], population)  # eval()'s default
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    layer.train()
    out_train, _ = layer(x)
    torch.testing.assert_close(out_batch, out_train)
    assert not torch.allclose(out_batch, population)
