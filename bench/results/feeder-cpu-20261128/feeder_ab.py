import time, glob, sys
import numpy as np
import sdmp_fast.pipelines.dali as D
from sdmp_fast.pipelines.image_bytes import image_format, read_encoded
from sdmp_fast.pipelines.skips import SkipLog
from sdmp_fast.pipelines.base import EpochSampler
def old_sniff(buf):
    if len(buf) == 0: return "empty file"
    fmt = image_format(buf)
    if fmt is None: return "not an image"
    if fmt == "jpeg" and b"\xff\xd9" not in bytes(buf[-4096:]): return "truncated"
    if fmt == "png" and b"IEND" not in bytes(buf[-64:]): return "truncated"
    return None
def old_read(path):
    buf = np.fromfile(path, dtype=np.uint8)
    r = old_sniff(buf)
    return (None, r) if r else (buf, None)
files = sorted(glob.glob(sys.argv[1] + "/*/*"))
impls = {"old": lambda paths: [old_read(p) for p in paths], "new": lambda paths: [read_encoded(p) for p in paths]}
res = {}
for rnd in range(2):
  for name, impl in impls.items():
    D._read_chunk = impl
    for threads in (1, 4):
        s = EpochSampler(len(files), 256, 0, 1, True, 0, True)
        f = D._Feeder(files, SkipLog("dali", s), True, True, threads)
        best = 0
        for rep in range(3):
            f.start([b.tolist() for b in s.batches()])
            t = time.perf_counter(); n = 0
            while True:
                try: data, idx = f()
                except StopIteration: break
                n += len(data); f.accept()
            best = max(best, n / (time.perf_counter() - t))
        f.shutdown()
        res.setdefault((name, threads), []).append(best)
for k, v in sorted(res.items()):
    print(k, " ".join(f"{x:,.0f}" for x in v))
