//! Authentication: two secrets with different rights (docs/security.md, docs/protocol.md).
//!
//! - **Agents**: `Authorization: Bearer <agent token>`: manifests, bundles, heartbeats only.
//! - **Humans**: HTTP basic auth `fleet:<UI password>` for the dashboard, `/api/*` and
//!   `/locust/*`; the CLI on the controller host uses `Bearer <operator token>` with the same
//!   rights. Neither agent credential opens a human route, nor the reverse.
//!
//! What each check costs decides how failures are limited (docs/security.md, "Failed
//! attempts"). Tokens are 256-bit random values compared in constant time: cheap to check and
//! impossible to guess, so a token is always checked, whoever else failed before. A verified
//! `Authorization` value is cached (by its sha256), so a UI password that worked once costs one
//! hash lookup from then on, also always checked. Only a password not yet seen costs a PBKDF2
//! derivation: it runs on a blocking thread, at most [`HASH_THREADS`] at once, and a client key
//! over its failure budget waits for the single [`PENALTY_THREADS`] lane, so a flood of wrong
//! passwords takes at most that much CPU and never a runtime worker. Valid credentials are never
//! refused because of failures; failures are counted per client key ([`crate::daemon::limiter`]) and,
//! over budget, answered `429` instead of `401`. Every other refusal is the same 401, so
//! nothing tells which part was wrong.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use fleet_common::secret::ct_eq;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::daemon::client_ip::{client_ip, failure_key, Cidr};
use crate::daemon::limiter::FailureTable;
use crate::secrets::PasswordHash;

/// The user name of the web UI's basic auth.
pub const UI_USER: &str = "fleet";

/// Failed attempts a client key may make in a burst, and how fast that allowance refills
/// (the defaults of `controller.auth_fail_burst` and `controller.auth_fail_refill_per_s`).
pub const FAIL_BURST: f64 = 10.0;
pub const FAIL_REFILL_PER_S: f64 = 0.5;
/// Verified credentials kept (each is 32 bytes); the cache is cleared when it is full. Only
/// credentials that verified go in, so strangers cannot fill it.
const CACHE_MAX: usize = 1024;
/// Client keys tracked for failures; the least recently failed one makes room.
const FAIL_TABLE_MAX: usize = 65_536;
/// PBKDF2 derivations running at once, each on a blocking thread (one costs tens of
/// milliseconds of a core in a release build, about half a second in a debug build)...
pub const HASH_THREADS: usize = 2;
/// ...of which at most this many for keys over their failure budget, so the fresh lane always
/// has a thread for a client that has not failed.
pub const PENALTY_THREADS: usize = 1;
/// How long a password check waits for a hashing thread before it is answered `503`.
const HASH_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Operator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Missing or wrong credentials, or credentials without the needed rights.
    Unauthorized,
    /// Wrong credentials again from a client key over its failure budget.
    RateLimited,
    /// A password not yet verified, and every hashing thread busy for [`HASH_WAIT`].
    Busy,
}

/// The tunable part (`[controller]` in fleet.toml).
#[derive(Debug, Clone)]
pub struct Settings {
    pub fail_burst: f64,
    pub fail_refill_per_s: f64,
    /// Peers whose `X-Real-IP` names the client (`controller.trusted_proxies`).
    pub trusted_proxies: Vec<Cidr>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            fail_burst: FAIL_BURST,
            fail_refill_per_s: FAIL_REFILL_PER_S,
            trusted_proxies: vec![],
        }
    }
}

/// What an `Authorization` value is, found without the slow hash.
enum Presented {
    /// A token, or a password verified before: this role.
    Known(Role),
    /// A password that needs the PBKDF2 check; `user_ok` is the user name's check.
    Password {
        cache_key: [u8; 32],
        user_ok: bool,
        password: String,
    },
    /// Nothing usable.
    Nothing,
}

/// The secrets checked against, replaced as a whole by a reload (docs/security.md,
/// "Rotation"). The cache of verified passwords belongs to one set: a reload drops it with the
/// set, so a password verified against the old hash is never accepted after the reload, even
/// by a check that was in flight while it happened.
pub struct Credentials {
    pub agent_token: String,
    /// The agent token being rotated out: accepted like the current one until the rotation
    /// is finished (`secrets/agent.token.previous`).
    pub previous_agent_token: Option<String>,
    pub operator_token: String,
    pub ui: Arc<PasswordHash>,
    verified: Mutex<HashSet<[u8; 32]>>,
}

impl Credentials {
    pub fn new(
        agent_token: &str,
        previous_agent_token: Option<&str>,
        operator_token: &str,
        ui: PasswordHash,
    ) -> Credentials {
        Credentials {
            agent_token: agent_token.trim().to_string(),
            previous_agent_token: previous_agent_token
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
            operator_token: operator_token.trim().to_string(),
            ui: Arc::new(ui),
            verified: Mutex::new(HashSet::new()),
        }
    }
}

pub struct Auth {
    creds: arc_swap::ArcSwap<Credentials>,
    /// When a request last came with the previous agent token.
    previous_used: Mutex<Option<Instant>>,
    failures: Mutex<FailureTable>,
    trusted_proxies: Vec<Cidr>,
    hashing: Arc<Semaphore>,
    penalty: Arc<Semaphore>,
    hash_wait: Duration,
}

impl Auth {
    /// With the default settings: the tests' constructor.
    #[cfg(test)]
    pub fn new(agent_token: &str, operator_token: &str, ui: PasswordHash) -> Auth {
        let creds = Credentials::new(agent_token, None, operator_token, ui);
        Auth::with_settings(creds, Settings::default())
    }

    pub fn with_settings(creds: Credentials, s: Settings) -> Auth {
        Auth {
            creds: arc_swap::ArcSwap::from_pointee(creds),
            previous_used: Mutex::new(None),
            failures: Mutex::new(FailureTable::new(
                s.fail_burst,
                s.fail_refill_per_s,
                FAIL_TABLE_MAX,
            )),
            trusted_proxies: s.trusted_proxies,
            hashing: Arc::new(Semaphore::new(HASH_THREADS)),
            penalty: Arc::new(Semaphore::new(PENALTY_THREADS)),
            hash_wait: HASH_WAIT,
        }
    }

    /// Checks against `creds` from now on. Requests already past their check are not
    /// affected; passwords verified before must verify again.
    pub fn replace(&self, creds: Credentials) {
        self.creds.store(Arc::new(creds));
    }

    /// The secrets checked against now.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.creds.load_full()
    }

    /// How long ago a request last came with the previous agent token, if one did since
    /// the controller started.
    pub fn previous_token_used(&self, now: Instant) -> Option<Duration> {
        self.previous_used
            .lock()
            .unwrap()
            .map(|t| now.saturating_duration_since(t))
    }

    /// The client a request counts for: the TCP peer, or the `X-Real-IP` a trusted proxy set.
    pub fn client(&self, peer: SocketAddr, real_ip: Option<&str>) -> IpAddr {
        client_ip(peer.ip(), real_ip, &self.trusted_proxies)
    }

    /// Sorts `authorization` without the slow hash.
    fn presented(&self, c: &Credentials, authorization: &str) -> Presented {
        if let Some(token) = authorization.strip_prefix("Bearer ") {
            let token = token.trim().as_bytes();
            // All compared, always, so timing does not tell which secret was close (with no
            // rotation going on, the previous token is compared with an empty one, which
            // never matches: tokens are never empty).
            let agent = ct_eq(token, c.agent_token.as_bytes());
            let previous = c.previous_agent_token.as_deref().unwrap_or("");
            let previous = ct_eq(token, previous.as_bytes()) && !previous.is_empty();
            let operator = ct_eq(token, c.operator_token.as_bytes());
            return match (agent, previous, operator) {
                (true, _, _) => Presented::Known(Role::Agent),
                (_, true, _) => {
                    *self.previous_used.lock().unwrap() = Some(Instant::now());
                    Presented::Known(Role::Agent)
                }
                (_, _, true) => Presented::Known(Role::Operator),
                _ => Presented::Nothing,
            };
        }
        let Some(basic) = authorization.strip_prefix("Basic ") else {
            return Presented::Nothing;
        };
        let cache_key: [u8; 32] = Sha256::digest(authorization.as_bytes()).into();
        if c.verified.lock().unwrap().contains(&cache_key) {
            return Presented::Known(Role::Operator);
        }
        let text = B64
            .decode(basic.trim())
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok());
        match text.as_deref().and_then(|t| t.split_once(':')) {
            Some((user, password)) => Presented::Password {
                cache_key,
                user_ok: ct_eq(user.as_bytes(), UI_USER.as_bytes()),
                password: password.to_string(),
            },
            None => Presented::Nothing,
        }
    }

    /// The PBKDF2 check on a blocking thread, in the penalty lane when `penalised`. The permits
    /// go with the thread, so an abandoned request still counts until its hash is done.
    async fn verify_password(
        &self,
        ui: Arc<PasswordHash>,
        password: String,
        penalised: bool,
    ) -> Result<bool, Refusal> {
        let permits = async {
            let lane = match penalised {
                true => Some(self.penalty.clone().acquire_owned().await),
                false => None,
            };
            (lane, self.hashing.clone().acquire_owned().await)
        };
        let Ok((lane, thread)) = tokio::time::timeout(self.hash_wait, permits).await else {
            return Err(Refusal::Busy);
        };
        tokio::task::spawn_blocking(move || {
            let ok = ui.verify(&password);
            drop((lane, thread));
            ok
        })
        .await
        .map_err(|_| Refusal::Busy)
    }

    /// Checks a request's credentials, from `client`, for a route that needs `need`.
    pub async fn check(
        &self,
        authorization: Option<&str>,
        client: IpAddr,
        need: Role,
    ) -> Result<(), Refusal> {
        let key = failure_key(client);
        let c = self.creds.load_full();
        let role = match authorization.map(|a| self.presented(&c, a)) {
            Some(Presented::Known(role)) => Some(role),
            Some(Presented::Password {
                cache_key,
                user_ok,
                password,
            }) => {
                let penalised = self
                    .failures
                    .lock()
                    .unwrap()
                    .over_budget(key, Instant::now());
                // Checked whether or not the user name matched: timing does not tell.
                let password_ok = self
                    .verify_password(c.ui.clone(), password, penalised)
                    .await?;
                (user_ok && password_ok).then(|| {
                    let mut v = c.verified.lock().unwrap();
                    if v.len() >= CACHE_MAX {
                        v.clear();
                    }
                    v.insert(cache_key);
                    Role::Operator
                })
            }
            Some(Presented::Nothing) | None => None,
        };
        if role == Some(need) {
            return Ok(());
        }
        let over = self.failures.lock().unwrap().fail(key, Instant::now());
        Err(if over {
            Refusal::RateLimited
        } else {
            Refusal::Unauthorized
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cheap hash for most tests (the real one takes 100,000 iterations).
    fn auth_with(iterations: u32) -> Auth {
        let h = crate::secrets::hash_password_with("pw", iterations);
        Auth::new(
            "agent-secret",
            "operator-secret",
            PasswordHash::parse(&h).unwrap(),
        )
    }

    fn basic(user: &str, pw: &str) -> String {
        format!("Basic {}", B64.encode(format!("{user}:{pw}")))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn each_secret_opens_only_its_own_routes() {
        let a = auth_with(1000);
        let ip = ip("127.0.0.1");
        let cases: &[(&str, Role, Result<(), Refusal>)] = &[
            ("Bearer agent-secret", Role::Agent, Ok(())),
            (
                "Bearer agent-secret",
                Role::Operator,
                Err(Refusal::Unauthorized),
            ),
            ("Bearer operator-secret", Role::Operator, Ok(())),
            (
                "Bearer operator-secret",
                Role::Agent,
                Err(Refusal::Unauthorized),
            ),
            (&basic("fleet", "pw"), Role::Operator, Ok(())),
            // Cached the second time, still right.
            (&basic("fleet", "pw"), Role::Operator, Ok(())),
            (
                &basic("fleet", "pw"),
                Role::Agent,
                Err(Refusal::Unauthorized),
            ),
            (
                &basic("admin", "pw"),
                Role::Operator,
                Err(Refusal::Unauthorized),
            ),
            (
                &basic("fleet", "nope"),
                Role::Operator,
                Err(Refusal::Unauthorized),
            ),
            ("Basic %%%", Role::Operator, Err(Refusal::Unauthorized)),
            ("Digest x", Role::Operator, Err(Refusal::Unauthorized)),
        ];
        for (authz, need, want) in cases {
            assert_eq!(
                a.check(Some(authz), ip, *need).await,
                *want,
                "{authz} for {need:?}"
            );
        }
        assert_eq!(
            a.check(None, ip, Role::Operator).await,
            Err(Refusal::Unauthorized)
        );
    }

    #[tokio::test]
    async fn during_a_rotation_both_agent_tokens_open_agent_routes_and_the_old_one_is_noticed() {
        let a = auth_with(1000);
        let ip = ip("127.0.0.1");
        let ui = || PasswordHash::parse(&crate::secrets::hash_password_with("pw", 1000)).unwrap();
        a.replace(Credentials::new(
            "agent-new",
            Some("agent-secret"),
            "operator-secret",
            ui(),
        ));
        assert_eq!(a.previous_token_used(Instant::now()), None);
        assert_eq!(
            a.check(Some("Bearer agent-new"), ip, Role::Agent).await,
            Ok(())
        );
        assert_eq!(a.previous_token_used(Instant::now()), None);
        assert_eq!(
            a.check(Some("Bearer agent-secret"), ip, Role::Agent).await,
            Ok(())
        );
        assert!(a
            .previous_token_used(Instant::now())
            .is_some_and(|d| d < Duration::from_secs(1)));
        assert_eq!(
            a.check(Some("Bearer agent-secret"), ip, Role::Operator)
                .await,
            Err(Refusal::Unauthorized),
            "the previous agent token has an agent's rights only"
        );
        // Finished: the previous token is refused.
        a.replace(Credentials::new("agent-new", None, "operator-secret", ui()));
        assert_eq!(
            a.check(Some("Bearer agent-secret"), ip, Role::Agent).await,
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            a.check(Some("Bearer "), ip, Role::Agent).await,
            Err(Refusal::Unauthorized),
            "no previous token is not an empty one"
        );
    }

    #[tokio::test]
    async fn a_new_password_replaces_the_old_one_even_when_it_was_cached() {
        let a = auth_with(1000);
        let ip = ip("127.0.0.1");
        assert_eq!(
            a.check(Some(&basic("fleet", "pw")), ip, Role::Operator)
                .await,
            Ok(())
        );
        let new = crate::secrets::hash_password_with("pw2", 1000);
        a.replace(Credentials::new(
            "agent-secret",
            None,
            "operator-secret",
            PasswordHash::parse(&new).unwrap(),
        ));
        assert_eq!(
            a.check(Some(&basic("fleet", "pw")), ip, Role::Operator)
                .await,
            Err(Refusal::Unauthorized)
        );
        assert_eq!(
            a.check(Some(&basic("fleet", "pw2")), ip, Role::Operator)
                .await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn valid_credentials_pass_whatever_failed_before_from_the_same_address() {
        let a = auth_with(1000);
        let bad = ip("10.0.0.1");
        let mut answers = vec![];
        for i in 0..50 {
            let guess = basic("fleet", &format!("guess{i}"));
            answers.push(a.check(Some(&guess), bad, Role::Operator).await);
            answers.push(a.check(Some("Bearer wrong"), bad, Role::Agent).await);
        }
        // The burst is 10 failures, then 429s.
        assert!(answers[..10]
            .iter()
            .all(|r| *r == Err(Refusal::Unauthorized)));
        assert!(answers[10..]
            .iter()
            .all(|r| *r == Err(Refusal::RateLimited)));
        // The right ones, at once: the password was never verified before (not cached).
        assert_eq!(
            a.check(Some(&basic("fleet", "pw")), bad, Role::Operator)
                .await,
            Ok(())
        );
        assert_eq!(
            a.check(Some("Bearer operator-secret"), bad, Role::Operator)
                .await,
            Ok(())
        );
        assert_eq!(
            a.check(Some("Bearer agent-secret"), bad, Role::Agent).await,
            Ok(())
        );
        // Still over budget for more failures; other addresses are not.
        assert_eq!(
            a.check(Some("Bearer wrong"), bad, Role::Agent).await,
            Err(Refusal::RateLimited)
        );
        assert_eq!(
            a.check(Some("Bearer wrong"), ip("10.0.0.2"), Role::Agent)
                .await,
            Err(Refusal::Unauthorized)
        );
    }

    #[tokio::test]
    async fn one_ipv6_host_gets_one_allowance_for_its_whole_64() {
        let a = auth_with(1000);
        for i in 0..FAIL_BURST as u32 {
            let from = ip(&format!("2001:db8:0:1::{i:x}"));
            assert_eq!(
                a.check(Some("Bearer wrong"), from, Role::Agent).await,
                Err(Refusal::Unauthorized)
            );
        }
        let same_64 = ip("2001:db8:0:1:ffff::1");
        assert_eq!(
            a.check(Some("Bearer wrong"), same_64, Role::Agent).await,
            Err(Refusal::RateLimited)
        );
        assert_eq!(
            a.check(Some("Bearer wrong"), ip("2001:db8:0:2::1"), Role::Agent)
                .await,
            Err(Refusal::Unauthorized)
        );
    }

    #[tokio::test]
    async fn over_budget_addresses_hash_in_their_own_lane() {
        let mut a = auth_with(1000);
        a.hash_wait = Duration::from_millis(200);
        let bad = ip("10.0.0.1");
        for _ in 0..FAIL_BURST as u32 {
            let _ = a.check(Some("Bearer wrong"), bad, Role::Agent).await;
        }
        // The penalty lane busy (as with a flood of wrong passwords from over-budget keys):
        // an over-budget key's new password waits and gets 503; a fresh key is not slowed.
        let held = a.penalty.clone().acquire_owned().await.unwrap();
        assert_eq!(
            a.check(Some(&basic("fleet", "pw")), bad, Role::Operator)
                .await,
            Err(Refusal::Busy)
        );
        assert_eq!(
            a.check(Some(&basic("fleet", "pw")), ip("10.0.0.2"), Role::Operator)
                .await,
            Ok(())
        );
        drop(held);
        // Cached now: no lane at all. And a password not cached yet gets its turn.
        let _busy = a.penalty.clone().acquire_owned().await.unwrap();
        assert_eq!(
            a.check(Some(&basic("fleet", "pw")), bad, Role::Operator)
                .await,
            Ok(())
        );
        drop(_busy);
        assert_eq!(
            a.check(Some(&basic("fleet", "guess")), bad, Role::Operator)
                .await,
            Err(Refusal::RateLimited)
        );
        // All hashing threads busy: even a fresh key waits.
        let _all = a
            .hashing
            .clone()
            .acquire_many_owned(HASH_THREADS as u32)
            .await
            .unwrap();
        assert_eq!(
            a.check(Some(&basic("fleet", "x")), ip("10.0.0.3"), Role::Operator)
                .await,
            Err(Refusal::Busy)
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn password_checks_do_not_stall_the_runtime() {
        // Slow enough that a check on the runtime's only thread would stop the ticker below.
        let a = Arc::new(auth_with(100_000));
        let t = Instant::now();
        assert!(!a.credentials().ui.verify("x"));
        let one = t.elapsed();
        let flood: Vec<_> = (0..6)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move {
                    let guess = basic("fleet", &format!("g{i}"));
                    a.check(Some(&guess), ip("10.0.0.1"), Role::Operator).await
                })
            })
            .collect();
        let mut max_gap = Duration::ZERO;
        let mut last = Instant::now();
        while !flood.iter().all(|h| h.is_finished()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            max_gap = max_gap.max(last.elapsed());
            last = Instant::now();
        }
        for h in flood {
            assert_eq!(h.await.unwrap(), Err(Refusal::Unauthorized));
        }
        assert!(
            max_gap < one / 2,
            "the runtime stalled for {max_gap:?}; one check takes {one:?}"
        );
    }
}
