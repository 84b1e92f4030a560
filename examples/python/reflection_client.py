#!/usr/bin/env python3
"""A vipam-allocator client in Python through server reflection alone.

No generated code and no copy of the .proto files: the message types come
from the allocator's reflection service at run time.

    python examples/python/reflection_client.py --target 127.0.0.1:50051

It allocates an address for an owner, shows how a refusal looks, lists the
owners of its prefix, watches its allocations (a snapshot, then changes)
while it releases the address, and prints one line per step.
"""

import argparse
import sys
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "vipam.v1.Allocator"


class Allocator:
    """Callables for the methods of vipam.v1.Allocator, built from the
    descriptors the server publishes, and its message classes by name."""

    def __init__(self, channel):
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName(SERVICE)
        self.messages = {}
        for method in service.methods:
            request = message_factory.GetMessageClass(method.input_type)
            response = message_factory.GetMessageClass(method.output_type)
            self.messages[method.input_type.name] = request
            self.messages[method.output_type.name] = response
            make = channel.unary_stream if method.server_streaming else channel.unary_unary
            setattr(
                self,
                method.name,
                make(
                    f"/{SERVICE}/{method.name}",
                    request_serializer=request.SerializeToString,
                    response_deserializer=response.FromString,
                ),
            )
        self.event_type = pool.FindEnumTypeByName("vipam.v1.WatchEventType")

    def new(self, name, **fields):
        return self.messages[name](**fields)

    def type_name(self, event):
        """WATCH_EVENT_TYPE_... name of an event's type."""
        return self.event_type.values_by_number[event.type].name


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="allocator HOST:PORT")
    parser.add_argument("--token-file", help="file holding the bearer token, if the listener needs one")
    parser.add_argument("--prefix", default="example-py-reflection/", help="owner prefix of this tool")
    return parser.parse_args()


def main():
    args = parse_args()
    metadata = ()
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            metadata = (("authorization", "Bearer " + f.read().strip()),)
    owner = args.prefix + "vm-1"
    with grpc.insecure_channel(args.target) as channel:
        api = Allocator(channel)

        held = api.Allocate(
            api.new("AllocateRequest", owner=owner, labels={"example": "reflection"}),
            metadata=metadata,
            timeout=10,
        )
        print(f"allocated {held.owner} {held.address} revision={held.revision}")

        try:
            api.Allocate(
                api.new("AllocateRequest", owner=args.prefix + "vm-2", address=held.address),
                metadata=metadata,
                timeout=10,
            )
        except grpc.RpcError as e:
            # ALREADY_EXISTS: the address is someone else's; pick another.
            print(f"refused {e.code().name}: {e.details()}")

        page = api.List(api.new("ListRequest", owner_prefix=args.prefix), metadata=metadata, timeout=10)
        for a in page.allocations:
            print(f"listed {a.owner} {a.address}")

        # A Watch from revision 0: the snapshot, then changes. A long-running
        # tool reconnects after UNAVAILABLE or RESOURCE_EXHAUSTED with
        # since_revision = the last non-zero revision it saw.
        call = api.Watch(
            api.new("WatchRequest", owner_prefix=args.prefix, since_revision=0), metadata=metadata, timeout=30
        )
        released = None
        try:
            for event in call:
                kind = api.type_name(event)
                a = event.allocation
                if kind == "WATCH_EVENT_TYPE_SNAPSHOT":
                    print(f"snapshot {a.owner} {a.address}")
                elif kind == "WATCH_EVENT_TYPE_SNAPSHOT_COMPLETE":
                    print(f"snapshot complete revision={event.revision}")
                    released = api.Release(api.new("ReleaseRequest", owner=owner), metadata=metadata, timeout=10)
                elif kind in ("WATCH_EVENT_TYPE_ALLOCATED", "WATCH_EVENT_TYPE_RELEASED"):
                    print(f"watched {kind.removeprefix('WATCH_EVENT_TYPE_')} {a.owner} {a.address} revision={event.revision}")
                    if kind == "WATCH_EVENT_TYPE_RELEASED" and a.owner == owner:
                        break
        finally:
            call.cancel()
        print(f"released {released.allocation.address}")


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as e:
        print(f"error {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)
