import os
import random

# No GPU here: the Triton kernels run in Triton's interpreter on CPU tensors. triton.jit
# reads this when the kernels are decorated, so it must be set before anything imports
# hiera_kernels. The "triton" backend then runs CPU tensors when asked for by name
# ("auto" never picks it on CPU); tests of the non-interpreted behaviour run in
# subprocesses without it (helpers.without_interpreter).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true", help="also run the slow tests marked 'extended'")


def pytest_configure(config):
    config.addinivalue_line("markers", "extended: slow; runs with --extended or HIERA_KERNELS_EXTENDED_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--extended") or os.environ.get("HIERA_KERNELS_EXTENDED_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="extended test: run with --extended")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield
