"""Generate the gRPC code from proto/*.proto at build time; everything else is in pyproject.toml.

``build_py`` runs for wheel builds and (with setuptools' PEP 660 editable installs) for
``pip install -e .``, so the generated ``proto/*_pb2.py`` / ``*_pb2_grpc.py`` are never committed.
They are written into the source tree, which is what an editable install imports and what
``build_py`` then copies into a wheel.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_grpc_code() -> None:
    """protoc (from grpcio-tools) over every proto/*.proto, written beside it with imports as ``pollinate.proto``.

    protoc names a generated module's imports after the .proto's path below its include root, so it reads the
    sources through a temporary root in which ``pollinate/proto`` is a link to ``proto/``: the card's folder
    stays at the repository root and the code imports as the installed package does.
    """
    import tempfile

    import grpc_tools
    from grpc_tools import protoc

    well_known = str(Path(grpc_tools.__file__).parent / "_proto")  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pollinate").mkdir()
        (root / "pollinate" / "proto").symlink_to(ROOT / "proto", target_is_directory=True)
        for source in sorted((ROOT / "proto").glob("*.proto")):
            status = protoc.main(["grpc_tools.protoc", f"-I{root}", f"-I{well_known}", f"--python_out={root}",
                                  f"--pyi_out={root}", f"--grpc_python_out={root}",
                                  f"pollinate/proto/{source.name}"])
            if status != 0:
                raise RuntimeError(f"protoc failed on {source} (exit {status}); fix the .proto and reinstall")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_grpc_code()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
