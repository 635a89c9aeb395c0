"""Fresh random inputs per test, reproducible on demand.

Every test gets its own seed, drawn from the OS unless FASTKD_TEST_SEED is set. The seed is printed in the
report of a failing test, so ``FASTKD_TEST_SEED=<seed> pytest <test id>`` replays it exactly.
"""

import os
import secrets

import torch

# Triton reads TRITON_INTERPRET when it is first imported: without a GPU, the Triton kernels run on CPU
# tensors through its interpreter. Set before fastkd (which imports triton) is imported by any test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded freshly for this test (use ``helpers.randn(..., generator=gen)``)."""
    seed = int(os.environ.get("FASTKD_TEST_SEED", secrets.randbits(63)))
    request.node.user_properties.append(("seed", seed))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [value for key, value in item.user_properties if key == "seed"]
        if seeds:
            report.sections.append(("seed", f"FASTKD_TEST_SEED={seeds[0]} replays this test"))
