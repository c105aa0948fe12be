"""Reads TensorBoard event files back, as TensorBoard does, for tests: TFRecord framing
(length, CRC, an `Event` protobuf, CRC) parsed with tensorboardX's own protobuf classes."""

from __future__ import annotations

import struct

from tensorboardX.proto.event_pb2 import Event

from elo_ray import storage


def events(data: bytes) -> list[Event]:
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        out.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
        pos += 12 + length + 4
    return out


def scalars(directory: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every event file under `directory` (local or URI), oldest file
    first; a file that starts with a purge step drops the earlier files' steps from there on."""
    out: dict[str, dict[int, float]] = {}
    for name in sorted(n for n in storage.listdir(directory) if n.startswith("events.out.tfevents.")):
        for e in events(storage.read_bytes(storage.join(directory, name))):
            if e.HasField("session_log") and e.session_log.status == e.session_log.START:
                for steps in out.values():
                    for s in [s for s in steps if s >= e.step]:
                        del steps[s]
            for v in e.summary.value:
                out.setdefault(v.tag, {})[e.step] = v.simple_value
    return out
