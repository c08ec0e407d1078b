"""The device-independent figures of `bench`, on graphs with known traffic."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import hiera_kernels as hk
from hiera_kernels.tools.traffic import bytes_moved, saved_activation_bytes


class BiasGeluLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1000))
        self.fc = nn.Linear(1000, 10)

    def forward(self, x):
        return self.fc(F.gelu(x + self.bias))


def test_byte_counter_counts_everything_but_gemm_and_views():
    model, x = BiasGeluLinear(), torch.randn(4, 1000)
    counter = bytes_moved(lambda: model(x))
    # add: reads x (16000) and the bias (4000), writes 16000; gelu: reads and writes 16000.
    # The Linear's addmm and its weight transpose (a view) count nothing.
    assert counter.by_op == {"aten.add": 36000, "aten.gelu": 32000}
    assert counter.total == 68000


def test_byte_counter_sees_custom_ops_real_tensors():
    x = torch.randn(2, 64, 8)
    counter = bytes_moved(lambda: hk.ops.query_pool(x, 4, backend="cpu"))
    # reads [2, 64, 8] fp32, writes [2, 16, 8] fp32 and a one-byte argmax of that shape
    assert counter.by_op == {"hiera_kernels.query_pool": 2 * 64 * 8 * 4 + 2 * 16 * 8 * 4 + 2 * 16 * 8}


def test_saved_activations_exclude_parameters_and_count_each_storage_once():
    model = BiasGeluLinear()
    x = torch.randn(4, 1000, requires_grad=True)
    assert saved_activation_bytes(model, lambda: x.exp().exp()) == 2 * 16000  # each exp saves its result
    # gelu saves its input (16000); addmm saves its input (16000) and the weight (a parameter)
    assert saved_activation_bytes(model, lambda: model(x)) == 32000
    y = x.exp()
    assert saved_activation_bytes(model, lambda: (y * y).sum()) == 16000  # y saved twice, one storage
