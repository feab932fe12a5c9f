//! The few rtnetlink requests the agent makes, encoded by hand on a plain
//! NETLINK_ROUTE socket: list links, set a link's MTU and IFF_UP, add an
//! address, add a route.
//!
//! Why not netlink-packet-route: its generic message types pull every link,
//! route and tc attribute's parser and encoder into the binary (+551 KiB of
//! static agent, measured), and every MiB of /init costs seconds of guest
//! boot on PVM hosts. These five messages are a few fixed headers and
//! attributes (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h,
//! linux/if_addr.h).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

// linux/netlink.h
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
/// Attribute types carry NLA_F_NESTED and NLA_F_NET_BYTEORDER in their top bits.
const NLA_TYPE_MASK: u16 = 0x3fff;

// linux/rtnetlink.h
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;

// linux/if_link.h, linux/if_addr.h, linux/if.h
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
/// struct ifinfomsg: family, pad, type, index, flags, change.
const IFINFOMSG_LEN: usize = 16;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const IFF_UP: u32 = 0x1;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Large enough for any datagram of a dump (the kernel fills at most 32 KiB).
const RECV_BUF: usize = 64 << 10;

/// One link of the namespace, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
}

/// A route to add; `destination` `None` is the default route.
pub struct RouteSpec {
    pub v4: bool,
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

fn ip_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn invalid_data(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink reply: {what}"),
    )
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// A request being built: header, fixed family header, attributes.
struct Request {
    buf: Vec<u8>,
}

impl Request {
    fn new(kind: u16, flags: u16, family_header: &[u8]) -> Request {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        buf.extend_from_slice(family_header);
        buf.resize(align4(buf.len()), 0);
        Request { buf }
    }

    fn attr(mut self, kind: u16, value: &[u8]) -> Request {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn finish(mut self, sequence: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&sequence.to_ne_bytes());
        self.buf
    }
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes in `bytes`: (type, value) until the bytes run out.
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(bytes, 0)?);
        let kind = u16_at(bytes, 2)? & NLA_TYPE_MASK;
        let value = bytes.get(4..len)?;
        bytes = bytes.get(align4(len)..).unwrap_or_default();
        Some((kind, value))
    })
}

/// A RTM_NEWLINK message's payload (ifinfomsg and attributes) as a `Link`.
fn parse_link(payload: &[u8]) -> Option<Link> {
    let index = u32_at(payload, 4)?;
    let mut link = Link {
        index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
    };
    for (kind, value) in attributes(payload.get(IFINFOMSG_LEN..)?) {
        match kind {
            IFLA_IFNAME => {
                let name = value.split(|&b| b == 0).next().unwrap_or_default();
                link.name = String::from_utf8_lossy(name).into_owned();
            }
            IFLA_ADDRESS => link.mac = value.to_vec(),
            IFLA_MTU => link.mtu = u32_at(value, 0).unwrap_or_default(),
            _ => {}
        }
    }
    Some(link)
}

/// A NETLINK_ROUTE socket, one request at a time.
pub struct Netlink {
    fd: OwnedFd,
    sequence: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Netlink {
            fd,
            sequence: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Sends one request; collects the (type, payload) of each answer up to
    /// the end of a dump or the kernel's acknowledgement.
    fn request(&mut self, request: Request) -> io::Result<Vec<(u16, Vec<u8>)>> {
        self.sequence = self.sequence.wrapping_add(1);
        let message = request.finish(self.sequence);
        send(self.fd.as_raw_fd(), &message, MsgFlags::empty())?;
        let mut answers = Vec::new();
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())?;
            let mut datagram = &self.buf[..n];
            while !datagram.is_empty() {
                let len = u32_at(datagram, 0).ok_or_else(|| invalid_data("short header"))? as usize;
                if len < NLMSG_HDRLEN || len > datagram.len() {
                    return Err(invalid_data("bad message length"));
                }
                let kind = u16_at(datagram, 4).unwrap_or_default();
                let sequence = u32_at(datagram, 8).unwrap_or_default();
                let payload = &datagram[NLMSG_HDRLEN..len];
                datagram = datagram.get(align4(len)..).unwrap_or_default();
                if sequence != self.sequence {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(answers),
                    NLMSG_ERROR => {
                        let code =
                            u32_at(payload, 0).ok_or_else(|| invalid_data("short error"))? as i32;
                        return match code {
                            0 => Ok(answers),
                            code => Err(io::Error::from_raw_os_error(-code)),
                        };
                    }
                    _ => answers.push((kind, payload.to_vec())),
                }
            }
        }
    }

    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let ifinfomsg = [AF_UNSPEC; IFINFOMSG_LEN];
        let answers = self.request(Request::new(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg))?;
        Ok(answers
            .iter()
            .filter(|(kind, _)| *kind == RTM_NEWLINK)
            .filter_map(|(_, payload)| parse_link(payload))
            .collect())
    }

    /// Sets the link up, and its MTU if given.
    pub fn set_link(&mut self, index: u32, mtu: Option<u32>) -> io::Result<()> {
        let mut ifinfomsg = [0u8; IFINFOMSG_LEN];
        ifinfomsg[4..8].copy_from_slice(&index.to_ne_bytes());
        ifinfomsg[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
        ifinfomsg[12..16].copy_from_slice(&IFF_UP.to_ne_bytes());
        let mut request = Request::new(RTM_SETLINK, NLM_F_ACK, &ifinfomsg);
        if let Some(mtu) = mtu {
            request = request.attr(IFLA_MTU, &mtu.to_ne_bytes());
        }
        self.request(request).map(drop)
    }

    /// Adds (or replaces) `addr/prefix` on the link; IPv6 without duplicate
    /// address detection when `no_dad`.
    pub fn add_address(
        &mut self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
        no_dad: bool,
    ) -> io::Result<()> {
        // struct ifaddrmsg: family, prefixlen, flags, scope, index.
        let header_flags = if no_dad { IFA_F_NODAD as u8 } else { 0 };
        let mut ifaddrmsg = [
            family(addr),
            prefix,
            header_flags,
            RT_SCOPE_UNIVERSE,
            0,
            0,
            0,
            0,
        ];
        ifaddrmsg[4..8].copy_from_slice(&index.to_ne_bytes());
        let bytes = ip_bytes(addr);
        let mut request = Request::new(
            RTM_NEWADDR,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &ifaddrmsg,
        )
        .attr(IFA_LOCAL, &bytes)
        .attr(IFA_ADDRESS, &bytes);
        if no_dad {
            request = request.attr(IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
        }
        self.request(request).map(drop)
    }

    /// Adds (or replaces) a route in the main table.
    pub fn add_route(&mut self, route: &RouteSpec) -> io::Result<()> {
        let scope = if route.gateway.is_some() {
            RT_SCOPE_UNIVERSE
        } else {
            RT_SCOPE_LINK
        };
        let dst_len = route.destination.map_or(0, |(_, prefix)| prefix);
        let af = if route.v4 { AF_INET } else { AF_INET6 };
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol,
        // scope, type, flags.
        let rtmsg = [
            af,
            dst_len,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            scope,
            RTN_UNICAST,
            0,
            0,
            0,
            0,
        ];
        let mut request = Request::new(
            RTM_NEWROUTE,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &rtmsg,
        );
        if let Some((addr, _)) = route.destination {
            request = request.attr(RTA_DST, &ip_bytes(addr));
        }
        if let Some(gateway) = route.gateway {
            request = request.attr(RTA_GATEWAY, &ip_bytes(gateway));
        }
        if let Some(oif) = route.oif {
            request = request.attr(RTA_OIF, &oif.to_ne_bytes());
        }
        self.request(request).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_aligned_and_sized() {
        let bytes = Request::new(RTM_SETLINK, NLM_F_ACK, &[0; IFINFOMSG_LEN])
            .attr(IFLA_IFNAME, b"eth0\0")
            .attr(IFLA_MTU, &1500u32.to_ne_bytes())
            .finish(7);
        // 16 header + 16 ifinfomsg + (4 + 5 → 12) + (4 + 4 → 8).
        assert_eq!(bytes.len(), 52);
        assert_eq!(u32_at(&bytes, 0), Some(52));
        assert_eq!(u16_at(&bytes, 4), Some(RTM_SETLINK));
        assert_eq!(u16_at(&bytes, 6), Some(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(u32_at(&bytes, 8), Some(7));
        let attrs: Vec<_> = attributes(&bytes[32..]).collect();
        assert_eq!(
            attrs,
            vec![
                (IFLA_IFNAME, &b"eth0\0"[..]),
                (IFLA_MTU, &1500u32.to_ne_bytes()[..])
            ]
        );
    }

    #[test]
    fn malformed_attributes_end_the_walk_without_panicking() {
        let mut payload = vec![0u8; IFINFOMSG_LEN];
        payload[4..8].copy_from_slice(&3u32.to_ne_bytes());
        // An IFLA_IFNAME claiming more bytes than there are.
        payload.extend_from_slice(&200u16.to_ne_bytes());
        payload.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        payload.extend_from_slice(b"eth0");
        let link = parse_link(&payload).unwrap();
        assert_eq!((link.index, link.name.as_str()), (3, ""));
        assert_eq!(parse_link(&[0; 3]), None);
        // A zero-length attribute cannot loop forever.
        assert_eq!(attributes(&[0, 0, 0, 0, 8, 0]).count(), 0);
    }
}
