"""Fuzzing every method of every service (target, drafter, orchestrator, health, reflection) on a real
cluster: hypothesis over every field of every request message (built from the proto descriptors, so
new fields are fuzzed too), the same messages with corrupted bytes, and random bytes. No call may end
in INTERNAL or UNKNOWN, no service may log a traceback or stop serving, and DSI still equals non-SI."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dsi.client import Client
from dsi.cluster import check_health
from dsi.v1 import common_pb2, drafter_pb2, orchestrator_pb2, target_pb2
from tests.integration.procs import Service, start_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CALL_TIMEOUT_S = 20.0
# Examples per method, each one call (a client stream carries up to 4 messages): more where the
# request has fields that reach the models.
FIELD_EXAMPLES = {"Verify": 600, "Draft": 500, "DraftFlow": 600, "Generate": 600, "Release": 120,
                  "ServerReflectionInfo": 100}
FIELD_EXAMPLES_OTHERS = 40  # Info and health: empty or one-field requests
BYTES_EXAMPLES = {"Verify": 100, "Draft": 100, "DraftFlow": 100, "Generate": 100}
BYTES_EXAMPLES_OTHERS = 50
VOCAB = 384  # tests/integration/conftest.py tiny_pair


@dataclass(frozen=True)
class Method:
    role: str  # the service process that answers it
    descriptor: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.descriptor.containing_service.full_name}/{self.descriptor.name}"

    @property
    def request_type(self) -> Descriptor:
        return self.descriptor.input_type


def _service(module: Any, name: str) -> ServiceDescriptor:
    return module.DESCRIPTOR.services_by_name[name]


def _methods() -> list[Method]:
    services = [
        ("target", _service(target_pb2, "TargetService")),
        ("drafter", _service(drafter_pb2, "DrafterService")),
        ("orchestrator", _service(orchestrator_pb2, "OrchestratorService")),
    ]
    # Health on every server; reflection (the same servicer everywhere) on one of them.
    services += [(role, _service(health_pb2, "Health")) for role in ("target", "drafter", "orchestrator")]
    services.append(("drafter", _service(reflection_pb2, "ServerReflection")))
    return [Method(role, m) for role, svc in services for m in svc.methods]


METHODS = _methods()
# Every status seen, per method: the figures reported at the end.
SEEN: dict[str, Counter[str]] = {}


# -- strategies built from the descriptors -----------------------------------------------------------

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_EDGES = [0, 1, 2, -1, VOCAB - 1, VOCAB, 255, 256, 257, 1023, 1024, 1025, 4096, 8192, INT32_MAX, INT32_MIN]


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        # Mostly near the values that matter (vocabulary, limits), sometimes anything.
        return st.one_of(st.integers(-3, VOCAB + 2), st.sampled_from(_EDGES), st.integers(INT32_MIN, INT32_MAX))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.integers(-3, 50), st.integers(-(2**63), 2**63 - 1))
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.integers(0, 50), st.integers(0, 2**32 - 1))
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.integers(0, 50), st.integers(0, 2**64 - 1))
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.one_of(st.sampled_from([0.0, 0.5, 0.9, 1.0, 1.5, -0.5]), st.floats(width=32))
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(
            st.sampled_from(["", "x", "def f(x):", "a\nb", "\x00", "é" * 300, "s" * 257]),
            st.text(max_size=40),
        )
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(INT32_MIN, INT32_MAX))
    raise AssertionError(f"no strategy for field type {t} ({field.full_name})")


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    one = message_strategy(field.message_type, depth + 1) if field.message_type is not None else _scalar(field)
    if not field.is_repeated:
        return one
    if depth == 0 and field.message_type is None:
        # Sometimes past the sequence limits: one value repeated (drawing 500 values one by one is slow).
        return st.one_of(st.lists(one, max_size=12), st.tuples(st.integers(500, 600), one).map(lambda t: [t[1]] * t[0]))
    return st.lists(one, max_size=8)


def set_field(msg: Any, field: FieldDescriptor, value: Any) -> None:
    """Set (replace) one field of ``msg``; setting a oneof member clears the others."""
    if field.is_repeated:
        target = getattr(msg, field.name)
        del target[:]
        if field.message_type is not None:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif field.message_type is not None:
        getattr(msg, field.name).CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of this type with any subset of fields set to any value (a oneof gets at most one)."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    # proto3 `optional` fields sit in a synthetic oneof of their own: those are plain fields here.
    real_oneofs = [o for o in descriptor.oneofs if not (len(o.fields) == 1 and o.name == f"_{o.fields[0].name}")]
    in_oneof = {f.name for o in real_oneofs for f in o.fields}
    plain = {f.name: _value(f, depth) for f in descriptor.fields if f.name not in in_oneof}
    choices = [
        st.one_of(st.none(), *[st.tuples(st.just(f.name), _value(f, depth)) for f in o.fields]) for o in real_oneofs
    ]

    def build(args: tuple[dict[str, Any], tuple[tuple[str, Any] | None, ...]]) -> Any:
        fields, picked = args
        msg = cls()
        for name, value in [*fields.items(), *[p for p in picked if p is not None]]:
            set_field(msg, descriptor.fields_by_name[name], value)
        return msg

    return st.tuples(st.fixed_dictionaries({}, optional=plain), st.tuples(*choices)).map(build)


# Valid requests that do real work (small), the starting points of near-valid ones: arbitrary values
# in every field at once rarely get past validation, one to three changed fields do.
_SESSION = {"request_id": "fuzz", "session_id": "fuzz-session"}
BASELINES: dict[str, list[Any]] = {
    "dsi.v1.VerifyRequest": [
        target_pb2.VerifyRequest(**_SESSION, token_ids=[5, 6, 7, 8, 9], first_position=3),
        target_pb2.VerifyRequest(**_SESSION, token_ids=[5, 6, 7, 8, 9], first_position=3, chunk_origin=2, chunk_size=8,
                                 sampling=common_pb2.SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3)),
    ],
    "dsi.v1.DraftRequest": [drafter_pb2.DraftRequest(**_SESSION, token_ids=[5, 6, 7], max_tokens=4)],
    "dsi.v1.DraftFlowRequest": [
        drafter_pb2.DraftFlowRequest(start=drafter_pb2.DraftRequest(**_SESSION, token_ids=[5, 6, 7], max_tokens=2)),
    ],
    "dsi.v1.TargetReleaseRequest": [target_pb2.TargetReleaseRequest(session_id="fuzz-session")],
    "dsi.v1.DrafterReleaseRequest": [drafter_pb2.DrafterReleaseRequest(session_id="fuzz-session")],
    "dsi.v1.GenerateRequest": [
        orchestrator_pb2.GenerateRequest(prompt="def f(x):", max_new_tokens=4, ignore_eos=True, lookahead=2),
        orchestrator_pb2.GenerateRequest(request_id="fuzz-1", prompt_token_ids=[5, 6, 7], max_new_tokens=3,
                                         mode=orchestrator_pb2.MODE_SI, temperature=0.9, seed=5, stop=["x"]),
    ],
    "grpc.health.v1.HealthCheckRequest": [health_pb2.HealthCheckRequest(service="")],
}
# The messages after the first of a client stream.
FOLLOWING: dict[str, list[Any]] = {"dsi.v1.DraftFlowRequest": [drafter_pb2.DraftFlowRequest(grant=2)]}


def _paths(descriptor: Descriptor) -> list[tuple[FieldDescriptor, ...]]:
    """Every field, and every field of a (non-repeated) message field: where a mutation lands."""
    out: list[tuple[FieldDescriptor, ...]] = []
    for f in descriptor.fields:
        out.append((f,))
        if f.message_type is not None and not f.is_repeated:
            out += [(f, g) for g in f.message_type.fields]
    return out


def near_valid(base: Any) -> st.SearchStrategy[Any]:
    """``base`` with zero to three of its fields (or their fields) set to fuzzed values."""
    paths = _paths(base.DESCRIPTOR)

    @st.composite
    def mutate(draw: st.DrawFn) -> Any:
        msg = type(base)()
        msg.CopyFrom(base)
        for path in draw(st.lists(st.sampled_from(paths), max_size=3, unique=True)):
            parent = msg
            for f in path[:-1]:
                parent = getattr(parent, f.name)
            set_field(parent, path[-1], draw(_value(path[-1], len(path) - 1)))
        return msg

    return mutate()


def request_strategy(descriptor: Descriptor, following: bool = False) -> st.SearchStrategy[Any]:
    """A third arbitrary messages, two thirds near-valid ones where there is a baseline (``following``:
    a message after the first of a client stream)."""
    bases = (FOLLOWING if following else BASELINES).get(descriptor.full_name, [])
    arbitrary = message_strategy(descriptor)
    if not bases:
        return arbitrary
    mutated = st.one_of(*[near_valid(b) for b in bases])
    return st.one_of(arbitrary, mutated, mutated)


def corrupted(data: bytes, how: str, r: int) -> bytes:
    """``data`` as is, or with one byte flipped, truncated, or with garbage appended."""
    if how == "flip" and data:
        i = r % len(data)
        return data[:i] + bytes([data[i] ^ (1 + (r >> 8) % 255)]) + data[i + 1:]
    if how == "truncate" and data:
        return data[: r % len(data)]
    if how == "append":
        return data + random.Random(r).randbytes(1 + r % 7)
    return data


def wire_message(descriptor: Descriptor, following: bool = False) -> st.SearchStrategy[bytes]:
    hows = st.sampled_from(["as_is", "as_is", "as_is", "flip", "truncate", "append"])
    return st.builds(corrupted, request_strategy(descriptor, following).map(lambda m: m.SerializeToString()), hows,
                     st.integers(0, 2**20))


# -- the cluster and the calls ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One target, one drafter, one orchestrator; small limits so that valid fuzzed work stays small."""
    target_dir, drafter_dir = tiny_pair
    logs = tmp_path_factory.mktemp("fuzz-logs")
    model_flags = ["--threads", "1", "--max-sequence-tokens", "512"]
    started: list[Service] = []
    try:
        target = start_service("target", ["--model", str(target_dir), *model_flags], logs)
        started.append(target)
        drafter = start_service("drafter", ["--model", str(drafter_dir), *model_flags, "--max-drafts", "64"], logs)
        started.append(drafter)
        orch = start_service("orchestrator", ["--targets", target.address, "--drafter", drafter.address,
                                              "--max-new-tokens", "12", "--deadline-s", "15"], logs)
        started.append(orch)
        services = {"target": target, "drafter": drafter, "orchestrator": orch}
        channels = {role: grpc.insecure_channel(s.address) for role, s in services.items()}
        try:
            yield {"services": services, "channels": channels}
        finally:
            for ch in channels.values():
                ch.close()
    finally:
        for s in reversed(started):
            s.stop()


def call(channel: grpc.Channel, method: Method, messages: list[bytes]) -> str:
    """Send raw request bytes (one message, or a client stream), read the answer; the status name."""
    d = method.descriptor
    max_responses = 1 if d.name == "Watch" else 64  # Watch streams until cancelled
    try:
        if d.client_streaming:
            responses = channel.stream_stream(method.path)(iter(messages), timeout=CALL_TIMEOUT_S)
        elif d.server_streaming:
            responses = channel.unary_stream(method.path)(messages[0], timeout=CALL_TIMEOUT_S)
        else:
            channel.unary_unary(method.path)(messages[0], timeout=CALL_TIMEOUT_S)
            return "OK"
        for n, _ in enumerate(responses, 1):
            if n >= max_responses:
                responses.cancel()
                return "OK"
        return "OK"
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        assert code not in FORBIDDEN, (method.path, messages, code, err.details())  # type: ignore[attr-defined]
        # Every valid request here is a few tokens on a tiny model: running into the deadline is a hang.
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, (method.path, messages, "hung")
        if code == grpc.StatusCode.CANCELLED and d.name == "Watch":
            return "OK"
        return str(code.name)


def record(method: Method, status: str) -> None:
    SEEN.setdefault(method.path + f" [{method.role}]", Counter())[status] += 1


FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure here is reproducible
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.role}:{m.path}")
def test_fuzzed_fields_are_never_internal_or_unknown(cluster: dict[str, Any], method: Method) -> None:
    channel = cluster["channels"][method.role]
    first = wire_message(method.request_type)
    if method.descriptor.client_streaming:
        rest = st.lists(wire_message(method.request_type, following=True), max_size=3)
        messages = st.tuples(first, rest).map(lambda t: [t[0], *t[1]])
    else:
        messages = first.map(lambda b: [b])

    @settings(FUZZ_SETTINGS, max_examples=FIELD_EXAMPLES.get(method.descriptor.name, FIELD_EXAMPLES_OTHERS))
    @given(messages)
    def fuzz(batch: list[bytes]) -> None:
        record(method, call(channel, method, batch))

    fuzz()


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.role}:{m.path}")
def test_random_bytes_are_never_internal_or_unknown(cluster: dict[str, Any], method: Method) -> None:
    channel = cluster["channels"][method.role]
    one = st.binary(max_size=96)
    messages = st.lists(one, min_size=1, max_size=4) if method.descriptor.client_streaming else one.map(lambda b: [b])

    @settings(FUZZ_SETTINGS, max_examples=BYTES_EXAMPLES.get(method.descriptor.name, BYTES_EXAMPLES_OTHERS))
    @given(messages)
    def fuzz(batch: list[bytes]) -> None:
        record(method, call(channel, method, batch))

    fuzz()


def test_after_fuzzing_services_serve_log_no_tracebacks_and_dsi_equals_nonsi(cluster: dict[str, Any]) -> None:
    services: dict[str, Service] = cluster["services"]
    for role, s in services.items():
        assert s.process.poll() is None, f"{role} exited"
        assert check_health(s.address, timeout_s=10), f"{role} is not SERVING"
    with Client(services["orchestrator"].address, timeout=60) as client:
        for i, prompt in enumerate(["def fibonacci(n):", "The quick brown", "import os\n"]):
            for kw in ({}, {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 11 + i}):
                dsi = client.generate(prompt, max_new_tokens=12, mode="dsi", ignore_eos=True, lookahead=3, **kw)
                nonsi = client.generate(prompt, max_new_tokens=12, mode="nonsi", ignore_eos=True, **kw)
                assert dsi.token_ids == nonsi.token_ids, (prompt, kw)
                assert dsi.stats["new_tokens"] == 12
    for role, s in services.items():
        text = s.log.read_text(errors="replace")
        assert "Traceback" not in text, f"{role} logged a traceback:\n{text[text.index('Traceback') - 300:][:3000]}"
    if SEEN:  # the figures, shown with -s (or -rA)
        total = sum(sum(c.values()) for c in SEEN.values())
        lines = [f"{path}: {sum(c.values())} calls, {dict(c.most_common())}" for path, c in sorted(SEEN.items())]
        print(f"\nfuzzed calls: {total} at {time.strftime('%H:%M:%S')}\n" + "\n".join(lines))
