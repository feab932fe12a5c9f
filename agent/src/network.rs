//! The pod's network inside a microVM: the guest's virtio-net interfaces get
//! the addresses, MTU and routes CNI gave the pod on the host, so that the
//! guest answers for the pod's IP. Configured over rtnetlink with a plain
//! socket and messages encoded by hand (see netlink.rs for why).
//!
//! Everything is checked before anything is changed; a request applied twice
//! changes nothing the second time (addresses and routes are replaced, not
//! added again).

mod netlink;

use std::io;
use std::net::IpAddr;

use husk_proto::v1;
use tracing::info;

use self::netlink::{Link, Netlink, RouteSpec};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{what}: {source}")]
    Netlink { what: String, source: io::Error },
}

fn netlink_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// An address with its prefix length, as in "10.88.0.5/16".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("{text:?} is not an address in CIDR notation (e.g. 10.88.0.5/16)");
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)");
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        match parts.next() {
            Some(part) if part.len() == 2 => {
                *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?
            }
            _ => return Err(bad()),
        }
    }
    match parts.next() {
        Some(_) => Err(bad()),
        None => Ok(mac),
    }
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How to find an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Name(String, Option<[u8; 6]>),
    Mac([u8; 6]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct InterfacePlan {
    selector: Selector,
    mtu: Option<u32>,
    addresses: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RoutePlan {
    /// `None` is the default route of the gateway's family.
    destination: Option<Cidr>,
    gateway: Option<IpAddr>,
    device: Option<String>,
}

impl RoutePlan {
    fn family_is_v4(&self) -> bool {
        match (self.destination, self.gateway) {
            (Some(d), _) => d.addr.is_ipv4(),
            (None, Some(g)) => g.is_ipv4(),
            (None, None) => true,
        }
    }

    fn describe(&self) -> String {
        let mut text = match self.destination {
            Some(d) => d.to_string(),
            None => "default".into(),
        };
        if let Some(g) = self.gateway {
            text += &format!(" via {g}");
        }
        if let Some(d) = &self.device {
            text += &format!(" dev {d}");
        }
        text
    }
}

/// A checked request: what `apply` will do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    interfaces: Vec<InterfacePlan>,
    routes: Vec<RoutePlan>,
}

impl Plan {
    /// Checks the request's interfaces and routes; nothing is changed.
    pub fn new(
        interfaces: &[v1::NetworkInterface],
        routes: &[v1::Route],
    ) -> Result<Plan, NetworkError> {
        let invalid = NetworkError::InvalidArgument;
        let mut plan = Plan::default();
        for iface in interfaces {
            let mac = if iface.mac.is_empty() {
                None
            } else {
                Some(parse_mac(&iface.mac).map_err(invalid)?)
            };
            let selector = match (iface.name.as_str(), mac) {
                ("", Some(mac)) => Selector::Mac(mac),
                ("", None) => {
                    return Err(invalid(
                        "a network interface needs a name or a MAC address".into(),
                    ))
                }
                (name, mac) => Selector::Name(name.into(), mac),
            };
            let addresses = iface
                .addresses
                .iter()
                .map(|a| Cidr::parse(a))
                .collect::<Result<_, _>>()
                .map_err(invalid)?;
            let mtu = match iface.mtu {
                0 => None,
                mtu if mtu < 68 => {
                    return Err(invalid(format!("MTU {mtu} is below the minimum of 68")))
                }
                mtu => Some(mtu),
            };
            plan.interfaces.push(InterfacePlan {
                selector,
                mtu,
                addresses,
            });
        }
        for route in routes {
            let destination = match route.destination.as_str() {
                "" => None,
                d => Some(Cidr::parse(d).map_err(invalid)?),
            };
            let gateway =
                match route.gateway.as_str() {
                    "" => None,
                    g => Some(g.parse::<IpAddr>().map_err(|_| {
                        invalid(format!("route gateway {g:?} is not an IP address"))
                    })?),
                };
            let device = (!route.device.is_empty()).then(|| route.device.clone());
            let plan_route = RoutePlan {
                destination,
                gateway,
                device,
            };
            if gateway.is_none() && plan_route.device.is_none() {
                return Err(invalid(format!(
                    "route {} needs a gateway or a device",
                    plan_route.describe()
                )));
            }
            if let (Some(d), Some(g)) = (destination, gateway) {
                if d.addr.is_ipv4() != g.is_ipv4() {
                    return Err(invalid(format!(
                        "route {}: destination and gateway are of different IP versions",
                        plan_route.describe()
                    )));
                }
            }
            plan.routes.push(plan_route);
        }
        Ok(plan)
    }

    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty() && self.routes.is_empty()
    }

    /// Brings `lo` up, configures each interface (addresses, then MTU and
    /// up), then adds the routes (which need their interfaces up).
    pub fn apply(&self) -> Result<(), NetworkError> {
        let mut nl = Netlink::open().map_err(netlink_error("opening a netlink socket"))?;
        let links = nl
            .links()
            .map_err(netlink_error("listing the guest's interfaces"))?;
        let lo = find_link(&links, &Selector::Name("lo".into(), None))?;
        nl.set_link(lo.index, None)
            .map_err(netlink_error("bringing lo up"))?;
        for iface in &self.interfaces {
            let link = find_link(&links, &iface.selector)?;
            let name = &link.name;
            for &cidr in &iface.addresses {
                nl.add_address(link.index, cidr.addr, cidr.prefix, cidr.addr.is_ipv6())
                    .map_err(netlink_error(format!("adding {cidr} to {name}")))?;
            }
            let what = match iface.mtu {
                Some(mtu) => format!("setting the MTU of {name} to {mtu} and bringing it up"),
                None => format!("bringing {name} up"),
            };
            nl.set_link(link.index, iface.mtu)
                .map_err(netlink_error(what))?;
            info!(
                interface = %name,
                mac = %format_mac(&link.mac),
                addresses = ?iface.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                mtu = ?iface.mtu,
                "interface configured"
            );
        }
        for route in &self.routes {
            let oif = match &route.device {
                Some(device) => {
                    Some(find_link(&links, &Selector::Name(device.clone(), None))?.index)
                }
                None => None,
            };
            let spec = RouteSpec {
                v4: route.family_is_v4(),
                destination: route.destination.map(|d| (d.addr, d.prefix)),
                gateway: route.gateway,
                oif,
            };
            nl.add_route(&spec)
                .map_err(netlink_error(format!("adding route {}", route.describe())))?;
            info!(route = %route.describe(), "route added");
        }
        Ok(())
    }
}

fn find_link<'a>(links: &'a [Link], selector: &Selector) -> Result<&'a Link, NetworkError> {
    let found = match selector {
        Selector::Name(name, _) => links.iter().find(|l| &l.name == name),
        Selector::Mac(mac) => links.iter().find(|l| l.mac == mac),
    };
    let known = || {
        links
            .iter()
            .map(|l| format!("{} ({})", l.name, format_mac(&l.mac)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (found, selector) {
        (Some(link), Selector::Name(name, Some(mac))) if link.mac != mac => {
            Err(NetworkError::InvalidArgument(format!(
                "interface {name} has MAC {}, not {}",
                format_mac(&link.mac),
                format_mac(mac)
            )))
        }
        (Some(link), _) => Ok(link),
        (None, Selector::Name(name, _)) => Err(NetworkError::InvalidArgument(format!(
            "there is no interface named {name} (the guest has: {})",
            known()
        ))),
        (None, Selector::Mac(mac)) => Err(NetworkError::InvalidArgument(format!(
            "there is no interface with MAC {} (the guest has: {})",
            format_mac(mac),
            known()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, mac: &str, addresses: &[&str], mtu: u32) -> v1::NetworkInterface {
        v1::NetworkInterface {
            name: name.into(),
            mac: mac.into(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            mtu,
        }
    }

    fn route(destination: &str, gateway: &str, device: &str) -> v1::Route {
        v1::Route {
            destination: destination.into(),
            gateway: gateway.into(),
            device: device.into(),
        }
    }

    #[test]
    fn a_request_is_checked_whole_before_anything_changes() {
        let plan = Plan::new(
            &[iface(
                "",
                "02:AB:00:00:00:01",
                &["10.88.0.5/16", "fd00::5/64"],
                1500,
            )],
            &[
                route("", "10.88.0.1", ""),
                route("", "fd00::1", "eth0"),
                route("10.96.0.0/12", "", "eth0"),
            ],
        )
        .unwrap();
        assert_eq!(
            plan.interfaces[0].selector,
            Selector::Mac([0x02, 0xab, 0, 0, 0, 1])
        );
        assert_eq!(plan.interfaces[0].mtu, Some(1500));
        assert_eq!(plan.interfaces[0].addresses[1].to_string(), "fd00::5/64");
        assert_eq!(plan.routes[0].describe(), "default via 10.88.0.1");
        assert!(plan.routes[0].family_is_v4());
        assert!(!plan.routes[1].family_is_v4());
        assert_eq!(plan.routes[2].describe(), "10.96.0.0/12 dev eth0");
        assert!(Plan::new(&[], &[]).unwrap().is_empty());
    }

    #[test]
    fn bad_requests_are_invalid_arguments() {
        let bad_ifaces = [
            iface("", "", &[], 0),
            iface("", "02:00:00:00:00", &[], 0),
            iface("", "02:00:00:00:00:0g", &[], 0),
            iface("eth0", "", &["10.0.0.1"], 0),
            iface("eth0", "", &["10.0.0.1/33"], 0),
            iface("eth0", "", &["fd00::1/129"], 0),
            iface("eth0", "", &["10.0.0.300/24"], 0),
            iface("eth0", "", &[], 67),
        ];
        for bad in bad_ifaces {
            assert!(
                matches!(
                    Plan::new(std::slice::from_ref(&bad), &[]),
                    Err(NetworkError::InvalidArgument(_))
                ),
                "accepted {bad:?}"
            );
        }
        let bad_routes = [
            route("", "", ""),
            route("10.0.0.0/8", "", ""),
            route("10.0.0.0/8", "fd00::1", ""),
            route("", "gateway", "eth0"),
            route("10.0.0.0", "10.0.0.1", ""),
        ];
        for bad in bad_routes {
            assert!(
                matches!(
                    Plan::new(&[], std::slice::from_ref(&bad)),
                    Err(NetworkError::InvalidArgument(_))
                ),
                "accepted {bad:?}"
            );
        }
    }

    #[test]
    fn interfaces_are_found_by_mac_or_name() {
        let links = [
            Link {
                index: 1,
                name: "lo".into(),
                mac: vec![0; 6],
                mtu: 65536,
            },
            Link {
                index: 2,
                name: "eth0".into(),
                mac: vec![2, 0, 0, 0, 0, 1],
                mtu: 1500,
            },
        ];
        let by_mac = find_link(&links, &Selector::Mac([2, 0, 0, 0, 0, 1])).unwrap();
        assert_eq!(by_mac.index, 2);
        let by_name = find_link(
            &links,
            &Selector::Name("eth0".into(), Some([2, 0, 0, 0, 0, 1])),
        );
        assert_eq!(by_name.unwrap().index, 2);
        match find_link(&links, &Selector::Mac([2, 0, 0, 0, 0, 9])) {
            Err(NetworkError::InvalidArgument(m)) => {
                assert!(m.contains("02:00:00:00:00:09"), "{m}");
                assert!(m.contains("eth0 (02:00:00:00:00:01)"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            find_link(
                &links,
                &Selector::Name("eth0".into(), Some([2, 0, 0, 0, 0, 9]))
            ),
            Err(NetworkError::InvalidArgument(_))
        ));
        assert!(matches!(
            find_link(&links, &Selector::Name("eth1".into(), None)),
            Err(NetworkError::InvalidArgument(_))
        ));
    }

    /// The real thing, in a network namespace of this test's own thread: a
    /// dummy interface stands in for the guest's NIC (root only, as all of
    /// the agent's namespace tests).
    #[test]
    fn configures_addresses_mtu_and_routes_in_a_fresh_namespace() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare a network namespace (run the tests as root)");
            let mut nl = Netlink::open().unwrap();
            let links = nl.links().unwrap();
            assert!(links.iter().any(|l| l.name == "lo"), "{links:?}");
            assert!(matches!(
                Plan::new(&[iface("", "02:00:00:00:00:07", &["10.1.0.2/24"], 0)], &[])
                    .unwrap()
                    .apply(),
                Err(NetworkError::InvalidArgument(m)) if m.contains("02:00:00:00:00:07")
            ));
            // Only lo exists: configure it by name, with a route through it.
            let plan = Plan::new(
                &[iface("lo", "", &["10.1.0.2/24", "fd00:1::2/64"], 9000)],
                &[
                    route("10.2.0.0/16", "", "lo"),
                    route("", "10.1.0.1", ""),
                    route("fd00:2::/64", "", "lo"),
                ],
            )
            .unwrap();
            plan.apply().unwrap();
            // Twice is the same as once.
            plan.apply().unwrap();
            let links = nl.links().unwrap();
            let lo = links.iter().find(|l| l.name == "lo").unwrap();
            assert_eq!((lo.name.as_str(), lo.mtu), ("lo", 9000));
            let v6_routes = std::fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap();
            assert!(
                v6_routes.contains("fd000002000000000000000000000000 40"),
                "no fd00:2::/64 route: {v6_routes}"
            );
            let routes = std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
            assert!(
                routes.contains("lo\t00000000\t0100010A"),
                "no default route: {routes}"
            );
            assert!(
                routes.contains("lo\t0000020A"),
                "no 10.2/16 route: {routes}"
            );
            let v6 = std::fs::read_to_string("/proc/thread-self/net/if_inet6").unwrap();
            assert!(v6.contains("fd000001000000000000000000000002"), "{v6}");
        })
        .join()
        .unwrap();
    }
}
