#!/usr/bin/env python3
"""A vipam-allocator client in Python through stubs generated from proto/.

Generate the stubs once, into any directory (they are not checked in):

    python -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen \
        proto/vipam/v1/allocator.proto

then run, with that directory on PYTHONPATH:

    PYTHONPATH=gen python examples/python/stubs_client.py --target 127.0.0.1:50051

It allocates an address for an owner, shows how a refusal looks, lists the
owners of its prefix, watches its allocations (a snapshot, then changes)
while it releases the address, and prints one line per step.
"""

import argparse
import sys
import time

import grpc

from vipam.v1 import allocator_pb2 as pb
from vipam.v1 import allocator_pb2_grpc as pb_grpc

# Codes after which a watch resumes from the last revision it saw.
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="allocator HOST:PORT")
    parser.add_argument("--token-file", help="file holding the bearer token, if the listener needs one")
    parser.add_argument("--prefix", default="example-py/", help="owner prefix of this tool")
    return parser.parse_args()


def follow(stub, request, deadline, metadata=()):
    """Yields the events of a Watch, reconnecting after UNAVAILABLE,
    RESOURCE_EXHAUSTED (cut off for being slow) or the end of the stream
    with the revision of the last event, so nothing is missed or repeated.
    A snapshot cut short is taken again: its events are handed out only once
    it is complete. OUT_OF_RANGE (the revision left the kept history) is
    raised: list again and follow from since_revision=0."""
    since = request.since_revision
    while True:
        call = stub.Watch(
            pb.WatchRequest(pool=request.pool, owner_prefix=request.owner_prefix, since_revision=since),
            timeout=max(deadline - time.monotonic(), 0.1),
            metadata=metadata,
        )
        snapshot = []
        try:
            for event in call:
                if event.type == pb.WATCH_EVENT_TYPE_SNAPSHOT:
                    snapshot.append(event)
                    continue
                if event.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_COMPLETE:
                    yield from snapshot
                    snapshot = []
                if event.revision:
                    since = event.revision
                yield event
        except grpc.RpcError as e:
            if e.code() not in RESUMABLE:
                raise
        finally:
            call.cancel()
        time.sleep(0.1)


def main():
    args = parse_args()
    metadata = ()
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            metadata = (("authorization", "Bearer " + f.read().strip()),)
    owner = args.prefix + "vm-1"
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.AllocatorStub(channel)

        held = stub.Allocate(
            pb.AllocateRequest(owner=owner, labels={"example": "stubs"}), metadata=metadata, timeout=10
        )
        print(f"allocated {held.owner} {held.address} revision={held.revision}")

        try:
            stub.Allocate(
                pb.AllocateRequest(owner=args.prefix + "vm-2", address=held.address),
                metadata=metadata,
                timeout=10,
            )
        except grpc.RpcError as e:
            # ALREADY_EXISTS: the address is someone else's; pick another.
            print(f"refused {e.code().name}: {e.details()}")

        page = stub.List(pb.ListRequest(owner_prefix=args.prefix), metadata=metadata, timeout=10)
        for a in page.allocations:
            print(f"listed {a.owner} {a.address}")

        released = None
        for event in follow(stub, pb.WatchRequest(owner_prefix=args.prefix), deadline, metadata):
            kind = pb.WatchEventType.Name(event.type)
            a = event.allocation
            if event.type == pb.WATCH_EVENT_TYPE_SNAPSHOT:
                print(f"snapshot {a.owner} {a.address}")
            elif event.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_COMPLETE:
                print(f"snapshot complete revision={event.revision}")
                # In sync: now make the change this watch will see.
                released = stub.Release(pb.ReleaseRequest(owner=owner), metadata=metadata, timeout=10)
            elif event.type in (pb.WATCH_EVENT_TYPE_ALLOCATED, pb.WATCH_EVENT_TYPE_RELEASED):
                print(f"watched {kind.removeprefix('WATCH_EVENT_TYPE_')} {a.owner} {a.address} revision={event.revision}")
                if event.type == pb.WATCH_EVENT_TYPE_RELEASED and a.owner == owner:
                    break
        print(f"released {released.allocation.address}")


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as e:
        print(f"error {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)
