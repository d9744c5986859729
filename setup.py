"""Build hook: generate the Python code for protos/callstream/v1/*.proto with grpcio-tools.

The generated modules land in services/callstream/v1/ (git-ignored) so that both wheels and editable
installs see them. protos/ stays the single source of truth; nothing generated is edited by hand.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "services"


def generate_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "callstream" / "v1").glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT_ROOT}",
        f"--pyi_out={OUT_ROOT}",
        f"--grpc_python_out={OUT_ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    (OUT_ROOT / "callstream" / "v1" / "__init__.py").write_text(
        '"""Generated from protos/callstream/v1 by the build (setup.py). Do not edit."""\n'
    )


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
