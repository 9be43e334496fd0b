"""ptxas ``-v`` reports, read per kernel instance: registers and local-memory spills, named without c++filt.

``python -m sdmp_fast.kernels.build --check`` compiles with ``-Xptxas=-v`` and prints them per file; its test
fails on a new spill, a performance regression that shows on a CPU machine long before a GPU run would.
"""
from __future__ import annotations

import re
from typing import List

DTYPES = {"N3c108BFloat16E": "bf16", "N3c104HalfE": "fp16", "f": "fp32", "h": "u8"}


def kernel_label(mangled: str) -> str:
    """'_ZN4sdmp..19student_grad_kernelIN3c108BFloat16ELi8EEEvNS_10DinoParamsE' -> 'student_grad_kernel<bf16,8>'
    (enough to tell the instances apart without c++filt): the last name of the nested name, its template args."""
    if not mangled.startswith("_ZN"):
        return mangled
    pos, name = 3, mangled
    while pos < len(mangled) and mangled[pos].isdigit():
        digits = re.match(r"\d+", mangled[pos:]).group(0)
        pos += len(digits)
        name, pos = mangled[pos:pos + int(digits)], pos + int(digits)
    if not mangled.startswith("I", pos):
        return name
    args = []
    for tok in re.finditer(r"N3c108BFloat16E|N3c104HalfE|Li(-?\d+)E|Lb([01])E|(?<=I)[fh](?=L|E)", mangled[pos:]):
        t = tok.group(0)
        args.append(DTYPES.get(t) or tok.group(1) or ("true" if tok.group(2) == "1" else "false"))
    return f"{name}<{','.join(args)}>"


def parse_ptxas(text: str) -> List[dict]:
    """ptxas -v output -> one {kernel, arch, registers, spill_stores, spill_loads} per compiled kernel instance."""
    out, props = [], {}
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props["name"] = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and "name" in props:
            props["spills"] = (int(m.group(1)), int(m.group(2)))
            continue
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            props = {"entry": m.group(1), "arch": m.group(2)}
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and "entry" in props:
            st, ld = props.get("spills", (0, 0)) if props.get("name") == props["entry"] else (0, 0)
            out.append({"kernel": kernel_label(props["entry"]), "arch": props["arch"], "registers": int(m.group(1)),
                        "spill_stores": st, "spill_loads": ld})
            props = {}
    return out
