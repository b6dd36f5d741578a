"""Can this torch build load AOTInductor packages, and with which C++ compiler? Compiles a
one-Linear model with ``aoti_compile_and_package`` (weights in the package, and weights bound at
load time), once with Inductor's configured compiler and once with the one the ``aoti`` backend
chooses (``fluxopt_plugins._libstdcxx``), loads each in a child process and reports how the
child ended. Exit status 0 when the chosen compiler's packages load.

    python benchmarks/aoti_load_check.py [--device cuda]

On the H100 machine of 2026-11-24 (torch 2.11.0+cu130) both children died with SIGSEGV inside
``aoti_load_package``; on the CPU with torch 2.13.0 both load and match eager.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = """
import sys, torch
compiled = torch._inductor.aoti_load_package(sys.argv[1])
weights = torch.load(sys.argv[2])
x = weights.pop("x")
if sys.argv[3] == "shared":
    compiled.load_constants(weights, check_full_update=True, user_managed=True)
print(float((compiled(x) - torch.nn.functional.linear(x, weights["weight"], weights["bias"])).abs().max()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model = torch.nn.Linear(64, 64).to(args.device)
    x = torch.randn(8, 64, device=args.device)
    program = torch.export.export(model, (x,), strict=False)
    print(f"torch {torch.__version__} on {args.device}")
    from torch._inductor.cpp_builder import get_cpp_compiler

    from fluxopt_plugins._libstdcxx import choose_compiler

    configured = get_cpp_compiler()
    chosen, why = choose_compiler(configured)
    print(f"configured compiler {configured}; chosen {chosen}: {why}")
    chosen_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp, "weights.pt")
        torch.save({"weight": model.weight.detach(), "bias": model.bias.detach(), "x": x}, weights)
        for label, cxx in (("configured", configured), ("chosen", chosen)):
            for mode, configs in (("embedded", {}), ("shared", {"aot_inductor.package_constants_in_so": False})):
                with torch._inductor.config.patch({"cpp.cxx": (None, cxx)}):
                    path = torch._inductor.aoti_compile_and_package(
                        program, package_path=str(Path(tmp, f"{label}-{mode}.pt2")),
                        inductor_configs={"max_autotune": False, **configs})
                proc = subprocess.run([sys.executable, "-c", CHILD, path, str(weights), mode], capture_output=True,
                                      text=True)
                if proc.returncode == 0:
                    print(f"{label} ({cxx}) {mode}: loaded, max |aoti - eager| = {proc.stdout.strip()}")
                else:
                    chosen_ok &= label != "chosen"
                    print(f"{label} ({cxx}) {mode}: load FAILED, exit {proc.returncode} "
                          f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
    sys.exit(0 if chosen_ok else 1)


if __name__ == "__main__":
    main()
