"""Protobuf in and out of the Tinker API, to and from the plain JSON that the queue and the ingest carry.

The model server never sees protobuf: `forward_backward` requests are decoded here into
`{data: [{model_input: [ids], loss_fn_inputs: {name: [numbers]}}], loss_fn, ...}`, and its JSON results are
encoded here into `ForwardBackwardOutput` / `SampleResponse` when the SDK retrieves them. Byte layouts follow
the SDK's `tinker/proto/request_conv.py` and `response_conv.py`: little-endian int32 tokens, dense tensors
in their declared dtype, `BatchedTensor` = concatenated data plus n+1 int64 byte offsets.
"""

from __future__ import annotations

import math
import sys
from array import array
from typing import Any

from google.protobuf.message import DecodeError

from api.tinker.proto import tinker_public_pb2 as pb

# Tensor dtypes the SDK sends, as array typecodes (sizes checked below: 'i' 4 bytes, 'q' 8, 'f' 4).
_DTYPES = {pb.DTYPE_FLOAT32: "f", pb.DTYPE_INT64: "q", pb.DTYPE_INT32: "i"}
assert array("i").itemsize == 4 and array("q").itemsize == 8 and array("f").itemsize == 4


class CodecError(ValueError):
    """A request body that cannot be decoded: the caller's fault (400)."""


def _unpack(code: str, raw: bytes) -> array:
    values = array(code)
    if len(raw) % values.itemsize:
        raise CodecError(f"{len(raw)} bytes is not a whole number of {values.itemsize}-byte values")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def _pack(code: str, values: Any) -> bytes:
    packed = array(code, values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _tensor(name: str, t: Any) -> list[float] | list[int]:
    if t.WhichOneof("encoding") != "dense":
        raise CodecError(f"loss_fn_inputs[{name!r}]: only dense tensors are supported")
    code = _DTYPES.get(t.dtype)
    if code is None:
        raise CodecError(f"loss_fn_inputs[{name!r}]: unsupported dtype {t.dtype}")
    values = _unpack(code, t.dense).tolist()
    if len(t.shape) > 1 or (len(t.shape) == 1 and t.shape[0] != len(values)):
        raise CodecError(f"loss_fn_inputs[{name!r}]: expected a 1-D tensor, got shape {list(t.shape)}")
    return values


def _tokens(chunks: Any) -> list[int]:
    ids: list[int] = []
    for chunk in chunks:
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise CodecError("only encoded_text chunks are supported (no images or audio)")
        ids += _unpack("i", chunk.encoded_text.tokens).tolist()
    return ids


def decode_forward_backward(body: bytes) -> dict[str, Any]:
    """A `ForwardBackwardRequest` as the queue's JSON operation (plus model_id and seq_id)."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise CodecError(f"not a ForwardBackwardRequest: {exc}") from None
    config: dict[str, float] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        if v.WhichOneof("value") != "number":
            raise CodecError(f"loss_fn_config[{k!r}]: only numbers are supported")
        config[k] = float(v.number)
    data = [
        {
            "model_input": _tokens(d.model_input),
            "loss_fn_inputs": {name: _tensor(name, t) for name, t in d.loss_fn_inputs.items()},
        }
        for d in msg.data
    ]
    return {
        "model_id": msg.model_id,
        "seq_id": int(msg.seq_id),
        "loss_fn": msg.loss_fn,
        "loss_fn_config": config,
        "forward_only": bool(msg.forward_only),
        "data": data,
    }


def call_id(body: bytes) -> tuple[str, int] | None:
    """(model_id, seq_id) of a `ForwardBackwardRequest` whose data could not be decoded, if it parses at all:
    the refused call must still take its turn in the model's order."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError:
        return None
    return (msg.model_id, int(msg.seq_id)) if msg.model_id and msg.seq_id > 0 else None


def encode_forward_backward_output(result: dict[str, Any]) -> bytes:
    """The model server's `{loss_fn_outputs: [{field: [floats]}], metrics}` as a `ForwardBackwardOutput`:
    one ArrayRecord whose fields are float32 BatchedTensors, one slice per datum."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    outputs: list[dict[str, list[float]]] = result["loss_fn_outputs"]
    for k, v in result["metrics"].items():
        out.metrics[k] = float(v)
    record = out.loss_fn_outputs.add(num_datums=len(outputs))
    for name in outputs[0] if outputs else []:
        offsets, data = [0], array("f")
        for datum in outputs:
            data.extend(math.nan if x is None else x for x in datum[name])
            offsets.append(len(data) * data.itemsize)
        field = record.fields[name]
        field.data = _pack("f", data)
        field.offsets = _pack("q", offsets)
        field.dtype = pb.DTYPE_FLOAT32
    return bytes(out.SerializeToString())


def encode_sample_response(result: dict[str, Any]) -> bytes:
    """The model server's `{sequences: [{tokens, logprobs, stop_reason}], prompt_logprobs}` as a
    `SampleResponse`."""
    out = pb.SampleResponse()
    for seq in result["sequences"]:
        s = out.sequences.add()
        s.tokens = _pack("i", seq["tokens"])
        s.logprobs = _pack("f", [math.nan if x is None else x for x in seq["logprobs"]])
        s.stop_reason = pb.STOP_REASON_STOP if seq["stop_reason"] == "stop" else pb.STOP_REASON_LENGTH
    if result.get("prompt_logprobs") is not None:
        out.prompt_logprobs = _pack("f", [math.nan if x is None else x for x in result["prompt_logprobs"]])
    return bytes(out.SerializeToString())
