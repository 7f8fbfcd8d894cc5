//! The checks a heartbeat passes before the controller stores it (docs/protocol.md, "Heartbeat
//! validation"): every sha256 is hex, every string and list is bounded, no string holds a control
//! character. They bound what one node can make the controller hold and print.

use fleet_common::bundle::is_sha256_hex;
use fleet_common::wire::Heartbeat;

pub use fleet_common::wire::limits::{
    MAX_ERROR, MAX_EXIT, MAX_HEARTBEAT_BYTES, MAX_ID, MAX_SHORT, MAX_WORKERS,
};

/// Checks every field of a heartbeat; the error is one line naming the field.
pub fn validate(hb: &Heartbeat) -> Result<(), String> {
    let id = &hb.node_id;
    if id.is_empty() || id.len() > MAX_ID {
        return Err(format!("node_id must be 1 to {MAX_ID} bytes"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-_:@".contains(&b))
    {
        return Err("node_id may hold only ASCII letters, digits and . - _ : @".into());
    }
    text("backend", &hb.backend, MAX_SHORT)?;
    text("agent_version", &hb.agent_version, MAX_SHORT)?;
    if let Some(r) = &hb.running {
        sha("running.sha256", &r.sha256)?;
    }
    if let Some(s) = &hb.last_good {
        sha("last_good", s)?;
    }
    if let Some(s) = &hb.rejected {
        sha("rejected", s)?;
    }
    if let Some(e) = &hb.last_error {
        text("last_error", e, MAX_ERROR)?;
    }
    if let Some(u) = &hb.update {
        sha("update.sha256", &u.sha256)?;
        text("update.error", &u.error, MAX_ERROR)?;
    }
    if hb.workers.len() > MAX_WORKERS {
        return Err(format!("more than {MAX_WORKERS} workers"));
    }
    for w in &hb.workers {
        if let Some(e) = &w.last_exit {
            text("workers[].last_exit", e, MAX_EXIT)?;
        }
    }
    Ok(())
}

fn sha(field: &str, s: &str) -> Result<(), String> {
    if is_sha256_hex(s) {
        Ok(())
    } else {
        Err(format!("{field} is not 64 lowercase hex digits"))
    }
}

fn text(field: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{field} is over {max} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{field} holds a control character"));
    }
    Ok(())
}

/// Test heartbeats shared by the node table's tests.
#[cfg(test)]
pub(crate) mod samples {
    use super::*;
    use fleet_common::wire::{NodeStatus, Running, Update, UpdateState, WorkerReport, WorkerState};

    pub const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    pub const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    pub fn hb(id: &str, running: Option<&str>) -> Heartbeat {
        Heartbeat {
            node_id: id.into(),
            backend: "local".into(),
            agent_version: "0.1.0".into(),
            running: running.map(|s| Running {
                sha256: s.into(),
                sequence: 1,
                master_epoch: 1,
                since_ms: 0,
            }),
            last_good: None,
            workers: vec![WorkerReport {
                index: 0,
                pid: Some(1),
                state: WorkerState::Running,
                restarts: 0,
                last_exit: None,
            }],
            status: NodeStatus::Running,
            last_error: None,
            rejected: None,
            uptime_s: 1,
            update: None,
            seen_sequence: None,
        }
    }

    /// The largest heartbeat `validate` accepts.
    pub fn biggest() -> Heartbeat {
        let mut h = hb(&"n".repeat(MAX_ID), Some(A));
        h.backend = "b".repeat(MAX_SHORT);
        h.agent_version = "v".repeat(MAX_SHORT);
        h.last_good = Some(A.into());
        h.rejected = Some(B.into());
        h.last_error = Some("e".repeat(MAX_ERROR));
        h.update = Some(Update {
            sequence: u64::MAX,
            sha256: B.into(),
            state: UpdateState::Retrying,
            attempts: u32::MAX,
            error: "é".repeat(MAX_ERROR / 2),
        });
        h.workers = (0..MAX_WORKERS as u32)
            .map(|i| WorkerReport {
                index: i,
                pid: Some(u32::MAX),
                state: WorkerState::Backoff,
                restarts: u32::MAX,
                last_exit: Some("x".repeat(MAX_EXIT)),
            })
            .collect();
        h
    }
}

#[cfg(test)]
mod tests {
    use super::samples::*;
    use super::*;
    use fleet_common::wire::{Update, UpdateState};

    #[test]
    fn validation_refuses_each_bad_field_with_one_line() {
        assert_eq!(validate(&hb("local-0001", Some(A))), Ok(()));
        assert_eq!(validate(&biggest()), Ok(()));
        type Breaker = Box<dyn Fn(&mut Heartbeat)>;
        let bad: Vec<(&str, Breaker)> = vec![
            ("node_id", Box::new(|h| h.node_id = String::new())),
            ("node_id", Box::new(|h| h.node_id = "n".repeat(MAX_ID + 1))),
            ("node_id", Box::new(|h| h.node_id = "a/b".into())),
            ("node_id", Box::new(|h| h.node_id = "a\u{1b}[2J".into())),
            ("node_id", Box::new(|h| h.node_id = "nœud".into())),
            (
                "backend",
                Box::new(|h| h.backend = "b".repeat(MAX_SHORT + 1)),
            ),
            ("backend", Box::new(|h| h.backend = "lo\ncal".into())),
            (
                "agent_version",
                Box::new(|h| h.agent_version = "\u{7f}".into()),
            ),
            (
                "running.sha256",
                Box::new(|h| h.running.as_mut().unwrap().sha256 = "abc".into()),
            ),
            (
                "running.sha256",
                Box::new(|h| h.running.as_mut().unwrap().sha256 = A.to_uppercase()),
            ),
            // 64 bytes, but not hex: the multi-byte characters that once made `fleet status` panic.
            (
                "running.sha256",
                Box::new(|h| h.running.as_mut().unwrap().sha256 = "é".repeat(32)),
            ),
            (
                "last_good",
                Box::new(|h| h.last_good = Some("g".repeat(64))),
            ),
            ("rejected", Box::new(|h| h.rejected = Some(String::new()))),
            (
                "last_error",
                Box::new(|h| h.last_error = Some("e".repeat(MAX_ERROR + 1))),
            ),
            (
                "last_error",
                Box::new(|h| h.last_error = Some("two\nlines".into())),
            ),
            (
                "last_error",
                Box::new(|h| h.last_error = Some("bell\u{7}".into())),
            ),
            (
                "update.sha256",
                Box::new(|h| {
                    h.update = Some(Update {
                        sequence: 3,
                        sha256: "zz".into(),
                        state: UpdateState::Refused,
                        attempts: 1,
                        error: String::new(),
                    })
                }),
            ),
            (
                "update.error",
                Box::new(|h| {
                    h.update = Some(Update {
                        sequence: 3,
                        sha256: B.into(),
                        state: UpdateState::Refused,
                        attempts: 1,
                        error: "\r".into(),
                    })
                }),
            ),
            (
                "workers",
                Box::new(|h| h.workers = vec![h.workers[0].clone(); MAX_WORKERS + 1]),
            ),
            (
                "last_exit",
                Box::new(|h| h.workers[0].last_exit = Some("x".repeat(MAX_EXIT + 1))),
            ),
            (
                "last_exit",
                Box::new(|h| h.workers[0].last_exit = Some("\u{9b}31m".into())),
            ),
        ];
        for (field, f) in bad {
            let mut h = hb("n1", Some(A));
            f(&mut h);
            let e = validate(&h).expect_err(field);
            assert!(e.contains(field), "{field}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}
