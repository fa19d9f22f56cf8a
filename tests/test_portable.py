"""The installed llama.cpp is a portable build: no AMX instruction, shown by disassembly.

A native build on a CPU that advertises AMX dies with SIGILL at the first decode where the
process is not granted AMX (issue 10, item 8). This machine has no AMX, so the proof is the
disassembly of the installed libraries, with a matcher shown to find AMX where it is.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "check_portable.py"

# Every AMX instruction of AMX-TILE, -INT8, -BF16 and -FP16, as `as` spells it (binutils 2.40 has no
# AMX-COMPLEX; its tcmm* instructions name tile registers, which the matcher catches as well).
AMX_SOURCE = """\
ldtilecfg (%rax)
sttilecfg (%rax)
tileloadd (%rax,%rcx,1), %tmm0
tileloaddt1 (%rax,%rcx,1), %tmm1
tilestored %tmm0, (%rax,%rcx,1)
tilezero %tmm3
tdpbssd %tmm2, %tmm1, %tmm0
tdpbsud %tmm2, %tmm1, %tmm0
tdpbusd %tmm2, %tmm1, %tmm0
tdpbuud %tmm2, %tmm1, %tmm0
tdpbf16ps %tmm2, %tmm1, %tmm0
tdpfp16ps %tmm2, %tmm1, %tmm0
tilerelease
"""
# What a portable build is full of, and names that only look like AMX: none may match.
OTHER_SOURCE = """\
.globl tileloadd_ref
tileloadd_ref:
vpdpbusd %ymm2, %ymm1, %ymm0
vfmadd231ps %zmm2, %zmm1, %zmm0
vdpbf16ps %zmm2, %zmm1, %zmm0
call tileloadd_ref
ret
"""


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_portable", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_script()


def _assemble(tmp_path: Path, name: str, source: str) -> Path:
    (tmp_path / f"{name}.s").write_text(source)
    subprocess.run(["as", str(tmp_path / f"{name}.s"), "-o", str(tmp_path / f"{name}.o")], check=True)
    return tmp_path / f"{name}.o"


def test_the_matcher_finds_every_amx_instruction_and_nothing_else(tmp_path: Path) -> None:
    obj = _assemble(tmp_path, "mixed", AMX_SOURCE + OTHER_SOURCE)
    found = check.amx_instructions(obj, limit=100)
    expected = [line.split()[0] for line in AMX_SOURCE.splitlines()]
    assert [line.split("\t")[-1].split()[0] for line in found] == expected
    assert check.amx_instructions(_assemble(tmp_path, "other", OTHER_SOURCE)) == []


def test_the_self_check_fails_when_amx_is_not_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    check.self_check()  # this objdump decodes AMX, and the matcher sees it
    # An objdump that printed `(bad)` for AMX bytes would let a native build pass: the self-check says so.
    monkeypatch.setattr(check, "AMX", __import__("re").compile(r"\tnever-matches\b"))
    with pytest.raises(RuntimeError, match="does not decode AMX"):
        check.self_check()


def test_the_installed_llama_cpp_has_no_amx_instruction() -> None:
    libs = check.library_files()
    assert any(lib.name.startswith("libggml-cpu") for lib in libs), libs
    assert any(lib.name.startswith("libllama") for lib in libs), libs
    assert {lib.name: hits for lib, hits in check.scan_distinct(libs).items()} == {lib.name: [] for lib in libs}


def _script(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_the_script_says_this_build_is_portable() -> None:
    out = _script()
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("portable: no AMX instruction in ")
    assert "libggml-cpu" in out.stdout


def test_the_script_fails_on_a_native_build(tmp_path: Path) -> None:
    """A stand-in llama_cpp package whose libggml-cpu.so holds AMX code, as a native build on a
    Sapphire Rapids would: the script finds it, names it, and prints the reinstall command."""
    lib = tmp_path / "llama_cpp" / "lib"
    lib.mkdir(parents=True)
    (tmp_path / "llama_cpp" / "__init__.py").write_text("")
    obj = _assemble(tmp_path, "amx", AMX_SOURCE)
    subprocess.run(["ld", "-shared", str(obj), "-o", str(lib / "libggml-cpu.so")], check=True)
    (lib / "libllama.so").write_bytes((_assemble(tmp_path, "other", OTHER_SOURCE)).read_bytes())
    out = _script({"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "libggml-cpu.so: 13 AMX instructions" in out.stdout
    assert "libllama.so: 0 AMX instructions" in out.stdout
    assert "tileloadd" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == f"not portable: AMX instructions in libggml-cpu.so; reinstall: " \
                                                  f"{check.REINSTALL}"
