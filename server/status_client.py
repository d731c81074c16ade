"""Clients of the status service: `pollinate status` and `pollinate download`.

A download is reassembled from its chunks, checked against the sha256 in its header, and only
then written, into a temporary sibling directory renamed into place: a failed download leaves
no partial adapter directory behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import grpc

from pollinate.proto import pollinate_status_pb2 as pb
from pollinate.proto import pollinate_status_pb2_grpc as pb_grpc
from pollinate.proto.run_config import RunConfig
from pollinate.security.certs import CertDir


class DownloadError(RuntimeError):
    """A downloaded adapter is incomplete or fails its checksum; nothing was written."""


def connect(coordinator: str, certs: CertDir | None = None) -> pb_grpc.PollinateStatusStub:
    """A stub for the status service at HOST:PORT; over TLS (with the operator's client certificate) when ``certs``."""
    if certs is None:
        channel = grpc.insecure_channel(coordinator)
    else:
        channel = grpc.secure_channel(coordinator, certs.status_client_credentials())
    return pb_grpc.PollinateStatusStub(channel)


def assemble(chunks: Iterable[pb.AdapterChunk]) -> tuple[pb.AdapterHeader, bytes]:
    """Header + concatenated data chunks, checked for length and sha256 against the header."""
    header, parts = None, []
    for chunk in chunks:
        if chunk.HasField("header"):
            header = chunk.header
        else:
            parts.append(chunk.data)
    if header is None:
        raise DownloadError("the status service sent adapter data without a header (sha256, size); retry")
    blob = b"".join(parts)
    where = f"run {header.run_id} round {header.round}"
    if len(blob) != header.total_bytes:
        raise DownloadError(f"the adapter of {where} arrived with {len(blob)} of {header.total_bytes} bytes; "
                            f"nothing was written, retry the download")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != header.sha256:
        raise DownloadError(f"the adapter of {where} fails its checksum: sha256 {digest}, the store says "
                            f"{header.sha256}; nothing was written, retry the download")
    return header, blob


def download(stub: pb_grpc.PollinateStatusStub, run_id: int, number: int, out_dir: str | Path,
             timeout_s: float = 600.0, chunk_bytes: int = 0) -> tuple[Path, pb.AdapterHeader]:
    """Fetch a round's adapter (0: the last stored round) into ``out_dir`` as a PEFT adapter directory."""
    from pollinate.models import write_adapter_dir

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory; choose another OUT_DIR")
    header, blob = assemble(stub.DownloadAdapter(
        pb.DownloadAdapterRequest(run_id=run_id, round=number, chunk_bytes=chunk_bytes), timeout=timeout_s))
    cfg = RunConfig.from_flat(json.loads(header.config_json))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_adapter_dir(cfg, blob, partial)
        if out.exists():
            out.rmdir()  # empty, checked above
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out, header
