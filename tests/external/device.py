"""Modbus TCP peers the field worker talks to: a real pymodbus server whose registers the test
sets and inspects, and a plain socket server that answers every request with garbage.

Each runs its own thread (pymodbus: an asyncio loop in that thread) and can be stopped and
started again on the same port.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

READ_INPUT = 4


class Registers:
    """The device's registers as the test sees them, shared with the server thread. The test is
    the only source of input registers; holding registers change by the client's writes too.
    Every request the client made is recorded."""

    def __init__(self, inputs: dict[int, int], holdings: dict[int, int]):
        self.lock = threading.Lock()
        self.input = dict(inputs)
        self.holding = dict(holdings)
        self.writes: list[tuple[int, int]] = []  # (register, raw) in arrival order
        self.reads = 0  # read requests answered
        # A Modbus exception to answer reads (functions 3, 4) or writes (6, 16) with, instead.
        self.fail_reads_with: ExcCodes | None = None
        self.fail_writes_with: ExcCodes | None = None

    def set_input(self, register: int, raw: int):
        with self.lock:
            assert register in self.input, f"input register {register} is not on the device"
            self.input[register] = raw & 0xFFFF

    def get_holding(self, register: int) -> int:
        with self.lock:
            return self.holding[register]

    def fail(self, reads: ExcCodes | None = None, writes: ExcCodes | None = None):
        with self.lock:
            self.fail_reads_with, self.fail_writes_with = reads, writes

    def writes_to(self, register: int) -> list[int]:
        with self.lock:
            return [raw for r, raw in self.writes if r == register]

    def read_count(self) -> int:
        with self.lock:
            return self.reads


class PymodbusDevice:
    """A pymodbus 3.x TCP server (unit `unit_id`) on 127.0.0.1:port, backed by `regs`."""

    def __init__(self, port: int, regs: Registers, unit_id: int = 1):
        self.port = port
        self.regs = regs
        self.unit_id = unit_id
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: ModbusTcpServer | None = None
        self.thread: threading.Thread | None = None

    async def _action(self, fc, start, address, count, current, set_values):
        """Keeps pymodbus's register list and `regs` the same, in both directions."""
        regs = self.regs
        with regs.lock:
            fail = regs.fail_reads_with if set_values is None else regs.fail_writes_with
            if fail is not None:
                return fail
            table = regs.input if fc == READ_INPUT else regs.holding
            if set_values is None:
                regs.reads += 1
                for a in range(address, address + count):
                    current[a - start] = table[a]
            else:
                for i, raw in enumerate(set_values):
                    table[address + i] = int(raw)
                    regs.writes.append((address + i, int(raw)))
        return None

    def _device(self) -> SimDevice:
        def block(regs: dict[int, int]) -> list[SimData]:
            lo, hi = min(regs), max(regs)
            assert sorted(regs) == list(range(lo, hi + 1)), "registers must be contiguous"
            return [SimData(lo, count=hi - lo + 1, values=0, datatype=DataType.REGISTERS)]

        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        return SimDevice(
            id=self.unit_id,
            simdata=(bits, list(bits), block(self.regs.holding), block(self.regs.input)),
            action=self._action,
        )

    async def _serve(self):
        # The server wants a running loop from its constructor on.
        self.server = ModbusTcpServer(self._device(), address=("127.0.0.1", self.port))
        await self.server.serve_forever(background=True)

    def start(self, timeout: float = 10):
        assert self.thread is None, "already running"
        ready = threading.Event()
        failure: list[BaseException] = []

        def run():
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as e:  # reported to start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self.thread = threading.Thread(target=run, name=f"pymodbus:{self.port}", daemon=True)
        self.thread.start()
        assert ready.wait(timeout), f"pymodbus server on port {self.port} did not start within {timeout} s"
        if failure:
            self.thread.join()
            self.thread = None
            raise AssertionError(f"pymodbus server on port {self.port} failed to start: {failure[0]!r}")
        wait_listening(self.port, timeout)

    def stop(self, timeout: float = 10):
        """Closes the listener and every connection (a device switched off)."""
        if self.thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop)
        fut.result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "pymodbus server thread did not end"
        self.thread = None
        self.server = None


class GarbageDevice:
    """Accepts Modbus TCP clients and answers each request with one kind of garbage, the kinds
    in turn: bytes that are no Modbus response at all, a header announcing an impossible
    length, a well-framed answer of the wrong function, a read answer with too few registers,
    one with none at all, and a header cut short by a hang-up."""

    KINDS = ("noise", "oversized", "wrong-function", "short-read", "zero-count", "truncated")
    # What the field layer says about each (its fault texts; see worker/src/bin/field.rs).
    FAULTS = {
        "noise": "device sent a malformed frame header",
        "oversized": "device sent a malformed frame header",
        "wrong-function": "device answered with an error or garbage",
        "short-read": "the device answered 2 bytes of registers in a frame of 11 bytes, asked 4 registers",
        "zero-count": "the device answered 0 bytes of registers in a frame of 9 bytes, asked 4 registers",
        "truncated": "the device closed the connection",
    }

    def __init__(self, port: int):
        self.port = port
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(self.KINDS, 0)
        self.turn = 0
        self.clients: list[socket.socket] = []

    def start(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(8)
        s.settimeout(0.1)
        self.sock = s
        self.stopping.clear()
        self.thread = threading.Thread(target=self._accept, name=f"garbage:{self.port}", daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                c, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self.lock:
                self.clients.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def answer(kind: str, request: bytes) -> bytes:
        tid, unit, fc = request[0:2], request[6:7], request[7:8]
        if kind == "noise":
            return b"\xde\xad\xbe\xef\x00\x03\x01\xff\xff" + b"garbage" * 4
        if kind == "oversized":
            return tid + b"\x00\x00\xff\xff" + unit + fc + b"\x00" * 16
        if kind == "wrong-function":
            return tid + b"\x00\x00\x00\x05" + unit + b"\x2b\x0e\x01\x01"
        if kind == "short-read":
            return tid + b"\x00\x00\x00\x05" + unit + fc + b"\x02\x01\xf4"
        if kind == "zero-count":
            # A well-framed read answer holding no registers at all (once an index panic).
            return tid + b"\x00\x00\x00\x03" + unit + fc + b"\x00"
        if kind == "truncated":
            return tid + b"\x00\x00"
        raise ValueError(kind)

    def _serve(self, c: socket.socket):
        c.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                data = c.recv(512)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                break
            if len(data) < 8:
                break
            with self.lock:
                kind = self.KINDS[self.turn % len(self.KINDS)]
                self.turn += 1
            try:
                c.sendall(self.answer(kind, data))
            except OSError:
                break
            with self.lock:
                self.counts[kind] += 1
            if kind == "truncated":
                break
        c.close()

    def served(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def stop(self):
        self.stopping.set()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.thread is not None:
            self.thread.join(5)
            self.thread = None
        with self.lock:
            for c in self.clients:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.clients.clear()


def wait_listening(port: int, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s: {e}") from None
            time.sleep(0.05)
