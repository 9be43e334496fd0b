"""Build of the sdmp_fast CUDA kernels: ahead of time at install, else JIT with ninja on first CUDA use; a
compile check, and a CPU emulation.

* At install (``setup.py``), with a CUDA toolchain and torch in the build environment
  (``pip install --no-build-isolation``), the extension is compiled into the package as
  ``sdmp_fast.kernels._C`` when a GPU is visible or ``SDMP_KERNELS_AOT=1`` (``0``: never); see
  :func:`aot_decision`. :func:`load` uses that module when it was built from these very sources for this
  torch (:func:`load_prebuilt`), else it JIT-builds.
* :func:`load` JIT-compiles ``csrc/**`` with ``torch.utils.cpp_extension.load`` (ninja, persistent cache in
  ``$SDMP_KERNELS_CACHE`` or ``~/.cache/sdmp_fast_kernels``) for ``$SDMP_KERNELS_ARCHS`` (default ``80;90``:
  sm_80 and sm_90 cubins plus sm_90 PTX for newer cards). Nothing is built at import time.
* ``python -m sdmp_fast.kernels.build --check`` compiles every ``.cu``/``.cpp`` with the local nvcc for both
  architectures, without a GPU, and prints OK/FAIL per file.
* :func:`load_emulated` builds the same kernel sources with the host compiler against ``csrc/common/emulate.h``
  (threads + barriers stand in for the GPU) into a CPU module: tests use it to run the real kernel code on
  CPU tensors against the PyTorch references.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

CSRC = Path(__file__).resolve().parent / "csrc"
EXT_NAME = "sdmp_fast_kernels"
DEFAULT_ARCHS = "80;90"


def sources(kind: Optional[str] = None) -> List[Path]:
    """Kernel (``.cu``) and host (``.cpp``) sources under csrc/, sorted; ``kind`` = "cu" or "cpp" filters."""
    exts = (".cu", ".cpp") if kind is None else (f".{kind}",)
    return sorted(p for p in CSRC.rglob("*") if p.suffix in exts)


_ARCH_RE = re.compile(r"(\d{1,2})(\d)(a?)")  # major, minor, arch-specific "a" (sm_90a: wgmma, setmaxnreg)


def archs() -> List[str]:
    """Compute capabilities to build, from $SDMP_KERNELS_ARCHS ("80;90", "8.0 9.0", "sm_90" and the arch-specific
    "90a" / "9.0a" / "sm_90a" all work; unset or empty: the default). Anything else is an error naming it."""
    raw = os.environ.get("SDMP_KERNELS_ARCHS", "").strip() or DEFAULT_ARCHS
    out = []
    for tok in raw.replace(",", ";").replace(" ", ";").split(";"):
        tok = tok.strip().lower().replace("sm_", "").replace(".", "").replace("+ptx", "")
        if not tok:
            continue
        m = _ARCH_RE.fullmatch(tok)
        # a bare "7" or "0" is no compute capability (nvcc would fail later, or build for something else)
        if m is None or int(m.group(1)) < 3:
            raise ValueError(f"SDMP_KERNELS_ARCHS={raw!r}: cannot read compute capability {tok!r} (expected e.g. "
                             f"80, 8.0, sm_80 or 90a)")
        out.append(tok)
    if not out:
        raise ValueError(f"SDMP_KERNELS_ARCHS={raw!r}: no architecture in it")
    return out


def _arch_number(a: str) -> int:
    return int(a.rstrip("a"))


def gencode_flags(arch_list: Optional[Sequence[str]] = None) -> List[str]:
    arch_list = list(arch_list or archs())
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arch_list]
    # PTX: JIT for newer GPUs. Arch-specific PTX (compute_90a) runs on that one architecture only, so the PTX is
    # the plain one of the highest architecture.
    top = max(_arch_number(a) for a in arch_list)
    return flags + [f"-gencode=arch=compute_{top},code=compute_{top}"]


def cache_dir() -> Path:
    root = os.environ.get("SDMP_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sdmp_fast_kernels")
    return Path(root)


def _torch_tag() -> str:
    import torch
    return f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda or 'none'}-py{sys.version_info[0]}{sys.version_info[1]}"


def _sources_digest() -> str:
    # the kernel sources alone: the same files in a checkout and in an installed package (its package data)
    h = hashlib.sha1()
    for p in sorted(CSRC.rglob("*")):
        if p.is_file() and p.suffix in (".cu", ".cpp", ".h", ".cuh"):
            h.update(p.relative_to(CSRC).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _is_toolkit(root: Optional[str]) -> bool:
    return bool(root) and os.path.exists(os.path.join(root, "include", "crt", "host_defines.h"))


def cuda_home() -> Optional[str]:
    """The CUDA toolkit root: $CUDA_HOME, torch's guess, the nvcc on PATH, /usr/local/cuda -- the first that holds
    the toolkit headers (torch's guess is the parent of `which nvcc`, wrong when nvcc is a wrapper script)."""
    from torch.utils.cpp_extension import CUDA_HOME
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME,
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None, "/usr/local/cuda"]
    for root in candidates:
        if _is_toolkit(root):
            return root
    return CUDA_HOME


def nvcc_path() -> Optional[str]:
    home = cuda_home()
    cand = os.path.join(home, "bin", "nvcc") if home else None
    if cand and os.path.exists(cand):
        return cand
    return shutil.which("nvcc")


def _toolkit_flags() -> Tuple[List[str], List[str]]:
    """Include dirs and link flags for the toolkit when torch's CUDA_HOME guess is not the toolkit root."""
    from torch.utils.cpp_extension import CUDA_HOME
    home = cuda_home()
    if not home or home == CUDA_HOME or not _is_toolkit(home):
        return [], []
    lib = next((os.path.join(home, d) for d in ("lib64", "lib") if os.path.isdir(os.path.join(home, d))), None)
    return [os.path.join(home, "include")], ([f"-L{lib}"] if lib else [])


def extra_host_includes() -> List[str]:
    """Fallback include dirs of the pip CUDA wheels (cusparse.h, cublas_v2.h, ... that ATen's CUDA headers pull in)
    for toolkits that ship only the compiler. Searched after everything else (-idirafter), so a full toolkit wins."""
    home = cuda_home()
    if home and os.path.exists(os.path.join(home, "include", "cusparse.h")):
        return []
    found = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        found += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [d for d in found if os.path.exists(os.path.join(d, "cusparse.h")) or os.path.exists(os.path.join(d, "cublas_v2.h"))]


def _max_jobs() -> str:
    """Parallel compile jobs: at most one per ~6 GB of free RAM (nvcc on torch headers is memory hungry)."""
    if "MAX_JOBS" in os.environ:
        return os.environ["MAX_JOBS"]
    jobs = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        jobs = max(1, min(jobs, avail_kb // (6 * 1024 * 1024)))
    except (OSError, StopIteration, ValueError):
        pass
    return str(jobs)


def compile_flags(arch_list: Optional[Sequence[str]] = None) -> dict:
    """Include dirs and compiler / linker flags of the CUDA extension, shared by the JIT build and setup.py."""
    arch_list = list(arch_list or archs())
    toolkit_includes, toolkit_libs = _toolkit_flags()
    return dict(include_dirs=[str(CSRC / "common"), *toolkit_includes],
                cflags=["-O3"] + [f"-idirafter{d}" for d in extra_host_includes()],
                # --threads: nvcc compiles the architectures of a file in parallel
                cuda_cflags=["-O3", "-lineinfo", f"--threads={min(len(arch_list), 4)}", *gencode_flags(arch_list)],
                ldflags=toolkit_libs)


def _checkout_tag() -> str:
    return hashlib.sha1(str(CSRC.resolve()).encode()).hexdigest()[:8]


def jit_build_dir(arch_list: List[str]) -> Path:
    """The JIT cache folder of this copy of the sources (a checkout, or an installed package), this torch and
    these architectures: two package versions or checkouts sharing one cache keep their own builds instead of
    rebuilding each other's module on every start, and an edit here rebuilds only what it touched."""
    return cache_dir() / f"{_torch_tag()}-sm{'_'.join(arch_list)}-{_checkout_tag()}"


def emulated_build_dir() -> Path:
    """The CPU emulation's folder, per copy of the sources: its wrappers #include this copy's .cu files by
    absolute path, so a shared folder let two checkouts testing at once build one's tests against the other's
    kernels."""
    return cache_dir() / f"emulated-{_torch_tag()}-{_checkout_tag()}"


def load(verbose: bool = False):
    """The CUDA extension: the one built at install if it matches these sources and this torch, else JIT-built
    (or loaded from the JIT cache); raises on failure."""
    prebuilt, why = load_prebuilt()
    if verbose:
        print(f"sdmp_fast.kernels: {'using the extension built at install' if prebuilt else why}", flush=True)
    if prebuilt is not None:
        return prebuilt
    from torch.utils import cpp_extension
    arch_list = archs()
    build_dir = jit_build_dir(arch_list)
    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", _max_jobs())
    flags = compile_flags(arch_list)
    return cpp_extension.load(
        name=EXT_NAME,
        sources=[str(p) for p in sources()],
        extra_include_paths=flags["include_dirs"],
        extra_cflags=flags["cflags"],
        extra_ldflags=flags["ldflags"],
        extra_cuda_cflags=flags["cuda_cflags"],
        build_directory=str(build_dir),
        verbose=verbose,
    )


# ---------------------------------------------------------------------------------------------- ahead of time

AOT_ENV = "SDMP_KERNELS_AOT"
PREBUILT_MODULE = "sdmp_fast.kernels._C"


def build_tag() -> str:
    """What a prebuilt extension must have been built from: these kernel sources and this torch (a C++ token)."""
    h = hashlib.sha1(_sources_digest().encode())
    h.update(_torch_tag().encode())
    return "b" + h.hexdigest()[:16]


def aot_decision(setting: Optional[str] = None) -> Tuple[bool, str]:
    """Whether setup.py compiles the extension at install, and why. ``SDMP_KERNELS_AOT``: ``1`` always (an error
    if torch or nvcc is missing), ``0`` never, unset: when torch (with CUDA), nvcc and a GPU are all there -- a
    CPU-only machine with nvcc (CI) keeps its quick install and JIT-builds on a GPU later."""
    setting = os.environ.get(AOT_ENV, "") if setting is None else setting
    setting = setting.strip().lower()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{AOT_ENV}={setting!r}: expected 1 (build the CUDA kernels at install), 0 (never) or unset")
    if setting == "0":
        return False, f"{AOT_ENV}=0"
    try:
        import torch
    except ImportError:
        missing = "torch is not importable in the build environment (pip install --no-build-isolation)"
    else:
        missing = None
        if torch.version.cuda is None:
            missing = f"torch {torch.__version__} has no CUDA"
        elif setting == "" and not torch.cuda.is_available():
            return False, f"no GPU visible ({AOT_ENV}=1 builds anyway)"
        elif nvcc_path() is None:
            missing = "no nvcc (set CUDA_HOME or put nvcc on PATH)"
    if missing and setting == "1":
        raise RuntimeError(f"{AOT_ENV}=1 but the CUDA kernels cannot be built at install: {missing}")
    if missing:
        return False, missing
    return True, f"{AOT_ENV}=1" if setting == "1" else "torch with CUDA, nvcc and a GPU found"


def load_prebuilt(capability: Optional[Tuple[int, int]] = None):
    """(module, reason): the extension compiled at install, or (None, why it is not used). ``capability``: the
    GPU's (major, minor), default the current device's."""
    import importlib
    try:
        mod = importlib.import_module(PREBUILT_MODULE)
    except ImportError as e:
        if getattr(e, "name", None) == PREBUILT_MODULE:
            return None, "no extension built at install: JIT build"
        return None, f"the extension built at install does not load ({e}): JIT build"
    if getattr(mod, "build_tag", None) != build_tag():
        return None, ("the extension built at install is stale (other kernel sources or another torch than "
                      f"{_torch_tag()}): JIT build")
    built = str(getattr(mod, "build_archs", "")).split("_")
    if capability is None:
        import torch
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if capability is not None and not runs_on(built, capability):
        return None, (f"the extension built at install has code for sm_{', sm_'.join(built)} only, not for this "
                      f"sm_{capability[0]}{capability[1]} GPU: JIT build")
    return mod, "built at install"


def runs_on(built: Sequence[str], capability: Tuple[int, int]) -> bool:
    """Whether code built for these compute capabilities runs on a GPU of ``capability``: a cubin runs on its
    own major version at an equal or higher minor one, the PTX of the highest one (gencode_flags) on any newer GPU."""
    major, minor = capability
    ccs = [(int(m.group(1)), int(m.group(2)), m.group(3) == "a") for m in map(_ARCH_RE.fullmatch, built) if m]
    if not ccs:
        return False
    # an arch-specific cubin (sm_90a) runs on exactly its architecture
    return (any(m == major and (n == minor if specific else n <= minor) for m, n, specific in ccs)
            or (major, minor) >= max((m, n) for m, n, _ in ccs))


def load_emulated(verbose: bool = False):
    """Builds the kernels for CPU emulation (host compiler, no CUDA): a module with the same functions."""
    from torch.utils import cpp_extension
    build_dir = emulated_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    digest = _sources_digest()
    wrappers = []
    for cu in sources("cu"):  # compile each .cu as C++; the digest makes source edits rebuild the module
        w = build_dir / f"{cu.stem}_emulated.cpp"
        text = f"// generated: {cu.name} for CPU emulation, sources {digest}\n#include \"{cu}\"\n"
        if not w.exists() or w.read_text() != text:
            tmp = w.with_name(f"{w.name}.tmp-{os.getpid()}")  # a concurrent build never reads half a wrapper
            tmp.write_text(text)
            os.replace(tmp, w)
        wrappers.append(str(w))
    os.environ.setdefault("MAX_JOBS", _max_jobs())
    return cpp_extension.load(
        name=EXT_NAME + "_emulated",
        sources=[str(p) for p in sources("cpp")] + wrappers,
        extra_include_paths=[str(CSRC / "common")],
        extra_cflags=["-DSDMP_EMULATE", "-O1", "-pthread"],
        extra_ldflags=["-pthread"],
        build_directory=str(build_dir),
        verbose=verbose,
    )


# ---------------------------------------------------------------------------------------------- compile check

def _torch_cxx_std() -> str:
    """The C++ standard torch's headers need (what cpp_extension passes): c++20 for recent torch, else c++17."""
    import torch.utils.cpp_extension as ce
    with open(ce.__file__) as f:
        return "c++20" if "-std=c++20" in f.read() else "c++17"


def _check_command(path: Path, out: str, arch_list: Sequence[str]) -> Tuple[List[str], str]:
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
    nvcc = nvcc_path()
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{CSRC / 'common'}"]
    defs = [f"-DTORCH_EXTENSION_NAME={EXT_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    if path.suffix == ".cu":
        # Kernel sources include only c10 headers: checked in C++17 (what older torch builds use).
        std = "c++17"
        # -Xptxas=-v: registers and spills of every kernel instance (parse_ptxas), watched by the check
        cmd = [nvcc, "-c", str(path), "-o", out, f"-std={std}", "-O3", "-Xcompiler", "-fPIC", "-Xptxas=-v",
               *COMMON_NVCC_FLAGS, *gencode_flags(arch_list), *incs, *defs]
        return cmd, f"{std}, " + " ".join(f"sm_{a}" for a in arch_list)
    std = _torch_cxx_std()
    host = [f"-Xcompiler=-idirafter{d}" for d in extra_host_includes()]
    # Host-only sources: -O0 (a compile check, not a build; torch's headers dominate the time).
    cmd = [nvcc, "-c", str(path), "-o", out, f"-std={std}", "-O0", "-Xcompiler", "-fPIC",
           f"-I{sysconfig.get_paths()['include']}", *incs, *host, *defs]
    return cmd, f"{std}, host"


def compile_check(files: Optional[Sequence[Path]] = None, arch_list: Optional[Sequence[str]] = None,
                  jobs: int = 2, stream=None, resources: Optional[List[dict]] = None) -> int:
    """nvcc -c every source (no GPU needed); prints one OK/FAIL line per file (with the most registers of its
    kernels and any spills); returns the number of failures. ``resources`` collects every kernel's ptxas report."""
    from .ptxas import parse_ptxas  # here, not at the top: setup.py runs this file outside its package
    stream = stream or sys.stdout
    if nvcc_path() is None:
        print("nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=stream)
        return -1
    files = list(files or sources())
    arch_list = list(arch_list or archs())

    def one(path: Path):
        with tempfile.TemporaryDirectory() as tmp:
            cmd, what = _check_command(path, os.path.join(tmp, "out.o"), arch_list)
            t0 = time.time()
            res = subprocess.run(cmd, capture_output=True, text=True)
            return path, what, res, time.time() - t0

    failures = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for path, what, res, secs in pool.map(one, files):
            rel = path.relative_to(CSRC.parent.parent) if CSRC.parent.parent in path.parents else path
            kernels = parse_ptxas(res.stderr or "")
            if resources is not None:
                resources += [dict(k, file=path.name) for k in kernels]
            if res.returncode == 0:
                usage = ""
                if kernels:
                    spilling = sorted({f"{k['kernel']} {k['arch']} {k['spill_stores']} B" for k in kernels
                                       if k["spill_stores"]})
                    usage = (f"  {len(kernels)} kernels, at most {max(k['registers'] for k in kernels)} registers, "
                             f"spill stores: {'; '.join(spilling) if spilling else 'none'}")
                print(f"OK    {rel}  [{what}]  {secs:.1f} s{usage}", file=stream, flush=True)
            else:
                failures += 1
                print(f"FAIL  {rel}  [{what}]  {secs:.1f} s", file=stream, flush=True)
                lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if not ln.startswith("ptxas info")]
                tail = lines[-40:]
                print("\n".join("      " + line for line in tail), file=stream, flush=True)
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdmp_fast.kernels.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compile-check every .cu/.cpp with nvcc (no GPU needed)")
    ap.add_argument("--build", action="store_true", help="JIT-build the CUDA extension now (into the cache)")
    ap.add_argument("--emulated", action="store_true", help="build the CPU emulation module")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes for --check")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not (args.check or args.build or args.emulated):
        ap.error("choose --check, --build and/or --emulated")
    try:
        return _run(args)
    except ValueError as e:  # a bad setting (SDMP_KERNELS_ARCHS, SDMP_KERNELS_AOT, ...): one line naming it
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    rc = 0
    if args.check:
        print(f"nvcc: {nvcc_path()}  archs: {' '.join('sm_' + a for a in archs())}", flush=True)
        fails = compile_check(jobs=args.jobs)
        print("compile check: " + ("nvcc missing" if fails < 0 else f"{len(sources()) - fails}/{len(sources())} OK"))
        rc = rc or (0 if fails == 0 else 1)
    if args.build:
        t0 = time.time()
        ext = load(verbose=args.verbose)
        print(f"built {ext.__file__} in {time.time() - t0:.0f} s")
    if args.emulated:
        t0 = time.time()
        ext = load_emulated(verbose=args.verbose)
        print(f"built {ext.__file__} (CPU emulation) in {time.time() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
