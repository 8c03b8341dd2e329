"""api.tinker.codec against the official SDK's own converters (tinker 0.38.0, `tinker/proto/*_conv.py`):
what the SDK encodes we decode, and what we encode the SDK decodes, value for value."""

from __future__ import annotations

import math

import pytest
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from api.tinker import codec
from api.tinker.proto import tinker_public_pb2 as pb


def sdk_request(**config) -> bytes:
    datum = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.EncodedTextChunk(tokens=[5, 6, 7]), types.EncodedTextChunk(tokens=[70000, 9])]
        ),
        loss_fn_inputs={"target_tokens": [6, 7, 8, 9, 10], "weights": [1.0, 0.5, 0.0, -2.0, 1.0]},
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="ppo", loss_fn_config=config),
        model_id="s:train:0",
        seq_id=7,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def test_decodes_what_the_sdk_sends():
    op = codec.decode_forward_backward(sdk_request(clip_low_threshold=0.7))
    assert op["model_id"] == "s:train:0" and op["seq_id"] == 7 and op["loss_fn"] == "ppo"
    assert op["loss_fn_config"] == {"clip_low_threshold": pytest.approx(0.7)}
    assert op["forward_only"] is False
    (d,) = op["data"]
    assert d["model_input"] == [5, 6, 7, 70000, 9]  # chunks joined in order
    assert d["loss_fn_inputs"]["target_tokens"] == [6, 7, 8, 9, 10]
    assert all(isinstance(t, int) for t in d["loss_fn_inputs"]["target_tokens"])
    assert d["loss_fn_inputs"]["weights"] == [1.0, 0.5, 0.0, -2.0, 1.0]


def test_refuses_what_it_cannot_read():
    with pytest.raises(codec.CodecError):
        codec.decode_forward_backward(b"\xff\xff\xff")
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    msg.data.add().model_input.add().image.data = b"png"
    with pytest.raises(codec.CodecError, match="encoded_text"):
        codec.decode_forward_backward(msg.SerializeToString())
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = b"\x01\x00\x00\x00"
    d.loss_fn_inputs["weights"].dense = b"\x00\x00\x80"  # 3 bytes: not a float32
    d.loss_fn_inputs["weights"].dtype = pb.DTYPE_FLOAT32
    with pytest.raises(codec.CodecError, match="whole number"):
        codec.decode_forward_backward(msg.SerializeToString())


def test_the_sdk_reads_our_forward_backward_output():
    result = {
        "loss_fn_outputs": [
            {"logprobs": [-0.5, -1.25], "elementwise_loss": [0.5, 1.25]},
            {"logprobs": [-2.0, -0.125, -3.5], "elementwise_loss": [2.0, 0.125, 3.5]},
        ],
        "metrics": {"loss:sum": 7.375},
    }
    out = deserialize_forward_backward_output(codec.encode_forward_backward_output(result))
    assert out.metrics == {"loss:sum": 7.375}
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-0.5, -1.25], [-2.0, -0.125, -3.5]]
    assert out.loss_fn_outputs[1]["elementwise_loss"].tolist() == [2.0, 0.125, 3.5]


def test_the_sdk_reads_our_sample_response():
    result = {
        "sequences": [
            {"tokens": [4, 5, 2], "logprobs": [-0.5, -1.0, -0.25], "stop_reason": "stop"},
            {"tokens": [7], "logprobs": [-2.0], "stop_reason": "length"},
        ],
        "prompt_logprobs": [None, -1.5, -0.75],  # NaN first, carried as null in JSON
    }
    out = deserialize_sample_response(codec.encode_sample_response(result))
    assert [s.tokens for s in out.sequences] == [[4, 5, 2], [7]]
    assert [s.stop_reason for s in out.sequences] == ["stop", "length"]
    assert out.sequences[0].logprobs == [-0.5, -1.0, -0.25]
    first, *rest = out.prompt_logprobs
    assert first is None or math.isnan(first)
    assert rest == [-1.5, -0.75]
