//! `Accept-Encoding` (RFC 9110 §12.5.3): which content codings a client takes, and how much
//! it prefers each (q-values), so the `http` service can pick a precompressed variant of a
//! file (`x.br`, `x.gz`) or the file itself.
//!
//! Parsing is lenient the way servers are: a malformed element (bad token, bad q-value) is
//! skipped, the others still count; at most [`MAX_CODINGS`] elements are read. The rules of
//! §12.5.3: a coding listed with `q=0` is refused; `*` stands for every coding not listed;
//! `identity` is acceptable unless refused by `identity;q=0`, or by `*;q=0` without an
//! `identity` entry. An empty field value means "identity only". Whether the header is absent
//! (any coding acceptable, by the RFC) is the caller's business: plexus then serves identity.
//!
//! ```
//! use plexus_proto::http::AcceptEncoding;
//!
//! let accept = AcceptEncoding::parse([&b"gzip;q=0.8, br"[..]]);
//! assert_eq!(accept.choose(&["gzip", "br"]), Some("br"));
//! let accept = AcceptEncoding::parse([&b"br;q=0, gzip;q=0.5"[..]]);
//! assert_eq!(accept.choose(&["br", "gzip"]), Some("gzip"));
//! // identity preferred over the only coding offered: no encoding.
//! let accept = AcceptEncoding::parse([&b"gzip;q=0.1, identity"[..]]);
//! assert_eq!(accept.choose(&["gzip"]), None);
//! ```

/// Elements of the field (across every `Accept-Encoding` line) read; the rest are ignored.
pub const MAX_CODINGS: usize = 32;

/// The largest q-value, in thousandths (`q=1`).
pub const Q_MAX: u16 = 1000;

/// A parsed `Accept-Encoding` field: codings (lowercase) with their q-values in thousandths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcceptEncoding {
    codings: Vec<(String, u16)>,
}

impl AcceptEncoding {
    /// Parses every value of the request's `Accept-Encoding` lines (a list split over several
    /// lines is one list).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> AcceptEncoding {
        let mut codings: Vec<(String, u16)> = Vec::new();
        let elements = values
            .into_iter()
            .flat_map(|value| value.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|element| !element.is_empty())
            .take(MAX_CODINGS);
        for element in elements {
            let Some((coding, q)) = parse_element(element) else {
                continue;
            };
            // The first mention of a coding counts (a repeat is a client bug, not an override).
            if !codings.iter().any(|(known, _)| *known == coding) {
                codings.push((coding, q));
            }
        }
        AcceptEncoding { codings }
    }

    /// How acceptable `coding` is (lowercase, e.g. `"gzip"`, `"identity"`), 0 (refused) to
    /// [`Q_MAX`].
    pub fn quality(&self, coding: &str) -> u16 {
        let listed = |name: &str| {
            self.codings
                .iter()
                .find(|(known, _)| known == name)
                .map(|(_, q)| *q)
        };
        match (listed(coding), listed("*")) {
            (Some(q), _) | (None, Some(q)) => q,
            (None, None) if coding == "identity" => Q_MAX,
            (None, None) => 0,
        }
    }

    /// The coding among `offered` (in the server's order of preference) to send, or `None`
    /// for identity: the first of [`ranked`](Self::ranked).
    pub fn choose<'c>(&self, offered: &[&'c str]) -> Option<&'c str> {
        self.ranked(offered).first().copied()
    }

    /// The codings among `offered` (in the server's order of preference) the client takes,
    /// most acceptable first (the server's order on a tie): those with q > 0 that an explicit
    /// `identity` entry does not outrank (an unlisted identity is merely acceptable:
    /// `gzip;q=0.8` still means gzip). Empty = send identity.
    pub fn ranked<'c>(&self, offered: &[&'c str]) -> Vec<&'c str> {
        let identity = self
            .codings
            .iter()
            .find(|(known, _)| known == "identity")
            .map_or(0, |(_, q)| *q);
        let mut ranked: Vec<(&'c str, u16)> = offered
            .iter()
            .map(|&coding| (coding, self.quality(coding)))
            .filter(|&(_, q)| q > 0 && q >= identity)
            .collect();
        // Stable: equal weights keep the server's order.
        ranked.sort_by_key(|&(_, q)| std::cmp::Reverse(q));
        ranked.into_iter().map(|(coding, _)| coding).collect()
    }
}

/// One list element: `token *( OWS ";" OWS param )`, the `q` parameter giving the weight.
fn parse_element(element: &[u8]) -> Option<(String, u16)> {
    let mut parts = element.split(|&b| b == b';');
    let token = parts.next()?.trim_ascii();
    if token.is_empty() || !token.iter().all(|&b| is_tchar(b)) {
        return None;
    }
    let mut q = Q_MAX;
    for param in parts {
        let param = param.trim_ascii();
        let (name, value) = param.split_once_byte(b'=')?;
        if name.trim_ascii().eq_ignore_ascii_case(b"q") {
            q = qvalue(value.trim_ascii())?;
        }
    }
    let coding = String::from_utf8_lossy(token).to_ascii_lowercase();
    // RFC 9110 §8.4.1: the x- names are aliases.
    let coding = match coding.as_str() {
        "x-gzip" => "gzip".to_owned(),
        "x-compress" => "compress".to_owned(),
        _ => coding,
    };
    Some((coding, q))
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`, in thousandths.
fn qvalue(text: &[u8]) -> Option<u16> {
    let (whole, rest) = match text.split_first()? {
        (b'0', rest) => (0u16, rest),
        (b'1', rest) => (Q_MAX, rest),
        _ => return None,
    };
    let fraction = match rest {
        [] => &[][..],
        [b'.', digits @ ..] => digits,
        _ => return None,
    };
    if fraction.len() > 3 {
        return None;
    }
    let mut thousandths = 0u16;
    for (&digit, scale) in fraction.iter().zip([100u16, 10, 1]) {
        let value = u16::from(digit.checked_sub(b'0').filter(|d| *d <= 9)?);
        thousandths = thousandths.checked_add(value.checked_mul(scale)?)?;
    }
    match whole {
        0 => Some(thousandths),
        _ if thousandths == 0 => Some(Q_MAX),
        _ => None,
    }
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `split_once` on a byte, for `&[u8]`.
trait SplitOnceByte {
    fn split_once_byte(&self, byte: u8) -> Option<(&[u8], &[u8])>;
}

impl SplitOnceByte for [u8] {
    fn split_once_byte(&self, byte: u8) -> Option<(&[u8], &[u8])> {
        let mut parts = self.splitn(2, |&b| b == byte);
        Some((parts.next()?, parts.next()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> AcceptEncoding {
        AcceptEncoding::parse([value.as_bytes()])
    }

    #[test]
    fn q_values_order_the_choice_and_ties_keep_the_server_order() {
        assert_eq!(parse("gzip, br").choose(&["br", "gzip"]), Some("br"));
        assert_eq!(parse("gzip, br").choose(&["gzip", "br"]), Some("gzip"));
        assert_eq!(
            parse("gzip;q=1.0, br;q=0.9").choose(&["br", "gzip"]),
            Some("gzip")
        );
        assert_eq!(
            parse("br;q=0.001, gzip;q=0").choose(&["gzip", "br"]),
            Some("br")
        );
        assert_eq!(parse("GZIP ; Q=0.5").quality("gzip"), 500);
        assert_eq!(parse("gzip;q=0.8").choose(&["gzip"]), Some("gzip"));
        assert_eq!(parse("x-gzip").choose(&["gzip"]), Some("gzip"));
        assert_eq!(
            parse("gzip;q=0.5, zstd;q=0, br;q=0.9").ranked(&["zstd", "gzip", "br"]),
            ["br", "gzip"]
        );
    }

    #[test]
    fn q_zero_refuses_and_unlisted_codings_are_not_taken() {
        assert_eq!(parse("br;q=0").choose(&["br"]), None);
        assert_eq!(parse("deflate").choose(&["br", "gzip"]), None);
        assert_eq!(parse("").choose(&["br", "gzip"]), None);
        assert_eq!(parse("br;q=0, *").choose(&["br", "gzip"]), Some("gzip"));
    }

    #[test]
    fn identity_is_acceptable_unless_refused_and_may_be_preferred() {
        assert_eq!(parse("gzip").quality("identity"), Q_MAX);
        assert_eq!(parse("identity;q=0").quality("identity"), 0);
        assert_eq!(parse("*;q=0").quality("identity"), 0);
        assert_eq!(parse("*;q=0, identity;q=0.2").quality("identity"), 200);
        assert_eq!(parse("gzip;q=0.5, identity").choose(&["gzip"]), None);
        assert_eq!(
            parse("gzip, identity;q=0.5").choose(&["gzip"]),
            Some("gzip")
        );
        assert_eq!(parse("*").choose(&["br", "gzip"]), Some("br"));
        // Equal weights: the encoded variant (smaller) wins.
        assert_eq!(parse("*;q=0.5").choose(&["gzip"]), Some("gzip"));
    }

    #[test]
    fn malformed_elements_are_skipped_and_the_rest_count() {
        let accept = parse("gzip;q=2, br;q=0.9x, zstd;q=0.5, de flate, ,, ;q=1, gzip;q=");
        assert_eq!(accept.quality("gzip"), 0);
        assert_eq!(accept.quality("br"), 0);
        assert_eq!(accept.quality("zstd"), 500);
        assert_eq!(parse("br;q=1.000").quality("br"), Q_MAX);
        assert_eq!(parse("br;q=1.001").quality("br"), 0);
        assert_eq!(parse("br;q=0.1234").quality("br"), 0);
        assert_eq!(parse("br;level=5;q=0.25").quality("br"), 250);
        assert_eq!(parse("br;novalue").quality("br"), 0);
        // The first mention wins; later lines join the same list.
        let lines = AcceptEncoding::parse([&b"gzip;q=0.3"[..], b"gzip, br"]);
        assert_eq!(lines.quality("gzip"), 300);
        assert_eq!(lines.choose(&["gzip", "br"]), Some("br"));
    }

    #[test]
    fn only_the_first_elements_are_read() {
        let mut value = "a, ".repeat(MAX_CODINGS);
        value.push_str("gzip");
        assert_eq!(parse(&value).choose(&["gzip"]), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_qualities_stay_in_range(
            value in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
        ) {
            let accept = AcceptEncoding::parse([value.as_slice()]);
            for coding in ["br", "gzip", "identity", "*"] {
                proptest::prop_assert!(accept.quality(coding) <= Q_MAX);
            }
            if let Some(chosen) = accept.choose(&["br", "gzip"]) {
                proptest::prop_assert!(accept.quality(chosen) > 0);
            }
        }
    }
}
