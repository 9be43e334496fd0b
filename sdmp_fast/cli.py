"""`sdmp-fast` command line. Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their command runs (so `sdmp-fast convert` does not
import torch.compile machinery, and a missing DALI breaks only the commands that need it)."""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

COMMANDS = {
    "train": ("sdmp_fast.train_cli", "pretrain a ViT with SDMP-MoCo v3 or SDMP-DINO"),
    "eval": ("sdmp_fast.evaluate", "k-NN / linear-probe evaluation of a checkpoint"),
    "plot": ("sdmp_fast.plot", "draw loss and img/s curves of a run directory to PNG"),
    "convert": ("sdmp_fast.pipelines.convert", "write an ImageFolder tree into an FFCV .beton"),
    "show": ("sdmp_fast.pipelines.show", "PNG grid of a batch's views and mixed views"),
    "make-data": ("sdmp_fast.benchmarks.make_data", "build a benchmark JPEG ImageFolder from scikit-image photos"),
    "drill": ("sdmp_fast.fault_drill", "kill -9 training runs at random points and check every resume matches"),
}
BENCH = {
    "loaders": ("sdmp_fast.benchmarks.loaders", "images/sec of every loader backend, same recipe and data"),
    "losses": ("sdmp_fast.benchmarks.losses", "fused loss kernels vs eager / torch.compile references"),
    "mixing": ("sdmp_fast.benchmarks.mixing", "fused mixing kernel vs reference and a plain copy"),
    "e2e": ("sdmp_fast.benchmarks.e2e", "end-to-end training images/sec vs synthetic device data"),
}


def _add(sub, name, module, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(_module=module)
    return p


def build_parser(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdmp-fast", description="SDMP self-supervised ViT pretraining: loaders, kernels, trainer, benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        _add(sub, name, module, help_)
    bench = sub.add_parser("bench", help="benchmarks (JSON to bench/results/)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    for name, (module, help_) in BENCH.items():
        _add(bsub, name, module, help_)
    # Only the chosen command's module is imported to add its arguments.
    chosen = _chosen_module(argv)
    if chosen is not None:
        for action in (sub, bsub):
            for p in action.choices.values():
                if p.get_default("_module") == chosen:
                    importlib.import_module(chosen).add_arguments(p)
    return parser


def _chosen_module(argv):
    if not argv:
        return None
    if argv[0] == "bench" and len(argv) > 1 and argv[1] in BENCH:
        return BENCH[argv[1]][0]
    if argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0]
    return None


def _escape_unprintable_names() -> None:
    """A file name may hold bytes that are not UTF-8 (Python keeps them as surrogates): print them escaped. A
    strict stdout (a UTF-8 locale, PYTHONIOENCODING=utf-8) failed the command on its summary, after its work."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure) and getattr(stream, "errors", None) == "strict":
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a stream that cannot change (detached, closed): left as it is
                pass


def main(argv=None) -> int:
    _escape_unprintable_names()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    args.command_line = "sdmp-fast " + " ".join(argv)
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's code for it, not a traceback of wherever it hit
        print(f"sdmp-fast {args.command}: interrupted", file=sys.stderr)
        global _INTERRUPTED
        _INTERRUPTED = True
        return 130
    except (ValueError, FileNotFoundError) as e:  # configuration / input errors: one clear line, no traceback
        print(f"sdmp-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that could not be written (read-only folder, disk full): one line naming it
        if e.filename is None and e.errno not in _ENVIRONMENT_ERRNOS and not isinstance(e, ConnectionError):
            raise  # names no file and is no full disk / permission: a bug, whose traceback is the useful part
        print(f"sdmp-fast {args.command}: error: {_os_error_line(e)}", file=sys.stderr)
        return 1
    except ImportError as e:  # an optional package the command needs is not installed: one line naming its extra
        line = _missing_package_line(e)
        if line is None:
            raise  # a package the core needs, or a broken install: the traceback is the useful part
        print(f"sdmp-fast {args.command}: error: {line}", file=sys.stderr)
        return 2


# optional packages (module name prefix) -> the pyproject extra that installs them
_OPTIONAL_PACKAGES = {"matplotlib": "bench", "skimage": "bench", "psutil": "bench", "nvidia.dali": "dali",
                      "ffcv": "ffcv", "numba": "ffcv"}


def _missing_package_line(e: ImportError):
    name = getattr(e, "name", None) or ""
    extra = next((x for p, x in _OPTIONAL_PACKAGES.items() if name == p or name.startswith(p + ".")), None)
    if extra is None:
        return None
    text = str(e)
    return text if "pip install" in text else f"{text} (pip install 'sdmp-fast[{extra}]')"


_ENVIRONMENT_ERRNOS = {getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO", "ENOLCK",
                                                   "EMFILE", "ENFILE", "ENOMEM", "ESTALE", "ETIMEDOUT", "EPIPE",
                                                   "ECONNRESET", "ECONNREFUSED") if hasattr(errno, n)}


def _os_error_line(e: OSError) -> str:
    if e.filename is None:
        return str(e)
    names = f"{e.filename!r}" + (f" -> {e.filename2!r}" if e.filename2 is not None else "")
    return f"{names}: {e.strerror or e}"


_INTERRUPTED = False  # main() ended on Ctrl-C


def run() -> int:
    """The ``sdmp-fast`` console command: ``main()``, and after a Ctrl-C the process ends by SIGINT itself (the
    one line printed first). A shell stops a loop over commands only for a child killed by SIGINT: an exit code
    of 130 let ``for x in ...; do sdmp-fast ...; done`` go on to the next one."""
    code = main()
    if _INTERRUPTED:
        die_of_sigint()
    return code


def die_of_sigint() -> None:
    import signal

    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    sys.exit(run())
