//! The outer shape of a DER OCSP response (RFC 6960 §4.2.1), checked before a server staples
//! it: a file that is not one, or whose `responseStatus` is not `successful`, must not be
//! sent to clients (and must not replace a good one on reload).
//!
//! Only the envelope is read — `SEQUENCE { ENUMERATED responseStatus, [0] responseBytes }` —
//! not the signature, the certificate it names or its validity period: the client verifies
//! those, and refreshing the file before `nextUpdate` is the operator's job (as with nginx's
//! `ssl_stapling_file`).
//!
//! ```
//! use plexus_proto::ocsp::{check_response, OcspError};
//!
//! // SEQUENCE { ENUMERATED 6 (unauthorized) }
//! assert_eq!(check_response(&[0x30, 0x03, 0x0a, 0x01, 0x06]), Err(OcspError::Status(6)));
//! assert_eq!(check_response(b"not der"), Err(OcspError::NotDer));
//! ```

/// Why bytes cannot be stapled as an OCSP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OcspError {
    /// Not a DER `OCSPResponse` (wrong tags, lengths, or bytes after it).
    #[error("not a DER OCSP response")]
    NotDer,
    /// The responder answered with an error status (1 malformedRequest, 2 internalError,
    /// 3 tryLater, 5 sigRequired, 6 unauthorized).
    #[error("the OCSP response status is {status} ({name}), not successful", status = .0, name = status_name(*.0))]
    Status(u8),
    /// `successful`, but without the response itself.
    #[error("a successful OCSP response without responseBytes")]
    NoResponseBytes,
}

/// Checks that `der` is a successful OCSP response carrying its response bytes.
pub fn check_response(der: &[u8]) -> Result<(), OcspError> {
    let (body, rest) = read_tlv(der, 0x30).ok_or(OcspError::NotDer)?;
    if !rest.is_empty() {
        return Err(OcspError::NotDer);
    }
    let (status, after_status) = read_tlv(body, 0x0a).ok_or(OcspError::NotDer)?;
    let &[status] = status else {
        return Err(OcspError::NotDer);
    };
    if status != 0 {
        return Err(OcspError::Status(status));
    }
    match read_tlv(after_status, 0xa0) {
        Some((bytes, [])) if !bytes.is_empty() => Ok(()),
        Some(_) => Err(OcspError::NotDer),
        None if after_status.is_empty() => Err(OcspError::NoResponseBytes),
        None => Err(OcspError::NotDer),
    }
}

fn status_name(status: u8) -> &'static str {
    match status {
        0 => "successful",
        1 => "malformedRequest",
        2 => "internalError",
        3 => "tryLater",
        5 => "sigRequired",
        6 => "unauthorized",
        _ => "unknown",
    }
}

/// One DER element with tag `tag`: its contents and what follows it.
fn read_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        // Long form: 1 to 4 length bytes (an OCSP response is far below 4 GiB).
        let count = usize::from(first & 0x7f);
        if !(1..=4).contains(&count) {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(count)?;
        rest = after;
        // At most 4 bytes: the shifts never lose a bit.
        let len = bytes
            .iter()
            .fold(0u64, |len, &b| len.wrapping_shl(8) | u64::from(b));
        usize::try_from(len).ok()?
    };
    rest.split_at_checked(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successful_responses_with_bytes_pass_and_the_rest_is_named() {
        // SEQUENCE { ENUMERATED 0, [0] { 0x04 0x00 } }
        assert_eq!(
            check_response(&[0x30, 0x07, 0x0a, 0x01, 0x00, 0xa0, 0x02, 0x04, 0x00]),
            Ok(())
        );
        assert_eq!(
            check_response(&[0x30, 0x03, 0x0a, 0x01, 0x00]),
            Err(OcspError::NoResponseBytes)
        );
        assert_eq!(
            check_response(&[0x30, 0x03, 0x0a, 0x01, 0x03]),
            Err(OcspError::Status(3))
        );
        // Long-form length.
        let mut long = vec![0x30, 0x81, 0x85, 0x0a, 0x01, 0x00, 0xa0, 0x81, 0x7f];
        long.extend([0u8; 0x7f]);
        assert_eq!(check_response(&long), Ok(()));
    }

    #[test]
    fn truncated_trailing_or_mis_tagged_bytes_are_not_der() {
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x05, 0x0a, 0x01, 0x00],
            &[0x30, 0x03, 0x0a, 0x01, 0x00, 0x00],
            &[0x31, 0x03, 0x0a, 0x01, 0x00],
            &[0x30, 0x04, 0x0a, 0x02, 0x00, 0x00],
            &[0x30, 0x85, 0, 0, 0, 0, 3],
            &[0x30, 0x05, 0x0a, 0x01, 0x00, 0x04, 0x00],
        ] {
            assert_eq!(check_response(bad), Err(OcspError::NotDer), "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = check_response(&bytes);
        }
    }
}
