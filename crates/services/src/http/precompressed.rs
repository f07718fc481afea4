//! Precompressed static files (`[http] precompressed`): `x.br`, `x.gz` or `x.zst` next to `x`,
//! sent with `Content-Encoding` when the request's `Accept-Encoding` takes that coding (as
//! nginx's `gzip_static` / `brotli_static`).
//!
//! The file `x` itself decides the answer (404, 403, redirect, index): a variant is only
//! looked for once `x` resolved to a regular file. The variant is its own representation: its
//! length, its ETag (the identity one with the coding's extension inside the quotes, so a
//! cache or an `If-None-Match` never mixes the two) and its byte ranges. Every file response
//! carries `Vary: Accept-Encoding` while the feature is on, identity ones included (a cache
//! must not hand the identity body to a client that asked for gzip, nor the reverse).

use std::fs::File;
use std::path::Path;

use plexus::config::PRECOMPRESSED_CODINGS;
use plexus_proto::http::{AcceptEncoding, Header};

/// The configured codings, in order of preference, with their file extensions.
#[derive(Debug, Default)]
pub(super) struct Precompressed {
    codings: Vec<(&'static str, &'static str)>,
}

impl Precompressed {
    /// From `[http] precompressed` (names validation accepted; anything else is skipped).
    pub(super) fn new(names: &[String]) -> Precompressed {
        let codings = names
            .iter()
            .filter_map(|name| {
                PRECOMPRESSED_CODINGS
                    .iter()
                    .find(|(coding, _)| coding == name)
                    .copied()
            })
            .collect();
        Precompressed { codings }
    }

    /// Whether any coding is configured (file responses then say `Vary: Accept-Encoding`).
    pub(super) fn enabled(&self) -> bool {
        !self.codings.is_empty()
    }

    /// The codings to try for a request with `headers`, best first, with their extensions.
    /// Empty without an `Accept-Encoding` header (identity, whatever the RFC allows) or when
    /// it takes none.
    pub(super) fn wanted(&self, headers: &[Header]) -> Vec<(&'static str, &'static str)> {
        if self.codings.is_empty() {
            return Vec::new();
        }
        let values: Vec<&[u8]> = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("accept-encoding"))
            .map(|h| h.value.as_slice())
            .collect();
        if values.is_empty() {
            return Vec::new();
        }
        let accept = AcceptEncoding::parse(values);
        let offered: Vec<&'static str> = self.codings.iter().map(|(coding, _)| *coding).collect();
        accept
            .ranked(&offered)
            .into_iter()
            .filter_map(|chosen| self.codings.iter().find(|(c, _)| *c == chosen).copied())
            .collect()
    }
}

/// The first variant of `identity` (a path below the root) among `wanted` that exists as a
/// regular file: its coding, the open file and its metadata.
pub(super) fn open_variant(
    wanted: &[(&'static str, &'static str)],
    identity: &Path,
    open: impl Fn(&Path) -> std::io::Result<(File, std::fs::Metadata)>,
) -> Option<(&'static str, File, std::fs::Metadata)> {
    wanted.iter().find_map(|&(coding, extension)| {
        let mut name = identity.as_os_str().to_owned();
        name.push(".");
        name.push(extension);
        match open(Path::new(&name)) {
            Ok((file, metadata)) if metadata.is_file() => Some((coding, file, metadata)),
            _ => None,
        }
    })
}

/// The ETag of a variant: the identity-style tag of the variant's own file, with the
/// coding's extension inside the quotes (`"5f3a-1c-gz"`).
pub(super) fn variant_tag(tag: &str, coding: &str) -> String {
    let extension = PRECOMPRESSED_CODINGS
        .iter()
        .find(|(name, _)| *name == coding)
        .map_or(coding, |(_, extension)| *extension);
    match tag.strip_suffix('"') {
        Some(open) => format!("{open}-{extension}\""),
        None => format!("{tag}-{extension}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_proto::http::{Limits, RequestDecoder, RequestEvent};

    fn head(request: &str) -> Vec<Header> {
        let mut decoder = RequestDecoder::new(Limits::default());
        decoder.push(request.as_bytes());
        match decoder.poll() {
            Ok(Some(RequestEvent::Head(head))) => head.headers,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wanted_follows_accept_encoding_and_the_configured_order() {
        let both = Precompressed::new(&["br".into(), "gzip".into()]);
        let get = |headers: &str| head(&format!("GET / HTTP/1.1\r\nHost: t\r\n{headers}\r\n"));
        assert!(both.wanted(&get("")).is_empty());
        assert_eq!(
            both.wanted(&get("Accept-Encoding: gzip, deflate, br\r\n")),
            [("br", "br"), ("gzip", "gz")]
        );
        assert_eq!(
            both.wanted(&get(
                "Accept-Encoding: br;q=0.5\r\nAccept-Encoding: gzip\r\n"
            )),
            [("gzip", "gz"), ("br", "br")]
        );
        assert!(both
            .wanted(&get("Accept-Encoding: gzip;q=0, br;q=0\r\n"))
            .is_empty());
        assert!(both
            .wanted(&get("Accept-Encoding: identity\r\n"))
            .is_empty());
        assert!(!Precompressed::new(&[]).enabled());
    }

    #[test]
    fn variant_tags_differ_from_the_identity_tag() {
        assert_eq!(variant_tag("\"5f-1c\"", "gzip"), "\"5f-1c-gz\"");
        assert_eq!(variant_tag("\"5f-1c\"", "br"), "\"5f-1c-br\"");
    }
}
