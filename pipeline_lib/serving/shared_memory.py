"""Request and response tensors through Triton's system shared memory, for a caller on the server's host
(:class:`pipeline_lib.serving.client.RecsysClient` with ``shared_memory=True``).

The client owns two POSIX shared-memory regions (``/dev/shm``), one for the inputs and one for the
outputs, registered with the server once (on the first call) and reused by every later call; a request
bigger than a region replaces it by one twice as large. A call writes the input tensors into the input
region (BYTES tensors encoded by :func:`pipeline_lib.serving.bytes_tensor.serialize`, the vectorised
encoder) and sends only their places; the server writes fixed-size outputs (the scores) into the output
region, read back as a copy. ``close`` unregisters both regions and removes them.

The regions come from Python's ``multiprocessing.shared_memory`` (tritonclient's own
``tritonclient.utils.shared_memory`` needs ``pkg_resources``, which the pinned setuptools no longer has);
Triton maps them by their POSIX name. One transport serves one call at a time (the client holds a lock).
"""
from __future__ import annotations

import itertools
import math
import os
from multiprocessing import shared_memory
from typing import Any, Mapping, Optional

import numpy as np
from tritonclient.utils import triton_to_np_dtype

from pipeline_lib.serving import bytes_tensor

ALIGN = 64  # each tensor starts at a multiple of this many bytes in its region
MIN_REGION_BYTES = 1 << 16
_IDS = itertools.count()


def fixed_dtype(datatype: str) -> Optional[np.dtype]:
    """The numpy dtype of a fixed-size Triton datatype (tritonclient's mapping); None for BYTES, and for BF16,
    which tritonclient maps to float32 (another size)."""
    np_type = triton_to_np_dtype(datatype) if datatype != "BF16" else None
    return None if np_type is None or np_type is np.object_ else np.dtype(np_type)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Region:
    """One shared-memory region registered with the server under ``name``."""

    def __init__(self, client: Any, name: str, size: int):
        self.client, self.name, self.size = client, name, size
        self.shm = shared_memory.SharedMemory(create=True, size=size)
        self.view: np.ndarray = np.ndarray((size,), dtype=np.uint8, buffer=self.shm.buf)
        try:
            client.register_system_shared_memory(name, self.key, size)
        except Exception:
            self._remove()
            raise

    @property
    def key(self) -> str:
        """The POSIX name the server opens (``/dev/shm`` + key)."""
        return "/" + self.shm.name

    def _remove(self) -> None:
        del self.view
        self.shm.close()
        self.shm.unlink()

    def release(self) -> None:
        """Unregister the region from the server, then unmap and remove it (even if the server is gone)."""
        try:
            self.client.unregister_system_shared_memory(self.name)
        finally:
            self._remove()


def output_bytes(datatype: str, shape: list[int], rows: int, batch_dim: bool) -> Optional[int]:
    """Bytes of an output of ``rows`` rows whose metadata shape is ``shape`` (-1: the rows, and the batch
    dimension with dynamic batching); None when its size cannot be known in advance (BYTES, several
    variable dimensions)."""
    dtype = fixed_dtype(datatype)
    variable = [d for d in shape if d < 0]
    if dtype is None or len(variable) != 1 + int(batch_dim):
        return None
    return dtype.itemsize * rows * math.prod(d for d in shape if d >= 0)


class SharedMemoryTransport:
    """Input and output regions of one client (``client``: a tritonclient ``InferenceServerClient``,
    ``tc``: its module, ``tritonclient.grpc`` or ``tritonclient.http``)."""

    def __init__(self, client: Any, tc: Any):
        self.client, self.tc = client, tc
        self.prefix = f"recsys-{os.getpid()}-{next(_IDS)}"
        self.regions: dict[str, Region] = {}
        self.out_offsets: dict[str, int] = {}  # the last call's outputs in the output region
        self.generation = 0

    def _region(self, role: str, needed: int) -> Region:
        """The ``role`` region (``in`` or ``out``), replaced by a bigger one when ``needed`` does not fit."""
        region = self.regions.get(role)
        if region is not None and region.size >= needed:
            return region
        if region is not None:
            del self.regions[role]
            region.release()
        size = max(MIN_REGION_BYTES, 2 * (region.size if region else 0), 1 << max(0, needed - 1).bit_length())
        self.generation += 1
        self.regions[role] = Region(self.client, f"{self.prefix}-{role}-{self.generation}", size)
        return self.regions[role]

    def inputs(self, arrays: Mapping[str, np.ndarray], datatypes: Mapping[str, str]) -> list:
        """tritonclient inputs whose data is written into the input region (``datatypes``: name -> Triton
        datatype); an empty tensor is sent in the request itself."""
        encoded = {n: bytes_tensor.serialize(a) if datatypes[n] == "BYTES" else np.ascontiguousarray(a).reshape(-1)
                   for n, a in arrays.items()}
        sizes = {n: e.nbytes for n, e in encoded.items()}
        region = self._region("in", sum(_aligned(s) for s in sizes.values()))
        inputs, offset = [], 0
        for name, arr in arrays.items():
            inp = self.tc.InferInput(name, list(arr.shape), datatypes[name])
            inputs.append(inp)
            if sizes[name] == 0:
                inp.set_data_from_numpy(arr)
                continue
            region.view[offset:offset + sizes[name]] = encoded[name].view(np.uint8)
            inp.set_shared_memory(region.name, sizes[name], offset)
            offset += _aligned(sizes[name])
        return inputs

    def outputs(self, sizes: Mapping[str, Optional[int]]) -> list:
        """Requested outputs: those of known size (``sizes``: name -> bytes or None) into the output region."""
        known = {n: s for n, s in sizes.items() if s}
        region: Any = self._region("out", sum(_aligned(s) for s in known.values())) if known else None
        outputs, offset, self.out_offsets = [], 0, {}
        for name in sizes:
            out = self.tc.InferRequestedOutput(name)
            if name in known:
                out.set_shared_memory(region.name, known[name], offset)
                self.out_offsets[name] = offset
                offset += _aligned(known[name])
            outputs.append(out)
        return outputs

    def read(self, result: Any, name: str) -> np.ndarray:
        """Output ``name`` of the last call's ``result`` (a copy: the region is reused by the next call)."""
        offset = self.out_offsets.get(name)
        if offset is None:
            return result.as_numpy(name)
        out = result.get_output(name)
        datatype, shape = (out["datatype"], out["shape"]) if isinstance(out, dict) else (out.datatype, out.shape)
        count = math.prod(shape)
        view = self.regions["out"].view
        return np.frombuffer(view, dtype=fixed_dtype(datatype), count=count, offset=offset).reshape(shape).copy()

    def close(self) -> None:
        """Unregister and remove every region (each one even when another fails)."""
        errors = []
        for role in list(self.regions):
            try:
                self.regions.pop(role).release()
            except Exception as exc:  # noqa: BLE001 - the others are still released; re-raised below
                errors.append(exc)
        if errors:
            raise errors[0]
