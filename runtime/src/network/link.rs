//! Links inside a pod's network namespace, over rtnetlink: reading the CNI
//! interface's MAC and MTU, and joining the VM's tap to it with tc redirect
//! both ways, so that the guest owns the pod's address and MAC.

use std::io;
use std::path::Path;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

use super::netns;

/// ETH_P_ALL, a filter that takes every frame, in network byte order as the
/// kernel reads it from tcm_info (rtnetlink passes the value through as is).
const ALL_PROTOCOLS: u16 = 0x0003u16.to_be();
/// The classic ingress qdisc's handle, `ffff:`, which filters hang from.
const INGRESS_PARENT: u32 = 0xffff_0000;

/// What the guest's interface copies of the CNI interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub mtu: u32,
}

/// Runs `work` with an rtnetlink handle bound inside the namespace at `path`.
fn with_handle<T, F>(path: &Path, work: F) -> io::Result<T>
where
    T: Send + 'static,
    F: AsyncFnOnce(Handle) -> Result<T, rtnetlink::Error> + Send + 'static,
{
    netns::run_in(path, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        runtime.block_on(async move {
            // The socket is created here, on the thread inside the namespace.
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            work(handle).await.map_err(io::Error::other)
        })
    })
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<LinkMessage, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await? {
        Some(link) => Ok(link),
        None => Err(rtnetlink::Error::RequestFailed),
    }
}

fn facts(link: &LinkMessage) -> LinkFacts {
    let mut facts = LinkFacts {
        mac: String::new(),
        mtu: 1500,
    };
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::Address(bytes) => {
                facts.mac = bytes
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            }
            LinkAttribute::Mtu(mtu) => facts.mtu = *mtu,
            _ => {}
        }
    }
    facts
}

/// The MAC and MTU of `ifname` in the namespace at `path`.
pub fn link_facts(path: &Path, ifname: &str) -> io::Result<LinkFacts> {
    let name = ifname.to_owned();
    with_handle(path, async move |handle| {
        Ok(facts(&link_by_name(&handle, &name).await?))
    })
    .map_err(|e| io::Error::new(e.kind(), format!("reading link {ifname:?}: {e}")))
}

/// Creates the persistent tap `name` in the namespace at `path`, for
/// husk-vmm to attach to by name. Through iproute2's `ip tuntap`: taps are
/// made by ioctls on /dev/net/tun, which rtnetlink has no request for.
pub async fn create_tap(path: &Path, name: &str) -> io::Result<()> {
    let netns = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} names no namespace", path.display())))?;
    let output = tokio::process::Command::new("ip")
        .arg("-n")
        .arg(netns)
        .args(["tuntap", "add", "dev", name, "mode", "tap"])
        .output()
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("running ip tuntap: {e}")))?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "ip tuntap add dev {name}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Brings `tap` up with `ifname`'s MTU and redirects every frame arriving
/// on either link out of the other.
pub fn redirect_tap(path: &Path, ifname: &str, tap: &str) -> io::Result<()> {
    let (ifname, tap) = (ifname.to_owned(), tap.to_owned());
    let what = format!("joining {tap} to {ifname} with tc redirect");
    with_handle(path, async move |handle| {
        let pod_link = link_by_name(&handle, &ifname).await?;
        let tap_link = link_by_name(&handle, &tap).await?;
        let (pod_index, tap_index) = (pod_link.header.index, tap_link.header.index);
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(tap_index)
                    .mtu(facts(&pod_link).mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await?;
        for (from, to) in [(pod_index, tap_index), (tap_index, pod_index)] {
            let from_index = i32::try_from(from).map_err(|_| rtnetlink::Error::RequestFailed)?;
            handle.qdisc().add(from_index).ingress().execute().await?;
            handle
                .traffic_filter(from_index)
                .add()
                .parent(INGRESS_PARENT)
                .protocol(ALL_PROTOCOLS)
                .redirect(to)?
                .execute()
                .await?;
        }
        Ok(())
    })
    .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
}
