"""The standard health check (grpc.health.v1.Health/Check) without grpcio-health-checking.

The SDK installs with grpcio + protobuf only, so the two tiny messages of health.proto are encoded
by hand here (proto3 wire format, https://protobuf.dev/programming-guides/encoding/):

    message HealthCheckRequest  { string service = 1; }          // tag 0x0A, length, UTF-8 bytes
    message HealthCheckResponse { ServingStatus status = 1; }    // tag 0x08, varint
"""

from __future__ import annotations

METHOD = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(value: int) -> bytes:
    """Base-128 little-endian groups of 7 bits; the high bit says another byte follows."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode the varint starting at pos: (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in HealthCheckResponse")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def encode_request(service: str) -> bytes:
    """HealthCheckRequest{service}: proto3 omits a field that holds its default (the empty string)."""
    raw = service.encode()
    return b"\x0a" + _varint(len(raw)) + raw if raw else b""


def decode_response(data: bytes) -> str:
    """HealthCheckResponse -> status name; unknown fields (a newer server's) are skipped."""
    status, pos = 0, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:  # varint
            value, pos = _read_varint(data, pos)
            if field == 1:
                status = value
        elif wire_type == 2:  # length-delimited
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire_type in (1, 5):  # fixed 64 / 32 bits
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} in HealthCheckResponse")
    return STATUS_NAMES.get(status, f"STATUS_{status}")
