#!/usr/bin/python3
"""A flexcapd client in Python: proof that the API is usable from another language.

Usage: /usr/bin/python3 test/python/flexcap_client.py unix:/path/to/api.sock NAME IMAGE

Needs only Debian packages: python3-grpcio, python3-grpc-tools and protobuf-compiler (all
installed by compile/setup-host.sh); run it with /usr/bin/python3, which sees
/usr/lib/python3/dist-packages. It generates Python stubs at run time from
proto/flexcap/v1/*.proto into a temp dir (see generate_stubs for which compiler does
what), plus two small hand-written copies of the standard grpc.health.v1 and
grpc.reflection.v1 protos (Debian packages neither the grpcio-health-checking nor the
grpcio-reflection module), then checks:

  ListCapsules -> CreateCapsule(NAME, IMAGE, 128 MiB) -> GetCapsule -> ListCapsules,
  bad requests -> INVALID_ARGUMENT naming the field in the status details,
  grpc.health.v1 Check -> SERVING,
  server reflection -> lists flexcap.v1.CapsuleService and serves its file descriptor.

Prints one JSON line with the results; exits non-zero on any failure.
"""

import importlib
import json
import os
import re
import shutil
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "proto")
TIMEOUT_S = 30

HEALTH_PROTO = """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
"""

REFLECTION_PROTO = """
syntax = "proto3";
package grpc.reflection.v1;
service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest) returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    ExtensionRequest file_containing_extension = 5;
    string all_extension_numbers_of_type = 6;
    string list_services = 7;
  }
}
message ExtensionRequest { string containing_type = 1; int32 extension_number = 2; }
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ExtensionNumberResponse all_extension_numbers_response = 5;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ExtensionNumberResponse { string base_type_name = 1; repeated int32 extension_number = 2; }
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse { int32 error_code = 1; string error_message = 2; }
"""


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def well_known_include(compiler_dir=None):
    """Directory holding google/protobuf/timestamp.proto for the chosen compiler."""
    # grpc_tools bundles the well-known types too: the fallback when libprotobuf-dev is absent.
    bundled = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    candidates = ([compiler_dir] if compiler_dir else []) + ["/usr/include", bundled]
    for d in candidates:
        if os.path.isfile(os.path.join(d, "google", "protobuf", "timestamp.proto")):
            return d
    raise CheckFailed("google/protobuf/timestamp.proto not found in " + ", ".join(candidates))


def grpc_tools_protoc(args):
    return protoc.main(["grpc_tools.protoc", *args])


def system_protoc(args):
    import subprocess

    exe = shutil.which("protoc") or "/usr/bin/protoc"
    r = subprocess.run([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout)
    return r.returncode


def copy_tree_without_optional(src, dst):
    """Copies the .proto files under `src` to `dst` with proto3 `optional` labels removed."""
    for dirpath, _, files in os.walk(src):
        for n in files:
            if not n.endswith(".proto"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, n), src)
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            with open(os.path.join(dirpath, n)) as f:
                text = re.sub(r"(?m)^(\s*)optional\s+", r"\1", f.read())
            with open(os.path.join(dst, rel), "w") as f:
                f.write(text)


def generate_stubs(out):
    """Compiles the agent's protos plus health/reflection into `out`; returns (modules, how).

    grpc_tools.protoc does both the messages (--python_out) and the service stubs
    (--grpc_python_out) when its bundled protoc is new enough for proto3 `optional`
    (>= 3.15). Debian 12's python3-grpc-tools bundles protoc 3.5.1, which is not: then the
    messages come from the system protoc (protobuf-compiler, 3.21, the same release as the
    python3-protobuf runtime), and grpc_tools generates only the service stubs, from a copy
    of the protos without `optional` labels (stubs reference message classes by name only,
    so the labels make no difference to them).
    """
    # Top-level file names keep the generated modules out of grpcio's own "grpc" package;
    # the proto packages (hence the service names on the wire) stay grpc.health.v1 etc.
    extra = os.path.join(out, "_extra")
    os.makedirs(extra)
    with open(os.path.join(extra, "fc_health.proto"), "w") as f:
        f.write(HEALTH_PROTO)
    with open(os.path.join(extra, "fc_reflection.proto"), "w") as f:
        f.write(REFLECTION_PROTO)
    v1 = os.path.join(PROTO_DIR, "flexcap", "v1")
    files = sorted(os.path.join("flexcap", "v1", n) for n in os.listdir(v1) if n.endswith(".proto"))
    files += ["fc_health.proto", "fc_reflection.proto"]

    import grpc_tools

    tools_wkt = well_known_include(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))
    log = os.path.join(out, "_protoc.log")
    # Quietly probe whether grpc_tools' protoc can do it all (fd 2 is the C++ compiler's stderr).
    saved = os.dup(2)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            rc = grpc_tools_protoc(
                ["-I" + PROTO_DIR, "-I" + extra, "-I" + tools_wkt, "--python_out=" + out, "--grpc_python_out=" + out,
                 *files]
            )
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    if rc == 0:
        how = "grpc_tools.protoc"
    else:
        with open(log) as f:
            why = f.read()
        check("optional" in why, "grpc_tools.protoc failed: " + why.strip())
        rc = system_protoc(["-I" + PROTO_DIR, "-I" + extra, "-I" + well_known_include(), "--python_out=" + out, *files])
        check(rc == 0, "protoc --python_out failed with exit code %s" % rc)
        plain = os.path.join(out, "_no_optional")
        copy_tree_without_optional(PROTO_DIR, plain)
        rc = grpc_tools_protoc(["-I" + plain, "-I" + extra, "-I" + tools_wkt, "--grpc_python_out=" + out, *files])
        check(rc == 0, "grpc_tools.protoc --grpc_python_out failed with exit code %s" % rc)
        how = "protoc (messages) + grpc_tools.protoc (services)"
    sys.path.insert(0, out)
    names = {
        "capsule_pb2": "flexcap.v1.capsule_pb2",
        "capsule_grpc": "flexcap.v1.capsule_pb2_grpc",
        "health_pb2": "fc_health_pb2",
        "health_grpc": "fc_health_pb2_grpc",
        "refl_pb2": "fc_reflection_pb2",
        "refl_grpc": "fc_reflection_pb2_grpc",
    }
    return {key: importlib.import_module(mod) for key, mod in names.items()}, how


def expect_invalid_argument(call, request, field):
    """Calls `call(request)` and checks it fails with INVALID_ARGUMENT naming `field`."""
    try:
        call(request, timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
        check(code == grpc.StatusCode.INVALID_ARGUMENT, "expected INVALID_ARGUMENT for %s, got %s: %s" % (field, code, details))
        check(details.startswith(field + ":"), "details %r do not name field %r" % (details, field))
        return {"field": field, "code": code.name, "details": details}
    raise CheckFailed("bad request for %s was accepted" % field)


def run(target, name, image, mods):
    pb = mods["capsule_pb2"]
    hpb, rpb = mods["health_pb2"], mods["refl_pb2"]
    result = {}
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
        caps = mods["capsule_grpc"].CapsuleServiceStub(channel)

        before = caps.ListCapsules(pb.ListCapsulesRequest(), timeout=TIMEOUT_S).capsules
        check(all(c.name != name for c in before), "capsule %r exists before CreateCapsule" % name)

        created = caps.CreateCapsule(
            pb.CreateCapsuleRequest(name=name, spec=pb.CapsuleSpec(image=image, memory_mib=128)),
            timeout=TIMEOUT_S,
        ).capsule
        check(created.id.startswith("c-"), "unexpected capsule id %r" % created.id)
        check(created.name == name, "created name %r != %r" % (created.name, name))
        check(created.state == pb.CAPSULE_STATE_CREATED, "created state %s" % pb.CapsuleState.Name(created.state))
        check(created.spec.memory_mib == 128, "memory_mib %d" % created.spec.memory_mib)
        check(created.image_id.startswith("sha256:"), "image_id %r" % created.image_id)
        check(created.created_at.seconds > 0, "created_at not set")

        got = caps.GetCapsule(pb.GetCapsuleRequest(capsule=name), timeout=TIMEOUT_S).capsule
        check(got.id == created.id, "GetCapsule(name) id %r != %r" % (got.id, created.id))
        got_by_id = caps.GetCapsule(pb.GetCapsuleRequest(capsule=created.id), timeout=TIMEOUT_S).capsule
        check(got_by_id.name == name, "GetCapsule(id) name %r" % got_by_id.name)

        after = caps.ListCapsules(pb.ListCapsulesRequest(), timeout=TIMEOUT_S).capsules
        check(len(after) == len(before) + 1, "list grew from %d to %d" % (len(before), len(after)))
        check(any(c.id == created.id for c in after), "new capsule not listed")

        # NOT_FOUND is a distinct code, not a generic failure.
        try:
            caps.GetCapsule(pb.GetCapsuleRequest(capsule="no-such-capsule"), timeout=TIMEOUT_S)
            raise CheckFailed("GetCapsule of a missing capsule succeeded")
        except grpc.RpcError as err:
            check(err.code() == grpc.StatusCode.NOT_FOUND, "missing capsule gave %s" % err.code())

        invalid = [
            expect_invalid_argument(
                caps.CreateCapsule,
                pb.CreateCapsuleRequest(name="Bad_Name", spec=pb.CapsuleSpec(image=image)),
                "name",
            ),
            expect_invalid_argument(
                caps.CreateCapsule,
                pb.CreateCapsuleRequest(
                    name=name + "-x",
                    spec=pb.CapsuleSpec(image=image, ports=[pb.PortMapping(guest_port=0)]),
                ),
                "spec.ports[0].guest_port",
            ),
            expect_invalid_argument(caps.GetCapsule, pb.GetCapsuleRequest(capsule=""), "capsule"),
        ]
        # A refused request changes nothing.
        final = caps.ListCapsules(pb.ListCapsulesRequest(), timeout=TIMEOUT_S).capsules
        check(len(final) == len(after), "a refused request changed the capsule list")

        health = mods["health_grpc"].HealthStub(channel)
        health_status = {}
        for svc in ["", "flexcap.v1.CapsuleService"]:
            st = health.Check(hpb.HealthCheckRequest(service=svc), timeout=TIMEOUT_S).status
            health_status[svc or "(server)"] = hpb.HealthCheckResponse.ServingStatus.Name(st)
            check(st == hpb.HealthCheckResponse.SERVING, "health of %r is %s" % (svc, health_status[svc or "(server)"]))

        refl = mods["refl_grpc"].ServerReflectionStub(channel)
        reqs = [
            rpb.ServerReflectionRequest(list_services=""),
            rpb.ServerReflectionRequest(file_containing_symbol="flexcap.v1.CapsuleService"),
        ]
        responses = list(refl.ServerReflectionInfo(iter(reqs), timeout=TIMEOUT_S))
        check(len(responses) == 2, "reflection answered %d of 2 requests" % len(responses))
        check(responses[0].HasField("list_services_response"), "no list_services_response")
        services = sorted(s.name for s in responses[0].list_services_response.service)
        check("flexcap.v1.CapsuleService" in services, "reflection lists %s" % services)
        check(responses[1].HasField("file_descriptor_response"), "no file_descriptor_response: %s" % responses[1])
        from google.protobuf import descriptor_pb2

        methods = []
        for raw in responses[1].file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for s in fd.service:
                if fd.package == "flexcap.v1" and s.name == "CapsuleService":
                    methods = [m.name for m in s.method]
        check("CreateCapsule" in methods, "reflected CapsuleService has methods %s" % methods)

        result = {
            "ok": True,
            "capsule": {
                "id": created.id,
                "name": created.name,
                "state": pb.CapsuleState.Name(created.state),
                "image_id": created.image_id,
                "memory_mib": created.spec.memory_mib,
            },
            "listed_before": len(before),
            "listed_after": len(after),
            "invalid_argument": invalid,
            "health": health_status,
            "reflection_services": services,
            "reflected_methods": len(methods),
        }
    return result


def main(argv):
    if len(argv) != 4:
        print(json.dumps({"ok": False, "error": "usage: flexcap_client.py unix:/path/api.sock NAME IMAGE"}))
        return 2
    target = argv[1] if argv[1].startswith("unix:") else "unix:" + argv[1]
    out = tempfile.mkdtemp(prefix="flexcap-pystubs-")
    try:
        mods, how = generate_stubs(out)
        result = run(target, argv[2], argv[3], mods)
        result["codegen"] = how
    except (CheckFailed, grpc.RpcError, grpc.FutureTimeoutError) as err:
        if isinstance(err, grpc.RpcError):
            msg = "rpc failed: %s: %s" % (err.code(), err.details())
        elif isinstance(err, grpc.FutureTimeoutError):
            msg = "could not connect to %s" % target
        else:
            msg = str(err)
        print(json.dumps({"ok": False, "error": msg}))
        return 1
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
