import pytest


@pytest.fixture(scope="module")
def hide_gpus():
    """The processes a test starts (DDP ranks, launcher jobs) see no GPU: they train on gloo and the CPU as the
    test's reference does, on a GPU machine too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield
