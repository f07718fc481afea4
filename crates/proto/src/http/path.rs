//! Request-target → file path mapping for the static file server: owns the
//! rules that keep a request inside the document root (percent-decoding,
//! refusing `..`, encoded separators, NUL and backslashes).

/// Why a request-target cannot name a file under the root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// Not origin-form (`/path?query`): absolute-form, authority-form, `*`.
    #[error("request-target is not an absolute path")]
    NotOriginForm,
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-escape in the path")]
    BadEscape,
    /// A NUL or other control byte, raw or percent-encoded.
    #[error("control byte in the path")]
    ControlByte,
    /// A `/` encoded as `%2F` inside a segment.
    #[error("encoded '/' in a path segment")]
    EncodedSlash,
    /// A `..` segment (raw or decoded, like `%2e%2e`).
    #[error("'..' segment in the path")]
    DotDot,
    /// A backslash, raw or decoded (a separator on some systems).
    #[error("backslash in the path")]
    Backslash,
    /// A segment that is not UTF-8 once decoded.
    #[error("path segment is not UTF-8")]
    NotUtf8,
}

/// A request-target in origin-form (`/path?query`), from [`origin_form`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginForm<'a> {
    /// The authority of an absolute-form target (`host:port`): it replaces the Host header
    /// (RFC 9112 §3.2.2). `None` for a target that was origin-form already.
    pub authority: Option<&'a str>,
    /// The path and query, starting with `/`.
    pub path_and_query: std::borrow::Cow<'a, str>,
}

/// The origin-form of a request-target: itself when it starts with `/`; for an absolute-form
/// `http://host[:port]/path?query` (or `https://`), which a server MUST accept (RFC 9112
/// §3.2.2), its path and query (`/` when it has no path) and authority. `None` for the other
/// forms (authority-form, `*`, other schemes, an empty authority or one with userinfo).
pub fn origin_form(target: &str) -> Option<OriginForm<'_>> {
    if target.starts_with('/') {
        return Some(OriginForm {
            authority: None,
            path_and_query: std::borrow::Cow::Borrowed(target),
        });
    }
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at_checked(end)?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let tail = tail.split('#').next().unwrap_or("");
    let path_and_query = if tail.starts_with('/') {
        std::borrow::Cow::Borrowed(tail)
    } else {
        std::borrow::Cow::Owned(format!("/{tail}"))
    };
    Some(OriginForm {
        authority: Some(authority),
        path_and_query,
    })
}

/// Maps an origin-form request-target to safe relative path segments: the
/// query is dropped, each segment is percent-decoded, `.` and empty segments
/// are dropped, and anything that could leave the root is refused. `"/"`
/// gives no segments (the root itself).
///
/// # Errors
///
/// See [`PathError`].
pub fn normalize_path(target: &str) -> Result<Vec<String>, PathError> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let Some(path) = path.strip_prefix('/') else {
        return Err(PathError::NotOriginForm);
    };
    let mut segments = Vec::new();
    for raw in path.split('/') {
        if raw.contains('\\') {
            return Err(PathError::Backslash);
        }
        let decoded = percent_decode(raw.as_bytes())?;
        if decoded.contains(&b'/') {
            return Err(PathError::EncodedSlash);
        }
        if decoded.contains(&b'\\') {
            return Err(PathError::Backslash);
        }
        if decoded.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Err(PathError::ControlByte);
        }
        match decoded.as_slice() {
            b"" | b"." => continue,
            b".." => return Err(PathError::DotDot),
            _ => {}
        }
        let segment = String::from_utf8(decoded).map_err(|_| PathError::NotUtf8)?;
        segments.push(segment);
    }
    Ok(segments)
}

fn percent_decode(raw: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let [byte, tail @ ..] = rest {
        if *byte == b'%' {
            let [hi, lo, after @ ..] = tail else {
                return Err(PathError::BadEscape);
            };
            let hex = |digit: &u8| char::from(*digit).to_digit(16).ok_or(PathError::BadEscape);
            let value =
                u8::try_from((hex(hi)? << 4) | hex(lo)?).map_err(|_| PathError::BadEscape)?;
            out.push(value);
            rest = after;
        } else {
            out.push(*byte);
            rest = tail;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(target: &str) -> Vec<String> {
        normalize_path(target).unwrap_or_else(|e| panic!("{target}: {e}"))
    }

    #[test]
    fn absolute_form_maps_to_its_path_and_authority() {
        let form = |t| origin_form(t).map(|o| (o.authority, o.path_and_query.into_owned()));
        assert_eq!(form("/a?b"), Some((None, "/a?b".to_owned())));
        assert_eq!(
            form("http://example.com:8080/x/y?q=1"),
            Some((Some("example.com:8080"), "/x/y?q=1".to_owned()))
        );
        assert_eq!(form("HTTPS://h"), Some((Some("h"), "/".to_owned())));
        assert_eq!(form("http://h?q"), Some((Some("h"), "/?q".to_owned())));
        for refused in [
            "*",
            "example.com:443",
            "ftp://h/x",
            "http:///x",
            "http://u@h/x",
            "",
        ] {
            assert_eq!(form(refused), None, "{refused}");
        }
    }

    #[test]
    fn plain_paths_become_segments_without_query_dots_or_empties() {
        assert_eq!(ok("/"), Vec::<String>::new());
        assert_eq!(ok("/index.html"), ["index.html"]);
        assert_eq!(ok("/a//b/./c/?x=../../etc"), ["a", "b", "c"]);
        assert_eq!(ok("/a%20b/%C3%A9.txt"), ["a b", "é.txt"]);
        assert_eq!(ok("/%2e/x"), ["x"]);
        assert_eq!(ok("/..a/b..c/...x"), ["..a", "b..c", "...x"]);
    }

    #[test]
    fn dot_dot_traversal_is_refused_raw_and_encoded() {
        for target in [
            "/..",
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/a/..",
            "/%2e%2e/etc/passwd",
            "/%2E%2E/x",
            "/.%2e/x",
            "/%2e./x",
        ] {
            assert_eq!(normalize_path(target), Err(PathError::DotDot), "{target}");
        }
    }

    #[test]
    fn encoded_slash_backslash_and_nul_are_refused() {
        assert_eq!(normalize_path("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(
            normalize_path("/..%2f..%2fetc"),
            Err(PathError::EncodedSlash)
        );
        assert_eq!(normalize_path("/a\\..\\b"), Err(PathError::Backslash));
        assert_eq!(normalize_path("/a%5c..%5cb"), Err(PathError::Backslash));
        assert_eq!(normalize_path("/a%00.html"), Err(PathError::ControlByte));
        assert_eq!(normalize_path("/a\0b"), Err(PathError::ControlByte));
        assert_eq!(normalize_path("/a%0a"), Err(PathError::ControlByte));
    }

    #[test]
    fn bad_escapes_and_non_origin_forms_are_refused() {
        assert_eq!(normalize_path("/a%"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/%ff"), Err(PathError::NotUtf8));
        assert_eq!(normalize_path("*"), Err(PathError::NotOriginForm));
        assert_eq!(
            normalize_path("http://example.com/x"),
            Err(PathError::NotOriginForm)
        );
        assert_eq!(normalize_path(""), Err(PathError::NotOriginForm));
        assert_eq!(normalize_path("?/x"), Err(PathError::NotOriginForm));
    }

    proptest::proptest! {
        #[test]
        fn normalized_segments_are_always_safe(
            target in proptest::prop_oneof![
                proptest::arbitrary::any::<String>(),
                "/[a-z%./\\\\0-9A-F]{0,40}",
            ]
        ) {
            if let Ok(segments) = normalize_path(&target) {
                for segment in segments {
                    proptest::prop_assert!(!segment.is_empty());
                    proptest::prop_assert!(segment != "." && segment != "..");
                    proptest::prop_assert!(!segment.contains(['/', '\\', '\0']));
                }
            }
        }
    }
}
