"""Check that the installed llama-cpp-python is a portable build: no AMX instruction in its libraries.

    python scripts/check_portable.py

pip's default build of llama-cpp-python compiles llama.cpp with GGML_NATIVE=ON, for every
instruction set of the machine that builds it. On a CPU that advertises AMX (`amx_tile` in
/proc/cpuinfo) that build runs `tileloadd` in libggml-cpu.so at the first decode and, where the
kernel does not grant AMX to the process, dies with SIGILL. A build with
CMAKE_ARGS="-DGGML_NATIVE=OFF" contains no AMX instruction at all, which this script shows by
disassembling every shared library of the package with `objdump -d`.

Exit 0: portable. Exit 1: AMX instructions found (they are listed, with the reinstall command).
Exit 2: the check cannot run (no llama-cpp-python, no objdump, or an objdump too old to decode AMX).
"""

from __future__ import annotations

import hashlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REINSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall --no-cache-dir llama-cpp-python'

# objdump writes "  addr:\t<bytes>\t<mnemonic> <operands>": a mnemonic follows a tab. Every AMX
# instruction either names a tile register (%tmm0-%tmm7) or is one of the three that take none.
# Symbol names appear only inside <...>, never after a tab, so a function called `tileloadd_ref`
# does not match.
AMX = re.compile(r"\t(?:ldtilecfg|sttilecfg|tilerelease|tilezero|tileload\w*|tilestore\w*|tdp\w+|tcmm\w+)\b"
                 r"|%tmm[0-7]\b")

# Known encodings (what `as` makes of them): ldtilecfg (%rax); tileloadd (%rax,%rcx,1),%tmm0;
# tdpbssd %tmm2,%tmm1,%tmm0; tdpbf16ps %tmm2,%tmm1,%tmm0; tilerelease; then vpdpbusd, an
# AVX-VNNI instruction that is not AMX and must not match.
KNOWN_AMX = bytes.fromhex("c4e2784900" "c4e27b4b0408" "c4e26b5ec1" "c4e26a5cc1" "c4e27849c0")
KNOWN_OTHER = bytes.fromhex("c4e27550c2")  # vpdpbusd %ymm2,%ymm1,%ymm0


def library_files() -> list[Path]:
    from retort.backends.local import library_files as found  # the list the local backend's probe keys on

    return found()


def _scan(argv: list[str], limit: int) -> list[str]:
    """The AMX instruction lines of objdump's output, up to `limit`, read in blocks: a library
    disassembles to hundreds of MB of text."""
    hits: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                          bufsize=1 << 20) as proc:
        assert proc.stdout is not None
        tail = ""
        while len(hits) < limit:
            block = proc.stdout.read(1 << 22)
            text = tail + block
            cut = text.rfind("\n") + 1 if block else len(text)
            line_end = 0
            for match in AMX.finditer(text, 0, cut):
                if match.start() < line_end:
                    continue  # the same instruction: a mnemonic and its tile registers
                start, line_end = text.rfind("\n", 0, match.start()) + 1, text.find("\n", match.end())
                line_end = line_end if line_end >= 0 else len(text)
                hits.append(text[start:line_end].strip())
                if len(hits) >= limit:
                    break
            tail = text[cut:]
            if not block:
                break
        proc.kill()  # enough found (or done): the rest of the disassembly is not needed
        err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode not in (0, -9) and not hits:
        raise RuntimeError(f"{' '.join(argv)} failed: {err.strip()[:300]}")
    return hits


def amx_instructions(path: Path, limit: int = 20) -> list[str]:
    """The AMX instructions in an ELF file (library or object), as objdump prints them."""
    return _scan(["objdump", "-d", "--no-show-raw-insn", str(path)], limit)


def self_check() -> None:
    """Prove that this objdump decodes AMX and that the matcher sees it: a binutils older than
    2.36 prints `(bad)` for AMX bytes, and then a native build would pass unnoticed."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "amx.bin"
        raw.write_bytes(KNOWN_AMX + KNOWN_OTHER)
        found = _scan(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", "--no-show-raw-insn", str(raw)], 100)
    names = [line.split("\t")[-1].split()[0] for line in found]
    if names != ["ldtilecfg", "tileloadd", "tdpbssd", "tdpbf16ps", "tilerelease"]:
        raise RuntimeError(f"objdump does not decode AMX as expected (it gave {names}); binutils >= 2.36 needed")


def scan_distinct(libs: list[Path]) -> dict[Path, list[str]]:
    """amx_instructions of each library; copies (the wheel holds libllama.so, .so.0 and .so.0.5.0
    as three equal files) are disassembled once."""
    by_content: dict[str, list[str]] = {}
    found = {}
    for lib in libs:
        digest = hashlib.sha256(lib.read_bytes()).hexdigest()
        if digest not in by_content:
            by_content[digest] = amx_instructions(lib)
        found[lib] = by_content[digest]
    return found


def main() -> int:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"{platform.machine()}: AMX is an x86-64 extension; nothing to check")
        return 0
    if shutil.which("objdump") is None:
        print("objdump not found: install binutils (apt-get install binutils)", file=sys.stderr)
        return 2
    libs = library_files()
    if not libs:
        print('llama-cpp-python is not installed (pip install "retort[local]")', file=sys.stderr)
        return 2
    try:
        self_check()
        found = scan_distinct(libs)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"llama-cpp-python's libraries, in {libs[0].parent}:")
    for lib, lines in found.items():
        print(f"  {lib.name}: {len(lines)}{'+' if len(lines) >= 20 else ''} AMX instructions")
        for line in lines[:5]:
            print(f"      {line}")
    bad = [lib.name for lib, lines in found.items() if lines]
    if bad:
        print(f"not portable: AMX instructions in {', '.join(bad)}; reinstall: {REINSTALL}")
        return 1
    print(f"portable: no AMX instruction in {len(libs)} libraries of llama-cpp-python")
    return 0


if __name__ == "__main__":
    sys.exit(main())
