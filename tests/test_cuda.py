"""The CUDA path (run with `pytest -m gpu` on a machine with a GPU): same numbers as on CPU's reference."""

import copy

import pytest
import torch

from bnrnn.nn import BNLSTM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("switches", [(True, True, True), (True, False, False), (False, False, False)])
def test_fused_path_on_cuda_matches_the_reference_on_cuda(switches):
    torch.manual_seed(0)
    fast = BNLSTM(3, 32, max_steps=20, bn_x=switches[0], bn_h=switches[1], bn_c=switches[2]).cuda().train()
    ref = copy.deepcopy(fast)
    ref.fused = False
    x = torch.randn(25, 16, 3, device="cuda")
    state = (torch.randn(16, 32, device="cuda"), torch.randn(16, 32, device="cuda"))
    outs = []
    for layer in (fast, ref):
        out, (h, c) = layer(x, state)
        (out.square().sum() + c.sum()).backward()
        outs.append((out, c, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
    for name, grad in outs[1][2].items():
        torch.testing.assert_close(outs[0][2][name], grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    for (name, a), (_, b) in zip(fast.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    fast.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)


def test_cuda_bench_runs_and_passes_its_numerics_check(capsys):
    from bnrnn import bench

    assert bench.main(["--device", "cuda", "--shape", "50,3,64,32", "--repeats", "2", "--warmup", "1"]) == 0
    assert "| 50,3,64,32 | BN-LSTM |" in capsys.readouterr().out
