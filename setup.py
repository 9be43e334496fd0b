"""Optional ahead-of-time build of the CUDA kernels at install; the package metadata is in pyproject.toml.

With torch and a CUDA toolchain in the build environment (``pip install --no-build-isolation .``) the kernels
are compiled into ``sdmp_fast.kernels._C`` when a GPU is visible or ``SDMP_KERNELS_AOT=1`` (``0``: never, unset
on a machine without a GPU: no build, the kernels JIT-build on first use). ``SDMP_KERNELS_ARCHS`` picks the
architectures as for the JIT build. Without ``SDMP_KERNELS_AOT=1`` a failed compile is a warning, not a failed
install: the JIT build stays the fallback.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def kernel_build():
    # kernels/build.py by path: importing the sdmp_fast package here would need all its dependencies
    spec = importlib.util.spec_from_file_location("_sdmp_kernel_build", HERE / "kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def aot_extension() -> dict:
    build = kernel_build()
    wanted, why = build.aot_decision()
    print(f"sdmp-fast: CUDA kernels {'compiled at install' if wanted else 'JIT-built on first use'} ({why})")
    if not wanted:
        return {}
    from torch.utils import cpp_extension
    cpp_extension.CUDA_HOME = build.cuda_home()  # torch guesses it from `which nvcc`, wrong behind a wrapper
    os.environ.setdefault("MAX_JOBS", build._max_jobs())
    flags = build.compile_flags()
    ext = cpp_extension.CUDAExtension(
        build.PREBUILT_MODULE,
        sources=[str(p.relative_to(HERE)) for p in build.sources()],
        include_dirs=flags["include_dirs"],
        extra_compile_args={"cxx": flags["cflags"] + [f"-DSDMP_BUILD_TAG={build.build_tag()}",
                                                      f"-DSDMP_BUILD_ARCHS={'_'.join(build.archs())}"],
                            "nvcc": flags["cuda_cflags"]},
        extra_link_args=flags["ldflags"],
        optional=os.environ.get(build.AOT_ENV, "").strip() != "1",
    )

    class BuildKernels(cpp_extension.BuildExtension):
        def build_extension(self, extension):
            # setuptools' `optional` covers distutils' compile errors only, not the RuntimeError of torch's ninja
            # build: without SDMP_KERNELS_AOT=1 a failed compile leaves the JIT build on first use
            try:
                super().build_extension(extension)
            except Exception as e:  # noqa: BLE001
                if not extension.optional:
                    raise
                print(f"sdmp-fast: WARNING: compiling the CUDA kernels at install failed ({str(e).strip()[-300:]}); "
                      f"they will be JIT-built on first use")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildKernels}}


setup(**aot_extension())
