import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # CUDA tests skip at run time (never query the GPU at import time: collection must work on CPU machines).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """A test not marked ``cuda`` belongs to the CPU suite that CI runs, and runs on the CPU on a GPU machine too:
    device "auto", make_loader's default device and every child process would otherwise pick the GPU, and these
    tests' expectations (bit-exact resumes, fp32 tolerances, no device-memory columns, one process per rank on
    one card) are the CPU's. The GPU's own behaviour is what the ``cuda`` tests check."""
    if "cuda" in request.keywords or not torch.cuda.is_available():
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # child processes see no GPU


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A suite whose process hangs at exit (a child that ignores terminate(), a thread joined for ever) fails in
    minutes with every thread's stack on stderr, instead of holding CI until its own limit (stop 23: 90 min)."""
    import faulthandler
    import os
    import sys

    seconds = float(os.environ.get("SDMP_TEST_EXIT_WATCHDOG_S", "180"))
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)


@pytest.fixture
def run_script(tmp_path):
    """``run_script(text, *args, timeout=) -> (returncode, stdout, stderr)``: the script run by this Python in a
    session of its own, from the repository root. Whatever it leaves behind (a hung child, a stuck DataLoader
    worker, which would also hold the output pipes open) is killed with its process group."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    def run(text: str, *args: str, timeout: float):
        script = tmp_path / "script.py"
        script.write_text(text)
        proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode, out, err

    return run
