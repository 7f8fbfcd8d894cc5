//! Authentication: two secrets with different rights (DESIGN.md, "Authentication").
//!
//! - **Agents**: `Authorization: Bearer <agent token>`: manifests, bundles, heartbeats only.
//! - **Humans**: HTTP basic auth `fleet:<UI password>` for the dashboard, `/api/*` and
//!   `/locust/*`; the CLI on the controller host uses `Bearer <operator token>` with the same
//!   rights. Neither agent credential opens a human route, nor the reverse.
//!
//! Tokens are compared in constant time. The UI password is a slow PBKDF2 hash, so a
//! verified `Authorization` value is cached (by its sha256) and later requests cost one hash
//! lookup. Failures are rate-limited per client address; every refusal is the same 401, so
//! nothing tells which part was wrong.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use fleet_common::secret::ct_eq;
use sha2::{Digest, Sha256};

use crate::secrets::PasswordHash;

/// The user name of the web UI's basic auth.
pub const UI_USER: &str = "fleet";

/// Failed attempts a client address may make in a burst, and how fast that allowance refills
/// (the defaults of `controller.auth_fail_burst` and `controller.auth_fail_refill_per_s`).
pub const FAIL_BURST: f64 = 10.0;
pub const FAIL_REFILL_PER_S: f64 = 0.5;
/// Verified credentials kept (each is 32 bytes); the cache is cleared when it is full.
const CACHE_MAX: usize = 1024;
/// Addresses tracked for failures; the table is cleared when it is full.
const FAIL_TABLE_MAX: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Operator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Missing or wrong credentials, or credentials without the needed rights.
    Unauthorized,
    /// Too many failures from this address: answered without checking.
    RateLimited,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct Auth {
    agent_token: String,
    operator_token: String,
    ui: PasswordHash,
    verified: Mutex<HashSet<[u8; 32]>>,
    failures: Mutex<HashMap<IpAddr, Bucket>>,
    burst: f64,
    refill_per_s: f64,
}

impl Auth {
    pub fn new(agent_token: &str, operator_token: &str, ui: PasswordHash) -> Auth {
        Auth::with_limits(
            agent_token,
            operator_token,
            ui,
            FAIL_BURST,
            FAIL_REFILL_PER_S,
        )
    }

    pub fn with_limits(
        agent_token: &str,
        operator_token: &str,
        ui: PasswordHash,
        burst: f64,
        refill_per_s: f64,
    ) -> Auth {
        Auth {
            burst: burst.max(1.0),
            refill_per_s: refill_per_s.max(0.0),
            agent_token: agent_token.trim().to_string(),
            operator_token: operator_token.trim().to_string(),
            ui,
            verified: Mutex::new(HashSet::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn limited(&self, ip: IpAddr) -> bool {
        let mut f = self.failures.lock().unwrap();
        match f.get_mut(&ip) {
            None => false,
            Some(b) => {
                let now = Instant::now();
                b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.refill_per_s)
                    .min(self.burst);
                b.at = now;
                b.tokens < 1.0
            }
        }
    }

    fn failed(&self, ip: IpAddr) {
        let mut f = self.failures.lock().unwrap();
        if f.len() >= FAIL_TABLE_MAX {
            f.clear();
        }
        let b = f.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: Instant::now(),
        });
        b.tokens -= 1.0;
    }

    /// Who `authorization` (the header value, if any) speaks for.
    fn identify(&self, authorization: &str) -> Option<Role> {
        if let Some(token) = authorization.strip_prefix("Bearer ") {
            let token = token.trim().as_bytes();
            // Both compared, always, so timing does not tell which secret was close.
            let agent = ct_eq(token, self.agent_token.as_bytes());
            let operator = ct_eq(token, self.operator_token.as_bytes());
            return match (agent, operator) {
                (true, _) => Some(Role::Agent),
                (_, true) => Some(Role::Operator),
                _ => None,
            };
        }
        let basic = authorization.strip_prefix("Basic ")?;
        let key: [u8; 32] = Sha256::digest(authorization.as_bytes()).into();
        if self.verified.lock().unwrap().contains(&key) {
            return Some(Role::Operator);
        }
        let raw = B64.decode(basic.trim()).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (user, password) = text.split_once(':')?;
        let user_ok = ct_eq(user.as_bytes(), UI_USER.as_bytes());
        let password_ok = self.ui.verify(password);
        if user_ok && password_ok {
            let mut v = self.verified.lock().unwrap();
            if v.len() >= CACHE_MAX {
                v.clear();
            }
            v.insert(key);
            Some(Role::Operator)
        } else {
            None
        }
    }

    /// Checks a request's credentials for a route that needs `need`.
    pub fn check(
        &self,
        authorization: Option<&str>,
        ip: IpAddr,
        need: Role,
    ) -> Result<(), Refusal> {
        if self.limited(ip) {
            return Err(Refusal::RateLimited);
        }
        match authorization.and_then(|a| self.identify(a)) {
            Some(role) if role == need => Ok(()),
            _ => {
                self.failed(ip);
                Err(Refusal::Unauthorized)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let h = PasswordHash::parse(&crate::secrets::hash_password("pw")).unwrap();
        Auth::new("agent-secret", "operator-secret", h)
    }

    fn basic(user: &str, pw: &str) -> String {
        format!("Basic {}", B64.encode(format!("{user}:{pw}")))
    }

    #[test]
    fn each_secret_opens_only_its_own_routes() {
        let a = auth();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            a.check(Some("Bearer agent-secret"), ip, Role::Agent),
            Ok(())
        );
        assert_eq!(
            a.check(Some("Bearer agent-secret"), ip, Role::Operator),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            a.check(Some("Bearer operator-secret"), ip, Role::Operator),
            Ok(())
        );
        assert_eq!(
            a.check(Some("Bearer operator-secret"), ip, Role::Agent),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            a.check(Some(&basic("fleet", "pw")), ip, Role::Operator),
            Ok(())
        );
        // Cached the second time, still right.
        assert_eq!(
            a.check(Some(&basic("fleet", "pw")), ip, Role::Operator),
            Ok(())
        );
        assert_eq!(
            a.check(Some(&basic("fleet", "pw")), ip, Role::Agent),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            a.check(Some(&basic("admin", "pw")), ip, Role::Operator),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            a.check(Some(&basic("fleet", "nope")), ip, Role::Operator),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            a.check(None, ip, Role::Operator),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            a.check(Some("Basic %%%"), ip, Role::Operator),
            Err(Refusal::Unauthorized)
        );
    }

    #[test]
    fn failures_are_rate_limited_per_address() {
        let a = auth();
        let bad: IpAddr = "10.0.0.1".parse().unwrap();
        let good: IpAddr = "10.0.0.2".parse().unwrap();
        let mut limited_after = None;
        for i in 0..20 {
            if a.check(Some("Bearer wrong"), bad, Role::Agent) == Err(Refusal::RateLimited) {
                limited_after = Some(i);
                break;
            }
        }
        assert_eq!(limited_after, Some(FAIL_BURST as usize));
        // Once limited, even the right secret waits: guessing gains nothing.
        assert_eq!(
            a.check(Some("Bearer agent-secret"), bad, Role::Agent),
            Err(Refusal::RateLimited)
        );
        // Other addresses are not affected.
        assert_eq!(
            a.check(Some("Bearer agent-secret"), good, Role::Agent),
            Ok(())
        );
    }
}
