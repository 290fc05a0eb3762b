"""Every simulated client's kept state, in memory up to a byte budget and on disk beyond it.

A method that keeps client state (FedSmoothLoRA's last rank-r upload, FedSA-LoRA's own ``B``) holds one
:class:`~peft_fed.state.ClientState` per client that has trained, so a simulation of many clients grows with them.
:class:`ClientStateStore` is the ``{client id: ClientState}`` mapping the engine keeps: a state whose tensors would
take the resident bytes past ``memory_budget_bytes`` sends the least recently used states to one safetensors file
each (written once per change: a state read back and not replaced keeps its file), and reading a spilled client
loads its file again. Its metadata (round, backbone version) stays in memory, so a client that never trained costs
no disk and a spilled one a few hundred bytes of RAM. safetensors stores the tensors' bytes as they are, so a state
read back is bit-for-bit the state stored.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..state import ClientState


class ClientStateStore(MutableMapping[str, ClientState]):
    """``{client id: ClientState}`` whose tensors stay within ``memory_budget_bytes``, the rest spilled to disk.

    Args:
        states: the initial states (kept in their order; iteration follows insertion order like a dict).
        memory_budget_bytes: most bytes of client tensors kept in memory; ``None`` keeps everything in memory.
            The state last read or written always stays in memory, so the resident bytes can pass the budget by
            at most that one state.
        spill_dir: the folder of the spilled states (created if missing); by default a temporary folder deleted
            with the store. A folder given here is left in place, its spill files removed by :meth:`clear`.
    """

    def __init__(
        self,
        states: Mapping[str, ClientState] | Iterable[tuple[str, ClientState]] = (),
        *,
        memory_budget_bytes: int | None = None,
        spill_dir: str | os.PathLike | None = None,
    ) -> None:
        if memory_budget_bytes is not None and memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0 or None, got {memory_budget_bytes}")
        self.memory_budget_bytes = memory_budget_bytes
        self._requested_spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._spill_dir: Path | None = None
        # every client: its full state when resident or tensor-free, a metadata-only stand-in when spilled
        self._entries: dict[str, ClientState] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # clients holding tensors in memory, least recent first
        self._resident_bytes = 0
        self._spilled: set[str] = set()
        self._on_disk: set[str] = set()  # clients whose spill file equals their current state
        self.update(states)

    # ------------------------------------------------------------------ the mapping

    def __getitem__(self, client_id: str) -> ClientState:
        state = self._entries[client_id]
        if client_id in self._spilled:
            state = self._read_back(client_id)
        elif client_id in self._resident:
            self._resident.move_to_end(client_id)
        return state

    def __setitem__(self, client_id: str, state: ClientState) -> None:
        if not isinstance(state, ClientState):
            raise TypeError(f"a client state store holds ClientState objects, got {type(state).__name__}")
        self._forget(client_id)
        self._entries[client_id] = state
        nbytes = state.nbytes
        if nbytes:
            self._make_resident(client_id, nbytes)

    def __delitem__(self, client_id: str) -> None:
        if client_id not in self._entries:
            raise KeyError(client_id)
        self._forget(client_id)
        del self._entries[client_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._entries

    def clear(self) -> None:
        """Remove every state (and every spill file) without reading the spilled ones back."""
        for client_id in list(self._on_disk):
            self._spill_path(client_id).unlink(missing_ok=True)
        self._entries.clear()
        self._resident.clear()
        self._resident_bytes = 0
        self._spilled.clear()
        self._on_disk.clear()

    # ------------------------------------------------------------------ what it holds

    @property
    def resident_bytes(self) -> int:
        """Bytes of client tensors in memory now."""
        return self._resident_bytes

    @property
    def spilled_clients(self) -> frozenset[str]:
        """Clients whose tensors are on disk only."""
        return frozenset(self._spilled)

    @property
    def spill_dir(self) -> Path | None:
        """The folder of the spill files (``None`` until a state is first spilled)."""
        return self._spill_dir

    # ------------------------------------------------------------------ spilling

    def _forget(self, client_id: str) -> None:
        if client_id in self._resident:
            self._resident_bytes -= self._resident.pop(client_id)
        self._spilled.discard(client_id)
        if client_id in self._on_disk:
            self._on_disk.discard(client_id)
            self._spill_path(client_id).unlink(missing_ok=True)

    def _make_resident(self, client_id: str, nbytes: int) -> None:
        self._resident[client_id] = nbytes
        self._resident_bytes += nbytes
        if self.memory_budget_bytes is None:
            return
        while self._resident_bytes > self.memory_budget_bytes and len(self._resident) > 1:
            oldest = next(iter(self._resident))
            self._spill(oldest)

    def _spill(self, client_id: str) -> None:
        state = self._entries[client_id]
        if client_id not in self._on_disk:
            tensors, meta = state.state_dict()
            save_file(tensors, self._spill_path(client_id), metadata=meta)
            self._on_disk.add(client_id)
        # a new metadata-only object: a caller still holding the full state keeps it intact
        self._entries[client_id] = ClientState(client_id, state.last_round, state.backbone_version)
        self._resident_bytes -= self._resident.pop(client_id)
        self._spilled.add(client_id)

    def _read_back(self, client_id: str) -> ClientState:
        with safe_open(self._spill_path(client_id), framework="pt") as reader:  # memory-mapped; get_tensor copies
            state = ClientState.from_state_dict({key: reader.get_tensor(key) for key in reader.keys()}, reader.metadata())
        self._entries[client_id] = state
        self._spilled.discard(client_id)
        self._make_resident(client_id, state.nbytes)
        return state

    def _spill_path(self, client_id: str) -> Path:
        if self._spill_dir is None:
            if self._requested_spill_dir is not None:
                self._requested_spill_dir.mkdir(parents=True, exist_ok=True)
                self._spill_dir = self._requested_spill_dir
            else:
                self._spill_dir = Path(tempfile.mkdtemp(prefix="peft-fed-client-states-"))
                weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        return self._spill_dir / f"client-{client_id}.safetensors"
