"""The data that crosses between the grader and a student's process: faithful, and nothing else."""

import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from torch import nn

from course_utils.checks import with_gradients
from course_utils.wire import Channel, Decoder, Encoder, WireError, pack, plain_module


def roundtrip(value, callbacks=None, make_callback=None):
    encoder = Encoder(callbacks=callbacks)
    header = json.loads(json.dumps(encoder.encode(value)))  # it really is JSON
    return Decoder(encoder.blobs, make_callback=make_callback).decode(header)


def test_plain_values_come_back_equal_with_their_types():
    value = {"a": (1, 2.5, None, True, "x"), 3: [complex(1, -2), float("inf")], (1, 2): "tuple key"}
    back = roundtrip(value)
    assert back == value and isinstance(back["a"], tuple) and isinstance(back[3], list)
    assert math.isnan(roundtrip(float("nan")))
    assert roundtrip(torch.float64) is torch.float64 and roundtrip(torch.Size([2, 3])) == torch.Size([2, 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bool, torch.uint8,
                                   torch.complex64, torch.bfloat16, torch.float16])
def test_tensors_keep_values_dtype_and_shape(dtype):
    t = (torch.randn(3, 4, 5) * 10).to(dtype)
    back = roundtrip(t)
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    assert roundtrip(torch.zeros(0, 3)).shape == (0, 3)
    assert roundtrip(torch.tensor(2.5)).item() == 2.5
    assert torch.equal(roundtrip(t.transpose(0, 2)), t.transpose(0, 2))  # non-contiguous


def test_gradient_flags_survive():
    leaf = torch.ones(3, requires_grad=True)
    assert roundtrip(leaf).requires_grad and roundtrip(leaf).grad_fn is None
    made = roundtrip(leaf * 2)
    assert made.requires_grad and made.grad_fn is not None
    assert not roundtrip(torch.ones(3)).requires_grad


def test_numpy_and_generators():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(roundtrip(a), a) and roundtrip(np.float32(1.5)) == np.float32(1.5)
    g = torch.Generator().manual_seed(7)
    back = roundtrip(g)
    fresh = torch.Generator().manual_seed(7)
    assert torch.equal(torch.rand(4, generator=back), torch.rand(4, generator=fresh))


def test_torch_nn_modules_travel_with_their_parameters():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).double().eval()
    back = roundtrip(net)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    assert isinstance(back, nn.Sequential) and isinstance(back[0], nn.Conv2d)
    assert back[0].stride == (2, 2) and not back.training
    assert torch.allclose(back(x), net(x))


def test_a_module_of_a_class_defined_elsewhere_is_not_data():
    class Mine(nn.Module):
        def forward(self, x):
            return x

    assert not plain_module(Mine()) and plain_module(nn.Linear(2, 2))
    with pytest.raises(WireError, match="cannot be sent"):
        Encoder().encode(Mine())
    calls = {}
    header = Encoder(callbacks=calls).encode(Mine())  # as an argument: a callback
    assert header == {"$": "callback", "number": 0} and isinstance(calls[0], Mine)


@pytest.mark.parametrize("header, problem", [
    ({"$": "module", "class": "os.system", "attrs": {}, "params": [], "buffers": [], "children": []},
     "not a torch.nn module class"),
    ({"$": "module", "class": "Module", "attrs": {"__class__": 1}, "params": [], "buffers": [],
      "children": []}, "bad module attribute"),
    ({"$": "tensor", "blob": 0, "dtype": "float32", "shape": [100]}, "do not match"),
    ({"$": "tensor", "blob": 0, "dtype": "object", "shape": [1]}, "malformed tensor"),
    ({"$": "pickle", "data": "..."}, "unknown tag"),
    ({"$": "callback", "number": 0}, "cannot be returned"),
    ({"$": "device", "type": "cuda"}, "only the CPU"),
])
def test_the_decoder_refuses_what_it_must_not_build(header, problem):
    with pytest.raises(WireError, match=problem):
        Decoder([b"\0" * 8]).decode(header)


def test_the_channel_refuses_oversized_and_malformed_messages():
    read_fd, write_fd = os.pipe()
    channel = Channel(read_fd, write_fd, max_bytes=1000)
    channel.send({"op": "x"}, [b"1" * 10])
    assert channel.receive(timeout=5) == ({"op": "x"}, [b"1" * 10])
    channel.send({"op": "big"}, [b"1" * 2000])
    with pytest.raises(WireError, match="larger than the limit"):
        channel.receive(timeout=5)
    with pytest.raises(WireError):  # every later receive sees the same end
        channel.receive(timeout=5)
    channel.close()
    read_fd, write_fd = os.pipe()
    channel = Channel(read_fd, write_fd)
    os.write(write_fd, struct.pack(">I", 5) + b"{oops")
    with pytest.raises(WireError):
        channel.receive(timeout=5)
    with pytest.raises(TimeoutError):
        Channel(*os.pipe()).receive(timeout=0.1)
    assert pack({"a": 1}, [])[:4] == struct.pack(">I", len(b'{"body": {"a": 1}, "blobs": []}'))


def test_with_gradients_locally():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    x = torch.tensor([3.0, 4.0])
    out, (grad_w, grad_x) = with_gradients(lambda a, b: (a * b) ** 2, w, x, wrt=(w, x))
    assert torch.equal(out, torch.tensor([9.0, 64.0]))
    assert torch.equal(grad_w, 2 * w.detach() * x**2) and grad_x is None  # x does not require grad
    out, grads = with_gradients(lambda a: a.detach(), w, wrt=(w,))
    assert grads == (None,)
