//! Where each node stands with the current publication: one pure classification shared by
//! `GET /api/nodes`, the dashboard's summary and `fleet status` (docs/protocol.md, "Node
//! standing").

use fleet_common::wire::{Heartbeat, SpecVersion, Standing, UpdateState};

/// A node whose last heartbeat is older than this is silent (agents send one every 5 s by
/// default, and at once on every change).
pub const SILENT_AFTER_S: f64 = 15.0;

/// The publication nodes are measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current<'a> {
    pub sequence: u64,
    pub sha256: &'a str,
}

impl<'a> From<&'a SpecVersion> for Current<'a> {
    fn from(v: &'a SpecVersion) -> Current<'a> {
        Current {
            sequence: v.sequence,
            sha256: &v.sha256,
        }
    }
}

/// Classifies one node. In order:
/// - silent: its last heartbeat is `silent_after_s` old or older, whatever it said;
/// - current: it runs the current bundle, or nothing is published;
/// - refused: its `update` refused the current or a newer sequence, or the current bundle is the
///   one it rejected after its workers crash-looped;
/// - retrying: its `update` is retrying the current or a newer sequence;
/// - lagging: anything else (an `update` about an older sequence is history: the agent has not
///   taken up the current one yet).
pub fn classify(
    current: Option<Current<'_>>,
    hb: &Heartbeat,
    age_s: f64,
    silent_after_s: f64,
) -> Standing {
    if age_s >= silent_after_s {
        return Standing::Silent;
    }
    let Some(cur) = current else {
        return Standing::Current;
    };
    if hb.running.as_ref().is_some_and(|r| r.sha256 == cur.sha256) {
        return Standing::Current;
    }
    if hb.rejected.as_deref() == Some(cur.sha256) {
        return Standing::Refused;
    }
    match &hb.update {
        Some(u) if u.sequence >= cur.sequence || u.sha256 == cur.sha256 => match u.state {
            UpdateState::Refused => Standing::Refused,
            UpdateState::Retrying => Standing::Retrying,
        },
        _ => Standing::Lagging,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::wire::{NodeStatus, Running, Update};

    const CUR: Current<'static> = Current {
        sequence: 7,
        sha256: "cafe",
    };

    fn hb(running: Option<&str>, update: Option<(u64, &str, UpdateState)>) -> Heartbeat {
        Heartbeat {
            node_id: "n".into(),
            backend: "local".into(),
            agent_version: "0.1.0".into(),
            running: running.map(|s| Running {
                sha256: s.into(),
                sequence: 6,
                master_epoch: 1,
                since_ms: 0,
            }),
            last_good: None,
            workers: vec![],
            status: NodeStatus::Running,
            last_error: None,
            rejected: None,
            uptime_s: 1,
            update: update.map(|(sequence, sha, state)| Update {
                sequence,
                sha256: sha.into(),
                state,
                attempts: 3,
                error: "connection reset".into(),
            }),
            seen_sequence: None,
        }
    }

    fn at(h: &Heartbeat, age: f64) -> Standing {
        classify(Some(CUR), h, age, SILENT_AFTER_S)
    }

    #[test]
    fn on_the_current_bundle_is_current() {
        assert_eq!(at(&hb(Some("cafe"), None), 1.0), Standing::Current);
        // A stale update next to the current bundle changes nothing.
        let h = hb(Some("cafe"), Some((5, "old", UpdateState::Refused)));
        assert_eq!(at(&h, 1.0), Standing::Current);
    }

    #[test]
    fn nothing_published_means_nothing_to_lag_behind() {
        assert_eq!(
            classify(None, &hb(None, None), 1.0, SILENT_AFTER_S),
            Standing::Current
        );
        assert_eq!(
            classify(None, &hb(None, None), 20.0, SILENT_AFTER_S),
            Standing::Silent
        );
    }

    #[test]
    fn another_bundle_without_trouble_is_lagging() {
        assert_eq!(at(&hb(Some("old"), None), 1.0), Standing::Lagging);
        assert_eq!(at(&hb(None, None), 1.0), Standing::Lagging);
        // Trouble with an older publication is not trouble with the current one.
        let h = hb(Some("old"), Some((6, "older", UpdateState::Retrying)));
        assert_eq!(at(&h, 1.0), Standing::Lagging);
        let h = hb(Some("old"), Some((6, "older", UpdateState::Refused)));
        assert_eq!(at(&h, 1.0), Standing::Lagging);
    }

    #[test]
    fn retrying_the_current_or_a_newer_sequence_is_retrying() {
        let h = hb(Some("old"), Some((7, "cafe", UpdateState::Retrying)));
        assert_eq!(at(&h, 1.0), Standing::Retrying);
        // Newer than the controller's current (it republished lower after losing its state).
        let h = hb(Some("old"), Some((9, "beef", UpdateState::Retrying)));
        assert_eq!(at(&h, 1.0), Standing::Retrying);
        // The same bundle under an older sequence number.
        let h = hb(None, Some((3, "cafe", UpdateState::Retrying)));
        assert_eq!(at(&h, 1.0), Standing::Retrying);
    }

    #[test]
    fn refusals_of_the_current_bundle_are_refused() {
        let h = hb(Some("old"), Some((7, "cafe", UpdateState::Refused)));
        assert_eq!(at(&h, 1.0), Standing::Refused);
        // Crash-looped workers: rolled back, the current bundle rejected.
        let mut h = hb(Some("old"), None);
        h.rejected = Some("cafe".into());
        h.status = NodeStatus::RolledBack;
        assert_eq!(at(&h, 1.0), Standing::Refused);
        // A bundle rejected long ago is no refusal of the current one.
        h.rejected = Some("older".into());
        assert_eq!(at(&h, 1.0), Standing::Lagging);
    }

    #[test]
    fn silence_overrides_everything() {
        for h in [
            hb(Some("cafe"), None),
            hb(Some("old"), None),
            hb(Some("old"), Some((7, "cafe", UpdateState::Refused))),
            hb(Some("old"), Some((7, "cafe", UpdateState::Retrying))),
        ] {
            assert_eq!(at(&h, SILENT_AFTER_S), Standing::Silent);
            assert_ne!(at(&h, SILENT_AFTER_S - 0.1), Standing::Silent);
        }
    }
}
