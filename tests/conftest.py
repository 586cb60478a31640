import pytest


@pytest.fixture(scope="module")
def hide_gpus():
    """The processes a test starts (DDP ranks, launcher jobs) see no GPU: they train on gloo and the CPU as the
    test's reference does, on a GPU machine too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


@pytest.fixture
def busy_loop():
    """A competing process: a Python busy loop, on whatever core the scheduler gives it (the other one of two),
    for the test's duration."""
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # started and spinning
    yield process
    process.kill()
    process.wait()
