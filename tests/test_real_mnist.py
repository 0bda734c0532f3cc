"""On the real MNIST (../shared/data): the files, and the zero-variance hazard of the black pixels."""

import hashlib

import torch
import torch.nn.functional as F

from bnrnn.data.mnist import FILES, load_mnist, to_sequences
from bnrnn import BNLSTM
from bnrnn.nn import SequenceClassifier

MD5 = {  # torchvision's published checksums
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


def test_real_files_load_with_the_published_shapes(real_data):
    for name in FILES.values():
        assert hashlib.md5((real_data / "MNIST" / "raw" / name).read_bytes()).hexdigest() == MD5[name]
    arrays = load_mnist(real_data, allow_download=False)
    assert arrays.train_images.shape == (60000, 28, 28) and arrays.test_images.shape == (10000, 28, 28)
    assert arrays.train_labels[:5].tolist() == [5, 0, 4, 1, 9]


def first_update_gradient_norm(real_data, h0_noise):
    torch.manual_seed(0)
    arrays = load_mnist(real_data, allow_download=False)
    x = to_sequences(arrays.train_images[:100]).t().unsqueeze(-1).contiguous()
    y = arrays.train_labels[:100]
    model = SequenceClassifier(BNLSTM(1, 32, max_steps=784, learn_initial_state=True, h0_noise=h0_noise), 10).train()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).norm()


def test_black_leading_pixels_make_the_first_gradient_overflow_without_h0_noise(real_data):
    assert not torch.isfinite(first_update_gradient_norm(real_data, h0_noise=0.0))
    norm = first_update_gradient_norm(real_data, h0_noise=0.1)
    assert torch.isfinite(norm) and norm < 1e3
