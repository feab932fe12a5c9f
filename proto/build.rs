fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        // husk_proto::client provides the connect functions (unix and hybrid vsock);
        // the generated `connect(uri)` would only invite TCP use.
        .build_transport(false)
        .compile_protos(&["agent.proto"], &["."])?;
    Ok(())
}
