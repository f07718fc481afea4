//! Address access control: owns CIDR parsing/matching and allow/deny lists.
//!
//! A [`Cidr`] is a network prefix (`10.0.0.0/8`, `::1/128`); an [`Acl`] is a
//! pair of allow and deny lists deciding whether a peer address may connect.
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are always treated as the
//! IPv4 address they carry, so a client matches the same rules whether it
//! arrives on an IPv4 or a dual-stack socket.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a CIDR could not be parsed or built. Every variant quotes the text
/// that was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AclError {
    /// The address part is not an IPv4 or IPv6 address.
    #[error("invalid IP address {address:?} in {input:?}")]
    InvalidAddress {
        /// The whole text that was parsed.
        input: String,
        /// The address part of it.
        address: String,
    },
    /// The part after `/` is not a decimal number.
    #[error("invalid prefix length {prefix:?} in {input:?}: expected a decimal number")]
    InvalidPrefix {
        /// The whole text that was parsed.
        input: String,
        /// The prefix part of it.
        prefix: String,
    },
    /// The prefix length exceeds the address width (32 or 128).
    #[error(
        "prefix length /{prefix} too long in {input:?}: at most /{max} for this address family"
    )]
    PrefixTooLong {
        /// The whole text that was parsed.
        input: String,
        /// The prefix length given.
        prefix: u32,
        /// The address width.
        max: u8,
    },
    /// Bits below the prefix are set, e.g. `10.0.0.1/8`.
    #[error("{input:?} has host bits set; did you mean {suggestion}?")]
    HostBitsSet {
        /// The whole text that was parsed.
        input: String,
        /// The network the text most likely meant.
        suggestion: Cidr,
    },
}

/// An IPv4 or IPv6 network: an address with all host bits clear and a
/// prefix length.
///
/// Parses from `"127.0.0.0/8"`, `"::1/128"`, or a bare address (`"10.1.2.3"`,
/// `"::1"`) meaning a single host. Displays canonically as `addr/len`.
/// IPv6 networks inside `::ffff:0:0/96` are stored as the IPv4 network they
/// denote (`::ffff:10.0.0.0/104` is `10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Builds a network from an address and prefix length, rejecting
    /// prefixes longer than the address width and addresses with host bits
    /// set.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, AclError> {
        let input = format!("{addr}/{prefix}");
        Self::checked(addr, u32::from(prefix), input)
    }

    /// The network address (host bits clear).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// True if `ip` lies in this network. IPv4-mapped IPv6 addresses are
    /// matched as IPv4; an IPv4 network never matches a (non-mapped) IPv6
    /// address and vice versa.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = v4_mask(self.prefix);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = v6_mask(self.prefix);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }

    fn checked(addr: IpAddr, prefix: u32, input: String) -> Result<Self, AclError> {
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > u32::from(max) {
            return Err(AclError::PrefixTooLong { input, prefix, max });
        }
        let prefix = prefix as u8; // <= 128, checked above
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) => match (v6.to_ipv4_mapped(), prefix.checked_sub(96)) {
                (Some(v4), Some(v4_prefix)) => (IpAddr::V4(v4), v4_prefix),
                _ => (addr, prefix),
            },
            IpAddr::V4(_) => (addr, prefix),
        };
        let network = match addr {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & v4_mask(prefix))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & v6_mask(prefix))),
        };
        let cidr = Cidr {
            addr: network,
            prefix,
        };
        if network != addr {
            return Err(AclError::HostBitsSet {
                input,
                suggestion: cidr,
            });
        }
        Ok(cidr)
    }
}

fn v4_mask(prefix: u8) -> u32 {
    32u32
        .checked_sub(u32::from(prefix))
        .and_then(|shift| u32::MAX.checked_shl(shift))
        .unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    128u32
        .checked_sub(u32::from(prefix))
        .and_then(|shift| u128::MAX.checked_shl(shift))
        .unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = AclError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match s.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = address.parse().map_err(|_| AclError::InvalidAddress {
            input: s.to_owned(),
            address: address.to_owned(),
        })?;
        let prefix = match prefix {
            None => {
                if addr.is_ipv4() {
                    32
                } else {
                    128
                }
            }
            Some(text) => {
                let valid = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
                // Digits that overflow u32 are certainly too long.
                match text.parse::<u32>() {
                    Ok(n) if valid => n,
                    Err(_) if valid => u32::MAX,
                    _ => {
                        return Err(AclError::InvalidPrefix {
                            input: s.to_owned(),
                            prefix: text.to_owned(),
                        })
                    }
                }
            }
        };
        Cidr::checked(addr, prefix, s.to_owned())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Allow and deny lists of networks.
///
/// Deny wins; if the allow list is non-empty an address must also match one
/// of its networks. An empty ACL permits everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

impl Acl {
    /// Builds an ACL from its allow and deny lists.
    pub fn new(allow: Vec<Cidr>, deny: Vec<Cidr>) -> Self {
        Acl { allow, deny }
    }

    /// True if `ip` may connect: it matches no deny network and, when the
    /// allow list is non-empty, matches at least one allow network.
    pub fn permits(&self, ip: IpAddr) -> bool {
        if self.deny.iter().any(|net| net.contains(ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(ip))
    }

    /// True when both lists are empty (everything is permitted).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// The allow list.
    pub fn allow(&self) -> &[Cidr] {
        &self.allow
    }

    /// The deny list.
    pub fn deny(&self) -> &[Cidr] {
        &self.deny
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cidr(s: &str) -> Cidr {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_displays_canonically() {
        for (input, shown) in [
            ("127.0.0.0/8", "127.0.0.0/8"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("10.1.2.3", "10.1.2.3/32"),
            ("::1", "::1/128"),
            ("::1/128", "::1/128"),
            ("2001:DB8::/32", "2001:db8::/32"),
            ("::/0", "::/0"),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("::ffff:1.2.3.4", "1.2.3.4/32"),
            ("192.168.0.0/016", "192.168.0.0/16"),
        ] {
            assert_eq!(cidr(input).to_string(), shown, "{input}");
        }
        assert_eq!(cidr("10.0.0.0/8").prefix_len(), 8);
        assert_eq!(cidr("10.0.0.0/8").addr(), ip("10.0.0.0"));
    }

    #[test]
    fn host_bits_set_suggests_the_network() {
        let err = "10.0.0.1/8".parse::<Cidr>().unwrap_err();
        assert_eq!(
            err,
            AclError::HostBitsSet {
                input: "10.0.0.1/8".into(),
                suggestion: cidr("10.0.0.0/8"),
            }
        );
        assert_eq!(
            err.to_string(),
            "\"10.0.0.1/8\" has host bits set; did you mean 10.0.0.0/8?"
        );
        let err = "2001:db8::1/32".parse::<Cidr>().unwrap_err();
        assert!(
            err.to_string().contains("did you mean 2001:db8::/32?"),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_text_and_quotes_it() {
        let cases = [
            ("10.0.0/8", "invalid IP address \"10.0.0\" in \"10.0.0/8\""),
            ("", "invalid IP address \"\""),
            ("localhost", "\"localhost\""),
            ("10.0.0.0/", "invalid prefix length \"\" in \"10.0.0.0/\""),
            ("10.0.0.0/+8", "invalid prefix length \"+8\""),
            ("10.0.0.0/8/8", "invalid prefix length \"8/8\""),
            ("10.0.0.0/ 8", "invalid prefix length \" 8\""),
            (
                "10.0.0.0/33",
                "prefix length /33 too long in \"10.0.0.0/33\": at most /32",
            ),
            (
                "::/129",
                "prefix length /129 too long in \"::/129\": at most /128",
            ),
        ];
        for (input, message) in cases {
            let err = input.parse::<Cidr>().unwrap_err().to_string();
            assert!(err.contains(message), "{input:?}: {err}");
        }
        assert_eq!(
            "1.2.3.4/99999999999".parse::<Cidr>(),
            Err(AclError::PrefixTooLong {
                input: "1.2.3.4/99999999999".into(),
                prefix: u32::MAX,
                max: 32,
            })
        );
    }

    #[test]
    fn new_checks_like_parse() {
        assert_eq!(Cidr::new(ip("10.0.0.0"), 8), Ok(cidr("10.0.0.0/8")));
        assert!(matches!(
            Cidr::new(ip("10.0.0.0"), 40),
            Err(AclError::PrefixTooLong {
                prefix: 40,
                max: 32,
                ..
            })
        ));
        assert!(matches!(
            Cidr::new(ip("10.0.0.1"), 8),
            Err(AclError::HostBitsSet { .. })
        ));
    }

    #[test]
    fn contains_respects_prefix_boundaries() {
        let net = cidr("192.168.4.0/22");
        assert!(net.contains(ip("192.168.4.0")));
        assert!(net.contains(ip("192.168.7.255")));
        assert!(!net.contains(ip("192.168.8.0")));
        assert!(!net.contains(ip("192.168.3.255")));
        assert!(cidr("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(cidr("1.2.3.4").contains(ip("1.2.3.4")));
        assert!(!cidr("1.2.3.4").contains(ip("1.2.3.5")));
        assert!(cidr("::1").contains(ip("::1")));
        assert!(!cidr("::1").contains(ip("::2")));
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::1")));
    }

    #[test]
    fn families_do_not_mix_except_mapped_ipv4() {
        assert!(cidr("127.0.0.0/8").contains(ip("::ffff:127.0.0.1")));
        assert!(!cidr("127.0.0.0/8").contains(ip("::1")));
        assert!(!cidr("::/0").contains(ip("10.0.0.1")));
        // Mapped addresses are IPv4 for matching purposes.
        assert!(!cidr("::/0").contains(ip("::ffff:10.0.0.1")));
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")));
    }

    #[test]
    fn acl_deny_wins_and_allow_restricts() {
        let acl = Acl::new(
            vec![cidr("10.0.0.0/8"), cidr("::1")],
            vec![cidr("10.66.0.0/16")],
        );
        assert!(acl.permits(ip("10.1.2.3")));
        assert!(acl.permits(ip("::1")));
        assert!(acl.permits(ip("::ffff:10.1.2.3")));
        assert!(!acl.permits(ip("10.66.1.1")));
        assert!(!acl.permits(ip("::ffff:10.66.1.1")));
        assert!(!acl.permits(ip("192.168.1.1")));
        assert!(!acl.is_empty());
        assert_eq!(acl.allow().len(), 2);
        assert_eq!(acl.deny(), &[cidr("10.66.0.0/16")]);
    }

    #[test]
    fn acl_empty_permits_all_and_deny_only_blocks_listed() {
        let empty = Acl::default();
        assert!(empty.is_empty());
        assert!(empty.permits(ip("1.2.3.4")));
        assert!(empty.permits(ip("::")));
        let deny_only = Acl::new(vec![], vec![cidr("1.2.3.0/24")]);
        assert!(!deny_only.is_empty());
        assert!(!deny_only.permits(ip("1.2.3.4")));
        assert!(deny_only.permits(ip("1.2.4.4")));
    }

    proptest! {
        #[test]
        fn display_round_trips_and_contains_matches_bit_model(
            raw in any::<u32>(), prefix in 0u8..=32, probe in any::<u32>(),
        ) {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
            let net = Cidr::new(IpAddr::V4(Ipv4Addr::from(raw & mask)), prefix).unwrap();
            prop_assert_eq!(net.to_string().parse::<Cidr>(), Ok(net));
            let expect = (probe ^ raw) & mask == 0;
            prop_assert_eq!(net.contains(IpAddr::V4(Ipv4Addr::from(probe))), expect);
            let mapped = IpAddr::V6(Ipv4Addr::from(probe).to_ipv6_mapped());
            prop_assert_eq!(net.contains(mapped), expect);
        }

        #[test]
        fn v6_display_round_trips(raw in any::<u128>(), prefix in 0u8..=128) {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            let net = Cidr::new(IpAddr::V6(Ipv6Addr::from(raw & mask)), prefix).unwrap();
            prop_assert_eq!(net.to_string().parse::<Cidr>(), Ok(net));
            prop_assert!(net.contains(IpAddr::V6(Ipv6Addr::from(raw & mask))) || net.addr().is_ipv4());
        }
    }
}
