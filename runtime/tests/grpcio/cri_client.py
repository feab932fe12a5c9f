"""A CRI client on grpcio, gRPC's C core, for runtime/tests/cri_grpcio.rs.

grpcio's default channel to unix:PATH sends PATH, percent-encoded, as the
HTTP/2 :authority of every request; huskd must serve it all the same.
Compiles the CRI proto it is given, then on one channel (so that later
requests refer to the HPACK table of earlier ones) calls Version, PullImage,
RunPodSandbox, ListPodSandbox, StopPodSandbox, RemovePodSandbox and
ListPodSandbox again, and prints what it got as one JSON object. Any failed
call ends it with a traceback and a non-zero exit.
"""

import argparse
import importlib
import json
import sys
import tempfile

try:
    import grpc
    from grpc_tools import protoc
except ImportError as missing:
    sys.exit(
        f"{missing}: this needs grpcio and grpcio-tools, "
        "which `sudo bash scripts/install-deps.sh` installs"
    )

TIMEOUT_SECS = 60


def compile_cri(proto, out_dir):
    """Generates v1_pb2 and v1_pb2_grpc from the CRI proto into out_dir."""
    proto_dir, _, name = proto.rpartition("/")
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            name,
        ]
    )
    if status != 0:
        sys.exit(f"protoc failed on {proto}: {status}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("v1_pb2"), importlib.import_module("v1_pb2_grpc")


def pods(runtime, pb):
    listed = runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=TIMEOUT_SECS)
    return [
        {"id": pod.id, "state": pb.PodSandboxState.Name(pod.state)}
        for pod in listed.items
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True, help="huskd's CRI socket")
    parser.add_argument("--proto", required=True, help="the CRI v1.proto")
    parser.add_argument("--image", required=True, help="an image to pull")
    parser.add_argument("--pod", required=True, help="the pod's name")
    parser.add_argument("--log-dir", required=True, help="the pod's log directory")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as generated:
        pb, pb_grpc = compile_cri(args.proto, generated)
        with grpc.insecure_channel(f"unix://{args.socket}") as channel:
            runtime = pb_grpc.RuntimeServiceStub(channel)
            images = pb_grpc.ImageServiceStub(channel)
            result = {}

            version = runtime.Version(pb.VersionRequest(version="v1"), timeout=TIMEOUT_SECS)
            result["runtime_name"] = version.runtime_name
            result["runtime_api_version"] = version.runtime_api_version

            pulled = images.PullImage(
                pb.PullImageRequest(image=pb.ImageSpec(image=args.image)),
                timeout=TIMEOUT_SECS,
            )
            result["image_ref"] = pulled.image_ref

            config = pb.PodSandboxConfig(
                metadata=pb.PodSandboxMetadata(
                    name=args.pod, uid=f"uid-{args.pod}", namespace="default"
                ),
                hostname=args.pod,
                log_directory=args.log_dir,
                linux=pb.LinuxPodSandboxConfig(
                    security_context=pb.LinuxSandboxSecurityContext(
                        namespace_options=pb.NamespaceOption(
                            network=pb.NamespaceMode.Value("NODE")
                        )
                    )
                ),
            )
            pod_id = runtime.RunPodSandbox(
                pb.RunPodSandboxRequest(config=config, runtime_handler="host"),
                timeout=TIMEOUT_SECS,
            ).pod_sandbox_id
            result["pod_id"] = pod_id
            result["listed"] = pods(runtime, pb)

            runtime.StopPodSandbox(
                pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT_SECS
            )
            runtime.RemovePodSandbox(
                pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=TIMEOUT_SECS
            )
            result["listed_after_remove"] = pods(runtime, pb)

    print(json.dumps(result))


if __name__ == "__main__":
    main()
