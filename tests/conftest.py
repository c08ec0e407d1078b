import os
import random

import pytest
import torch  # only torch: hiera_kernels must not be imported before the line below

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. triton.jit
# reads this when the kernels are decorated, so it must be set before anything imports
# hiera_kernels. The "triton" backend then runs CPU tensors when asked for by name
# ("auto" never picks it on CPU); tests of the non-interpreted behaviour run in
# subprocesses without it (helpers.without_interpreter). With a GPU the kernels are
# compiled and the Triton tests run on CUDA tensors (test_triton.DEVICE). A
# TRITON_INTERPRET already set is left as it is.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


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
