//! huskd, the CRI server. Its RuntimeService and ImageService land with the CRI
//! issue; until then the binary only states that, so nobody mistakes it for a server.

fn main() -> std::process::ExitCode {
    eprintln!(
        "huskd {}: the CRI server is not implemented yet; use husk-vmm to boot a guest",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::FAILURE
}
