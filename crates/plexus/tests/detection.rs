//! The detection stage, a [`ProtocolGroup`], driven through the harness (`plexus::testing`):
//! bytes and the fake clock in; the member (or fallback) that got the session, what it was
//! replayed, and the counts the listener shows on `/metrics` out.

use std::sync::Arc;
use std::time::Duration;

use plexus::protocol_group::{prefix, Detection, ProtocolGroup};
use plexus::testing::Harness;
use plexus::{ProtocolGroupSnapshot, Service, Session, SessionHandler};

/// Answers every read with its tag, a colon and the bytes read.
struct Tagged(&'static str);
struct TaggedSession(&'static str);

impl Service for Tagged {
    fn open(&self, _: &mut Session<'_>) -> Box<dyn SessionHandler> {
        Box::new(TaggedSession(self.0))
    }
}

impl SessionHandler for TaggedSession {
    fn on_data(&mut self, session: &mut Session<'_>, data: &[u8]) {
        let mut reply = format!("{}:", self.0).into_bytes();
        reply.extend_from_slice(data);
        session.send(&reply);
    }
}

fn tagged(tag: &'static str) -> Arc<dyn Service> {
    Arc::new(Tagged(tag))
}

const TIME_BUDGET: Duration = Duration::from_secs(2);

/// `hello` (prefix "HELLO "), `binary` (0xB7), fallback `lines`; an 16-byte budget.
fn group() -> ProtocolGroup {
    ProtocolGroup::builder()
        .member("hello", prefix(*b"HELLO "), tagged("hello"))
        .member("binary", prefix([0xB7]), tagged("binary"))
        .fallback(tagged("lines"))
        .byte_budget(16)
        .time_budget(TIME_BUDGET)
        .build()
}

/// The plain layer's snapshot, expecting no other.
fn plain(harness: &Harness) -> ProtocolGroupSnapshot {
    let mut groups = harness.protocol_groups();
    assert_eq!(groups.len(), 1, "{groups:?}");
    let group = groups.remove(0);
    assert_eq!(group.layer, "plain");
    group
}

fn members(group: &ProtocolGroupSnapshot) -> Vec<(&str, u64)> {
    group
        .members
        .iter()
        .map(|(name, n)| (name.as_str(), *n))
        .collect()
}

fn fallbacks(group: &ProtocolGroupSnapshot) -> Vec<(&str, u64)> {
    group.fallbacks.clone()
}

fn budgets(group: &ProtocolGroupSnapshot) -> Vec<(&str, u64)> {
    group.budgets_spent.clone()
}

const NO_FALLBACK: [(&str, u64); 3] = [("no_match", 0), ("byte_budget", 0), ("time_budget", 0)];
const NO_BUDGET: [(&str, u64); 2] = [("bytes", 0), ("time", 0)];

#[test]
fn a_member_gets_the_session_and_its_first_bytes_at_once_or_one_byte_at_a_time() {
    for step in [usize::MAX, 1] {
        let mut harness = Harness::new(group());
        assert!(harness.protocol_groups().is_empty(), "nothing decided yet");
        let input = b"HELLO there";
        for chunk in input.chunks(step.min(input.len())) {
            harness.receive(chunk);
        }
        // Decided on the sixth byte; the bytes so far are replayed, then the rest arrives.
        let sent = harness.take_sent();
        let expected: &[u8] = match step {
            1 => b"hello:HELLO hello:thello:hhello:ehello:rhello:e",
            _ => b"hello:HELLO there",
        };
        assert_eq!(sent, expected, "step {step}");
        let group = plain(&harness);
        assert_eq!(members(&group), [("hello", 1), ("binary", 0)]);
        assert_eq!(fallbacks(&group), NO_FALLBACK);
        assert_eq!(budgets(&group), NO_BUDGET);
        assert_eq!(
            harness.timer_deadline(),
            None,
            "the time budget is cancelled"
        );
    }
}

#[test]
fn bytes_no_member_can_start_go_to_the_fallback_at_once() {
    let mut harness = Harness::new(group());
    harness.receive(b"x");
    assert_eq!(harness.take_sent(), b"lines:x");
    let group = plain(&harness);
    assert_eq!(members(&group), [("hello", 0), ("binary", 0)]);
    assert_eq!(
        fallbacks(&group),
        [("no_match", 1), ("byte_budget", 0), ("time_budget", 0)]
    );
    assert_eq!(budgets(&group), NO_BUDGET);
}

#[test]
fn the_byte_budget_ends_the_wait_for_a_member_that_always_needs_more() {
    let greedy = ProtocolGroup::builder()
        .member("greedy", |_: &[u8]| Detection::NeedMore, tagged("greedy"))
        .fallback(tagged("lines"))
        .byte_budget(4)
        .build();
    let mut harness = Harness::new(greedy);
    for byte in b"abc" {
        harness.receive(&[*byte]);
    }
    assert!(harness.take_sent().is_empty(), "still undecided");
    harness.receive(b"d");
    assert_eq!(harness.take_sent(), b"lines:abcd");
    let group = plain(&harness);
    assert_eq!(
        fallbacks(&group),
        [("no_match", 0), ("byte_budget", 1), ("time_budget", 0)]
    );
    assert_eq!(budgets(&group), [("bytes", 1), ("time", 0)]);
}

#[test]
fn the_time_budget_passes_on_the_fake_clock_and_undecided_bytes_go_to_the_fallback() {
    let mut harness = Harness::new(group());
    let opened = harness.now();
    // "HEL" is a beginning of "HELLO ": the group waits.
    harness.receive(b"HEL");
    assert_eq!(harness.timer_deadline(), Some(opened + TIME_BUDGET));
    harness.advance(TIME_BUDGET - Duration::from_millis(1));
    assert!(harness.take_sent().is_empty(), "not before the budget");
    harness.advance(Duration::from_millis(1));
    assert_eq!(harness.take_sent(), b"lines:HEL");
    // The fallback has the session from now on.
    harness.receive(b"LO ");
    assert_eq!(harness.take_sent(), b"lines:LO ");
    let group = plain(&harness);
    assert_eq!(members(&group), [("hello", 0), ("binary", 0)]);
    assert_eq!(
        fallbacks(&group),
        [("no_match", 0), ("byte_budget", 0), ("time_budget", 1)]
    );
    assert_eq!(budgets(&group), [("bytes", 0), ("time", 1)]);
}

#[test]
fn a_spent_time_budget_lets_a_later_members_claim_win() {
    let group = ProtocolGroup::builder()
        .member("ab", prefix(*b"ab"), tagged("ab"))
        .member("a", prefix(*b"a"), tagged("a"))
        .fallback(tagged("lines"))
        .time_budget(TIME_BUDGET)
        .build();
    let mut harness = Harness::new(group);
    harness.receive(b"a");
    assert!(harness.take_sent().is_empty(), "\"ab\" may still match");
    harness.advance(TIME_BUDGET);
    assert_eq!(harness.take_sent(), b"a:a");
    let group = plain(&harness);
    assert_eq!(members(&group), [("ab", 0), ("a", 1)]);
    assert_eq!(fallbacks(&group), NO_FALLBACK);
    assert_eq!(budgets(&group), [("bytes", 0), ("time", 1)]);
}

#[test]
fn a_client_hello_starts_tls_with_the_bytes_so_far_as_ciphertext() {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = generated.cert.der().clone();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(generated.key_pair.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let group = ProtocolGroup::builder()
        .tls(Arc::new(config))
        .member("hello", prefix(*b"HELLO "), tagged("hello"))
        .fallback(tagged("lines"))
        .build();
    assert_eq!(group.member_names(), ["tls", "hello"]);
    let inner = group.inner().expect("a group inside TLS");
    assert_eq!(inner.member_names(), ["hello"]);
    let mut harness = Harness::new(group);
    // A TLS record header (handshake, TLS 1.0 record version), one byte at a time.
    for byte in b"\x16\x03\x01" {
        harness.receive(&[*byte]);
    }
    assert_eq!(harness.tls_requested(), Some(&b"\x16\x03\x01"[..]));
    let group = plain(&harness);
    assert_eq!(members(&group), [("tls", 1), ("hello", 0)]);
    assert_eq!(fallbacks(&group), NO_FALLBACK);
}

#[test]
fn a_group_without_a_fallback_closes_what_no_member_claims_and_counts_it() {
    let group = ProtocolGroup::builder()
        .member("hello", prefix(*b"HELLO "), tagged("hello"))
        .build();
    let mut harness = Harness::new(group);
    harness.receive(b"nope");
    assert!(harness.take_sent().is_empty());
    assert!(harness.is_closing() || harness.closed().is_some());
    let group = plain(&harness);
    assert_eq!(
        fallbacks(&group),
        [("no_match", 1), ("byte_budget", 0), ("time_budget", 0)]
    );
}

#[test]
fn each_listener_counts_its_own_sessions_and_the_group_counts_them_all() {
    let shared: Arc<ProtocolGroup> = Arc::new(group());
    let mut first = Harness::builder_shared(shared.clone() as Arc<dyn Service>)
        .listener("first")
        .open();
    let mut second = Harness::builder_shared(shared.clone() as Arc<dyn Service>)
        .listener("second")
        .open();
    first.receive(b"\xB7\x00\x00");
    second.receive(b"?");
    assert_eq!(
        members(&plain(&first)),
        [("hello", 0), ("binary", 1)],
        "only the first listener's session"
    );
    assert_eq!(fallbacks(&plain(&first)), NO_FALLBACK);
    assert_eq!(members(&plain(&second)), [("hello", 0), ("binary", 0)]);
    assert_eq!(
        fallbacks(&plain(&second)),
        [("no_match", 1), ("byte_budget", 0), ("time_budget", 0)]
    );
    let totals: Vec<(String, u64)> = shared.counts();
    let totals: Vec<(&str, u64)> = totals.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    assert_eq!(
        totals,
        [
            ("hello", 0),
            ("binary", 1),
            ("fallback", 1),
            ("fallback (byte budget)", 0),
            ("fallback (time budget)", 0)
        ]
    );
}
