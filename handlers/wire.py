"""Less work per request in TorchServe 0.12's Python worker, outside the handler: applied once per worker process.

- Its protocol reads every field of a request (each header's name and value, each length) with its own
  `recv`: dozens of system calls per request. `buffered_reads` reads what the socket holds in one `recv` and
  serves the fields from that buffer. Only the worker's loop reads its socket, and the original reader took
  exactly what each message held, so nothing read before the switch is lost.
- It logs "Backend received inference at: <time>" for every batch, a line the frontend then reads from the
  worker's stdout and writes to model_log.log. `quiet_batch_log` drops that line and only that line.

Both touch TorchServe's internals, so they apply to the version they were written against only.
"""

import logging
import sys

import ts
from ts.protocol import otf_message_handler as wire

VERSION = "0.12.0"  # TorchServe's last release, pinned in requirements.txt
CHUNK = 1 << 16
BATCH_LINE = "Backend received inference at: %d"  # ts/protocol/otf_message_handler.py's per-batch line
_buffers: dict[object, bytearray] = {}  # per socket: read but not yet taken


def buffered_read(conn, length: int) -> bytearray:
    """`length` bytes of `conn`, as TorchServe's `_retrieve_buffer`, from one buffer refilled a chunk at a time."""
    buffer = _buffers.setdefault(conn, bytearray())
    while len(buffer) < length:
        chunk = conn.recv(max(CHUNK, length - len(buffer)))
        if not chunk:
            logging.info("Frontend disconnected.")
            sys.exit(0)
        buffer += chunk
    data = buffer[:length]
    del buffer[:length]
    return data


def not_batch_line(record: logging.LogRecord) -> bool:
    return record.msg != BATCH_LINE


def applies() -> bool:
    return ts.__version__ == VERSION


def buffered_reads() -> None:
    wire._retrieve_buffer = buffered_read


def quiet_batch_log() -> None:
    root = logging.getLogger()
    if not_batch_line not in root.filters:
        root.addFilter(not_batch_line)
