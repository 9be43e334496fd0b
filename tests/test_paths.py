"""sdmp_fast.paths: output files written whole, and the locks that keep two commands off one output."""
import os
import subprocess
import sys
import threading
import time

import pytest

from sdmp_fast.paths import LockHeld, lock_exclusive, release_removing, sibling_lock_path

HOLDER = ("import sys\nfrom sdmp_fast.paths import lock_exclusive, release_removing\n"
          "fh = lock_exclusive(sys.argv[1])\nprint('held', flush=True)\nsys.stdin.readline()\n"
          "release_removing(fh)\n")


def test_sibling_lock_is_a_hidden_file_beside_the_output(tmp_path):
    assert sibling_lock_path(str(tmp_path / "train.beton")) == str(tmp_path / ".train.beton.lock")
    assert sibling_lock_path("data/set") == os.path.join(os.path.abspath("data"), ".set.lock")


@pytest.mark.timeout(60)
def test_a_waiter_on_a_lock_removed_by_its_holder_locks_the_file_now_there(tmp_path):
    """The holder removes the lock file as it releases it: a process that was waiting got the lock of the removed
    file, which guards nothing (a newcomer creates and locks a new one): it must lock the file at the path."""
    path = str(tmp_path / ".out.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld):
            lock_exclusive(path)
        got = []
        waiter = threading.Thread(target=lambda: got.append(lock_exclusive(path, wait=True)))
        waiter.start()
        time.sleep(1)  # the waiter is blocked on the holder's file by now
        holder.stdin.write("release\n")
        holder.stdin.flush()
        waiter.join(30)
        assert holder.wait(30) == 0
    finally:
        holder.kill()
    (fh,) = got
    assert os.path.exists(path) and os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
    release_removing(fh)
    assert not os.path.exists(path)
    lock_exclusive(path).close()  # free again


def test_a_default_bench_name_is_never_shared_by_two_writers(tmp_path):
    """Two `bench mixing` runs at once with the default --json both wrote bench/results/mixing-<card>-<day>.json:
    one run's rows were lost. Each writer now reserves its own name."""
    from concurrent.futures import ThreadPoolExecutor

    from sdmp_fast.benchmarks.common import write_json

    path = str(tmp_path / "mixing-cpu2-20261130.json")
    with ThreadPoolExecutor(8) as pool:
        written = list(pool.map(lambda i: write_json(path, {"run": i}, fresh=True), range(8)))
    assert len(set(written)) == 8 and written.count(path) == 1
    import json
    assert sorted(json.load(open(p))["run"] for p in written) == list(range(8))
    assert write_json(path, {"run": "again"}) == path  # the user's own --json: replaced, as asked
