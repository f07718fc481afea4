//! The order in which one event loop's datagram sessions were last active, in three scopes at
//! once: the whole loop, each socket (one per listener on a loop) and each client IP. When a
//! datagram-session cap is full, the loop reclaims the longest-idle session of the cap's scope;
//! finding it, and moving a session to the front on each datagram, are O(1).
//!
//! The lists are intrusive: each session key (a slab index of the loop's session table) has one
//! pair of links per scope, so no allocation happens per datagram.

use std::collections::HashMap;
use std::net::IpAddr;

/// The scopes, as indexes into a key's links.
const LOOP: usize = 0;
const SOCKET: usize = 1;
const IP: usize = 2;
const SCOPES: usize = 3;

/// Which sessions a reclaim may pick from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Every datagram session of the loop.
    Loop,
    /// The sessions of one socket (one listener) of the loop.
    Socket(usize),
    /// The loop's sessions of one client IP.
    Ip(IpAddr),
}

#[derive(Debug, Clone, Copy, Default)]
struct Link {
    /// Towards the most recently active end.
    newer: Option<usize>,
    /// Towards the longest-idle end.
    older: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Ends {
    newest: Option<usize>,
    oldest: Option<usize>,
}

/// Where a key sits: its socket and IP (fixed for the session's life).
#[derive(Debug, Clone, Copy)]
struct Member {
    socket: usize,
    ip: IpAddr,
    links: [Link; SCOPES],
}

/// The activity order of a loop's datagram sessions (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct IdleOrder {
    /// By session key (slab keys are dense and reused, so a vector fits).
    members: Vec<Option<Member>>,
    all: Ends,
    by_socket: Vec<Ends>,
    by_ip: HashMap<IpAddr, Ends>,
}

impl IdleOrder {
    /// Adds session `key` (of `socket`, from `ip`) as the most recently active.
    pub(crate) fn insert(&mut self, key: usize, socket: usize, ip: IpAddr) {
        self.remove(key);
        if self.members.len() <= key {
            self.members.resize(key.saturating_add(1), None);
        }
        if let Some(slot) = self.members.get_mut(key) {
            *slot = Some(Member {
                socket,
                ip,
                links: [Link::default(); SCOPES],
            });
        }
        for scope in 0..SCOPES {
            self.push_newest(key, scope);
        }
    }

    /// Marks session `key` as active now.
    pub(crate) fn touch(&mut self, key: usize) {
        if self.all.newest == Some(key) {
            // The common case of one busy peer: already first everywhere it matters.
            let Some(member) = self.member(key) else {
                return;
            };
            let socket_first = self
                .by_socket
                .get(member.socket)
                .is_some_and(|ends| ends.newest == Some(key));
            let ip_first = self
                .by_ip
                .get(&member.ip)
                .is_some_and(|ends| ends.newest == Some(key));
            if socket_first && ip_first {
                return;
            }
        }
        if self.member(key).is_none() {
            return;
        }
        for scope in 0..SCOPES {
            self.unlink(key, scope);
            self.push_newest(key, scope);
        }
    }

    /// Forgets session `key`.
    pub(crate) fn remove(&mut self, key: usize) {
        if self.member(key).is_none() {
            return;
        }
        for scope in 0..SCOPES {
            self.unlink(key, scope);
        }
        if let Some(member) = self.members.get_mut(key).and_then(Option::take) {
            if self
                .by_ip
                .get(&member.ip)
                .is_some_and(|ends| ends.newest.is_none())
            {
                self.by_ip.remove(&member.ip);
            }
        }
    }

    /// The longest-idle session in `scope`, if it has any.
    pub(crate) fn oldest(&self, scope: Scope) -> Option<usize> {
        match scope {
            Scope::Loop => self.all.oldest,
            Scope::Socket(socket) => self.by_socket.get(socket)?.oldest,
            Scope::Ip(ip) => self.by_ip.get(&ip)?.oldest,
        }
    }

    /// How many sessions are ordered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.members.iter().flatten().count()
    }

    fn member(&self, key: usize) -> Option<&Member> {
        self.members.get(key)?.as_ref()
    }

    fn ends(&mut self, key: usize, scope: usize) -> Option<&mut Ends> {
        let member = *self.member(key)?;
        match scope {
            LOOP => Some(&mut self.all),
            SOCKET => {
                if self.by_socket.len() <= member.socket {
                    self.by_socket
                        .resize(member.socket.saturating_add(1), Ends::default());
                }
                self.by_socket.get_mut(member.socket)
            }
            IP => Some(self.by_ip.entry(member.ip).or_default()),
            _ => None,
        }
    }

    fn link(&mut self, key: usize, scope: usize) -> Option<&mut Link> {
        self.members.get_mut(key)?.as_mut()?.links.get_mut(scope)
    }

    fn push_newest(&mut self, key: usize, scope: usize) {
        let Some(ends) = self.ends(key, scope) else {
            return;
        };
        let previous = ends.newest.replace(key);
        if ends.oldest.is_none() {
            ends.oldest = Some(key);
        }
        if let Some(link) = self.link(key, scope) {
            *link = Link {
                newer: None,
                older: previous,
            };
        }
        if let Some(link) = previous.and_then(|previous| self.link(previous, scope)) {
            link.newer = Some(key);
        }
    }

    fn unlink(&mut self, key: usize, scope: usize) {
        let Some(link) = self.link(key, scope).map(std::mem::take) else {
            return;
        };
        match link.newer {
            Some(newer) => {
                if let Some(newer) = self.link(newer, scope) {
                    newer.older = link.older;
                }
            }
            None => {
                if let Some(ends) = self.ends(key, scope) {
                    if ends.newest == Some(key) {
                        ends.newest = link.older;
                    }
                }
            }
        }
        match link.older {
            Some(older) => {
                if let Some(older) = self.link(older, scope) {
                    older.newer = link.newer;
                }
            }
            None => {
                if let Some(ends) = self.ends(key, scope) {
                    if ends.oldest == Some(key) {
                        ends.oldest = link.newer;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn the_longest_idle_session_of_each_scope_is_found_and_touch_reorders() {
        let mut order = IdleOrder::default();
        order.insert(1, 0, ip(1));
        order.insert(2, 1, ip(2));
        order.insert(3, 0, ip(2));
        assert_eq!(order.oldest(Scope::Loop), Some(1));
        assert_eq!(order.oldest(Scope::Socket(0)), Some(1));
        assert_eq!(order.oldest(Scope::Socket(1)), Some(2));
        assert_eq!(order.oldest(Scope::Ip(ip(2))), Some(2));
        assert_eq!(order.oldest(Scope::Ip(ip(9))), None);
        assert_eq!(order.oldest(Scope::Socket(7)), None);

        order.touch(1);
        assert_eq!(order.oldest(Scope::Loop), Some(2));
        assert_eq!(order.oldest(Scope::Socket(0)), Some(3));
        order.touch(2);
        assert_eq!(order.oldest(Scope::Loop), Some(3));
        assert_eq!(order.oldest(Scope::Ip(ip(2))), Some(3));
        // Touching the newest everywhere changes nothing.
        order.touch(2);
        assert_eq!(order.oldest(Scope::Loop), Some(3));

        order.remove(3);
        assert_eq!(order.oldest(Scope::Loop), Some(1));
        assert_eq!(order.oldest(Scope::Socket(0)), Some(1));
        assert_eq!(order.oldest(Scope::Ip(ip(2))), Some(2));
        order.remove(2);
        assert_eq!(order.oldest(Scope::Ip(ip(2))), None);
        assert!(
            !order.by_ip.contains_key(&ip(2)),
            "empty IP lists are dropped"
        );
        order.remove(1);
        order.remove(1);
        assert_eq!(order.oldest(Scope::Loop), None);
        assert_eq!(order.len(), 0);
    }

    /// Against a plain model (a vector in activity order): random operations agree.
    #[test]
    fn agrees_with_a_simple_model() {
        let mut order = IdleOrder::default();
        let mut model: Vec<(usize, usize, IpAddr)> = Vec::new();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let key = (next() % 16) as usize;
            match next() % 3 {
                0 => {
                    let (socket, address) = ((next() % 3) as usize, ip((next() % 4) as u8));
                    order.insert(key, socket, address);
                    model.retain(|(k, _, _)| *k != key);
                    model.push((key, socket, address));
                }
                1 => {
                    order.touch(key);
                    if let Some(at) = model.iter().position(|(k, _, _)| *k == key) {
                        let entry = model.remove(at);
                        model.push(entry);
                    }
                }
                _ => {
                    order.remove(key);
                    model.retain(|(k, _, _)| *k != key);
                }
            }
            assert_eq!(order.oldest(Scope::Loop), model.first().map(|e| e.0));
            for socket in 0..3 {
                let expected = model.iter().find(|e| e.1 == socket).map(|e| e.0);
                assert_eq!(order.oldest(Scope::Socket(socket)), expected);
            }
            for last in 0..4 {
                let expected = model.iter().find(|e| e.2 == ip(last)).map(|e| e.0);
                assert_eq!(order.oldest(Scope::Ip(ip(last))), expected);
            }
            assert_eq!(order.len(), model.len());
        }
    }
}
