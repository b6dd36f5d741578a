"""Which C++ compilers build AOTInductor packages this process can load? Prints the toolchain
facts and, for Inductor's configured compiler and each fallback, the version checks of
``fluxopt_plugins._libstdcxx`` and the ground truth (``package_loads``: build a one-Linear CPU
package, load it in a child process).

    python benchmarks/aoti_compiler_probe.py
"""

import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401 - loads libstdc++ as fluxopt runs would
from torch._inductor.cpp_builder import get_cpp_compiler

from fluxopt_plugins._libstdcxx import (FALLBACK_COMPILERS, compatible, glibcxx_version, loaded_libstdcxx,
                                        package_loads)

loaded = loaded_libstdcxx()
print("torch", torch.__version__, "| loaded", loaded, glibcxx_version(loaded) if loaded else None)
with tempfile.TemporaryDirectory() as tmp:
    for compiler in dict.fromkeys((get_cpp_compiler(), *FALLBACK_COMPILERS)):
        exe = shutil.which(compiler)
        version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.splitlines()[0] if exe else "-"
        print(f"{compiler}: {exe} | {version}")
        if exe:
            print("   version check:", compatible(compiler, glibcxx_version(loaded)) if loaded else "no runtime")
            print("   ground truth:", package_loads(compiler, Path(tmp)))
