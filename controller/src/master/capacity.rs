//! How many workers the fleet expects, how many masters (shards) that needs, and the warning
//! when the masters would carry more than their capacity. All pure: `fleet scale`, the daemon
//! and `fleet serve`'s start call them with what they know.
//!
//! One Locust master is one single-threaded process; past a few thousand workers it saturates
//! its core and everything else waits (docs/locust.md, "How many workers one master holds").
//! `master.capacity` is how many workers one master should carry; `master.shards` how many
//! masters run (`"auto"`: enough for the expected workers, chosen when `fleet serve` starts
//! and grown while it runs, [`grow_to`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::{Ec2Config, LocalConfig};

/// Workers per master by default: one master on one core held 3000 simulated workers at
/// 59–72 % of the core and 4000 at 85–88 % (docs/benchmarks.md). 2500 leaves room for bigger
/// stats reports (more endpoints lower the knee), the web API and dispatch.
pub const DEFAULT_CAPACITY: u64 = 2500;

/// Most shards `"auto"` or a number may ask for: each one is a process and two ports.
pub const MAX_SHARDS: u32 = 64;

/// `master.shards`: a fixed number of masters, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    Auto,
    Fixed(u32),
}

impl Default for Shards {
    fn default() -> Shards {
        Shards::Fixed(1)
    }
}

impl fmt::Display for Shards {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shards::Auto => f.write_str("auto"),
            Shards::Fixed(k) => write!(f, "{k}"),
        }
    }
}

impl Serialize for Shards {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Shards::Auto => s.serialize_str("auto"),
            Shards::Fixed(k) => s.serialize_u32(*k),
        }
    }
}

impl<'de> Deserialize<'de> for Shards {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Shards, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        let bad = || {
            serde::de::Error::custom(format!(
                "master.shards must be \"auto\" or a number from 1 to {MAX_SHARDS}"
            ))
        };
        match Raw::deserialize(d).map_err(|_| bad())? {
            Raw::S(s) if s == "auto" => Ok(Shards::Auto),
            Raw::N(n) if (1..=i64::from(MAX_SHARDS)).contains(&n) => Ok(Shards::Fixed(n as u32)),
            _ => Err(bad()),
        }
    }
}

/// How many masters run for `expected` workers: the fixed number, or for `"auto"` enough
/// masters of `capacity` workers each (at least one, at most [`MAX_SHARDS`]).
pub fn shard_count(setting: Shards, expected: u64, capacity: u64) -> u32 {
    match setting {
        Shards::Fixed(k) => k.max(1),
        Shards::Auto => needed(expected, capacity),
    }
}

/// How many masters should run now that `expected` workers are expected and `running` run:
/// for `"auto"`, enough of `capacity` workers each, at most `max` (the most whose ports fit)
/// and never fewer than run (a master with workers under a running test is not stopped; a
/// restart picks the count again from the saved expected workers). A fixed number never
/// changes while `fleet serve` runs.
pub fn grow_to(setting: Shards, running: u32, expected: u64, capacity: u64, max: u32) -> u32 {
    match setting {
        Shards::Fixed(_) => running,
        Shards::Auto => needed(expected, capacity).min(max).max(running),
    }
}

/// Masters of `capacity` workers needed for `expected` workers.
fn needed(expected: u64, capacity: u64) -> u32 {
    let k = expected.div_ceil(capacity.max(1)).max(1);
    u32::try_from(k).unwrap_or(u32::MAX).min(MAX_SHARDS)
}

/// The workers the fleet expects: the nodes the backend lists (or `fleet scale` asks for)
/// times the workers per node, or what the agents report, whichever is more.
pub fn expected_workers(nodes: usize, per_node: Option<u32>, reported: u64) -> u64 {
    let planned = per_node.map_or(0, |w| nodes as u64 * u64::from(w));
    planned.max(reported)
}

/// Workers one node of `backend` runs, as far as the configuration says: `local.workers`
/// (0: one per CPU of this machine), or for EC2 and Auto Scaling `workers` in
/// `ec2.agent_settings`, else the agent's default of one per vCPU of the first instance type.
pub fn workers_per_node(local: &LocalConfig, ec2: &Ec2Config, backend: &str) -> Option<u32> {
    match backend {
        "local" => Some(match local.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            w => w,
        }),
        "ec2" | "asg" => {
            let set = ec2
                .agent_settings
                .get("workers")
                .and_then(|v| v.as_integer())
                .filter(|w| *w > 0);
            match set {
                Some(w) => u32::try_from(w).ok(),
                None => vcpus(ec2.instance_types.first()?),
            }
        }
        _ => None,
    }
}

/// The vCPUs of an EC2 instance type, read from its size (`c6i.large` 2, `xlarge` 4,
/// `Nxlarge` 4·N; `nano` to `medium` 2, as the burstable families have). `None` when the size
/// says nothing (`metal`, a typo).
pub fn vcpus(instance_type: &str) -> Option<u32> {
    let size = instance_type.rsplit_once('.')?.1;
    match size {
        "nano" | "micro" | "small" | "medium" | "large" => Some(2),
        "xlarge" => Some(4),
        _ => {
            let n: u32 = size.strip_suffix("xlarge")?.parse().ok()?;
            n.checked_mul(4)
        }
    }
}

/// Expected workers over what the running masters can carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overload {
    pub expected: u64,
    pub shards: u32,
    pub capacity: u64,
    /// Masters that would carry `expected`.
    pub needed: u32,
    pub auto: bool,
    /// The most masters these settings can run (ports below 65536, [`MAX_SHARDS`]).
    pub max: u32,
}

impl fmt::Display for Overload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Overload {
            expected,
            shards,
            capacity,
            needed,
            auto,
            max,
        } = self;
        if *shards == 1 {
            write!(
                f,
                "{expected} workers expected on one Locust master, over its capacity of \
                 {capacity} (master.capacity): "
            )?;
        } else {
            write!(
                f,
                "{expected} workers expected on {shards} Locust masters, over their capacity of \
                 {shards} × {capacity} (master.capacity): "
            )?;
        }
        if expected.div_ceil((*capacity).max(1)) > u64::from(*max) {
            write!(
                f,
                "that needs more than the {max} Locust masters fleet can run with these \
                 settings (at most {MAX_SHARDS}, each shard's ports below 65536): raise \
                 master.capacity or lower master.port and the web_url's port in fleet.toml"
            )
        } else if *auto {
            write!(
                f,
                "master.shards = \"auto\" starts {needed} as the workers are expected"
            )
        } else {
            write!(
                f,
                "set master.shards = {needed} (or \"auto\") in fleet.toml and restart `fleet serve`"
            )
        }
    }
}

/// The warning for `expected` workers on `shards` masters of `capacity` each, if over; `max`
/// is the most masters the settings can run.
pub fn overload(
    expected: u64,
    shards: u32,
    capacity: u64,
    setting: Shards,
    max: u32,
) -> Option<Overload> {
    let shards = shards.max(1);
    (expected > u64::from(shards) * capacity).then(|| Overload {
        expected,
        shards,
        capacity,
        needed: needed(expected, capacity).max(shards + 1).min(max.max(1)),
        auto: setting == Shards::Auto,
        max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        shards: Shards,
    }

    fn parse(v: &str) -> Result<Shards, String> {
        toml::from_str::<T>(&format!("shards = {v}"))
            .map(|t| t.shards)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn shards_is_auto_or_a_number_from_one() {
        assert_eq!(parse("\"auto\""), Ok(Shards::Auto));
        assert_eq!(parse("3"), Ok(Shards::Fixed(3)));
        for bad in ["0", "-1", "65", "\"three\"", "true"] {
            let e = parse(bad).unwrap_err();
            assert!(
                e.contains("master.shards must be \"auto\" or a number"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn auto_runs_enough_masters_for_the_expected_workers() {
        assert_eq!(shard_count(Shards::Auto, 0, 2500), 1);
        assert_eq!(shard_count(Shards::Auto, 2500, 2500), 1);
        assert_eq!(shard_count(Shards::Auto, 2501, 2500), 2);
        assert_eq!(shard_count(Shards::Auto, 4000, 2500), 2);
        // `fleet scale --nodes 1000` on 8-vCPU instances.
        assert_eq!(shard_count(Shards::Auto, 8000, 2500), 4);
        assert_eq!(shard_count(Shards::Auto, u64::MAX, 1), MAX_SHARDS);
        assert_eq!(shard_count(Shards::Fixed(3), 100_000, 2500), 3);
    }

    #[test]
    fn auto_grows_to_the_masters_the_expected_workers_need_and_never_shrinks() {
        // `fleet serve` on a new fleet, then `fleet scale --nodes 1000` of 4 workers each.
        assert_eq!(grow_to(Shards::Auto, 1, 4000, 2500, MAX_SHARDS), 2);
        assert_eq!(grow_to(Shards::Auto, 1, 2500, 2500, MAX_SHARDS), 1);
        assert_eq!(grow_to(Shards::Auto, 2, 8000, 2500, MAX_SHARDS), 4);
        // Fewer expected than run (scaled down, or a node listing still empty): keep them.
        assert_eq!(grow_to(Shards::Auto, 3, 0, 2500, MAX_SHARDS), 3);
        assert_eq!(grow_to(Shards::Auto, 3, 2600, 2500, MAX_SHARDS), 3);
        // Capped by the ports that fit, but what runs stays.
        assert_eq!(grow_to(Shards::Auto, 1, 100_000, 2500, 5), 5);
        assert_eq!(grow_to(Shards::Auto, 6, 100_000, 2500, 5), 6);
        // A fixed number is what runs, whatever is expected.
        assert_eq!(grow_to(Shards::Fixed(1), 1, 100_000, 2500, MAX_SHARDS), 1);
        assert_eq!(grow_to(Shards::Fixed(3), 3, 0, 2500, MAX_SHARDS), 3);
        // The small capacity of the end-to-end test: 3 nodes of one worker over 2 per master.
        assert_eq!(grow_to(Shards::Auto, 1, 3, 2, MAX_SHARDS), 2);
    }

    #[test]
    fn expected_workers_are_the_plan_or_the_reports_whichever_is_more() {
        assert_eq!(expected_workers(1000, Some(4), 0), 4000);
        assert_eq!(expected_workers(10, Some(4), 90), 90);
        assert_eq!(expected_workers(1000, None, 12), 12);
    }

    #[test]
    fn vcpus_come_from_the_instance_size() {
        assert_eq!(vcpus("c6i.large"), Some(2));
        assert_eq!(vcpus("c6i.xlarge"), Some(4));
        assert_eq!(vcpus("c6i.2xlarge"), Some(8));
        assert_eq!(vcpus("m5.24xlarge"), Some(96));
        assert_eq!(vcpus("t3.micro"), Some(2));
        assert_eq!(vcpus("c6i.metal"), None);
        assert_eq!(vcpus("large"), None);
    }

    #[test]
    fn workers_per_node_follow_the_backend_settings() {
        let mut local: LocalConfig = toml::from_str("").unwrap();
        let mut ec2 = Ec2Config::default();
        local.workers = 3;
        assert_eq!(workers_per_node(&local, &ec2, "local"), Some(3));
        assert_eq!(
            workers_per_node(&local, &ec2, "ec2"),
            None,
            "no instance type"
        );
        ec2.instance_types = vec!["c6i.xlarge".into()];
        assert_eq!(workers_per_node(&local, &ec2, "asg"), Some(4));
        ec2.agent_settings.insert("workers".into(), 2.into());
        assert_eq!(workers_per_node(&local, &ec2, "ec2"), Some(2));
        assert_eq!(workers_per_node(&local, &ec2, "other"), None);
    }

    #[test]
    fn one_master_over_its_capacity_is_warned_with_the_setting_to_change() {
        assert_eq!(overload(2500, 1, 2500, Shards::Fixed(1), MAX_SHARDS), None);
        let w = overload(4000, 1, 2500, Shards::Fixed(1), MAX_SHARDS).unwrap();
        assert_eq!(w.needed, 2);
        let line = w.to_string();
        assert!(
            line.starts_with("4000 workers expected on one Locust master"),
            "{line}"
        );
        assert!(line.contains("set master.shards = 2"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn shards_carry_their_number_times_the_capacity() {
        assert_eq!(overload(7500, 3, 2500, Shards::Fixed(3), MAX_SHARDS), None);
        let w = overload(8000, 3, 2500, Shards::Fixed(3), MAX_SHARDS).unwrap();
        assert_eq!(w.needed, 4);
        assert!(w.to_string().contains("on 3 Locust masters"), "{w}");
        // "auto" grows while `fleet serve` runs: the warning says what it is about to do.
        let w = overload(8000, 2, 2500, Shards::Auto, MAX_SHARDS).unwrap();
        assert!(
            w.to_string()
                .contains("\"auto\" starts 4 as the workers are expected"),
            "{w}"
        );
    }

    #[test]
    fn past_the_masters_the_settings_can_run_the_warning_says_to_raise_the_capacity() {
        // 64 masters of 2500 are full: neither "auto" nor a number can add one.
        for setting in [Shards::Auto, Shards::Fixed(64)] {
            let w = overload(200_000, 64, 2500, setting, MAX_SHARDS).unwrap();
            let line = w.to_string();
            assert!(
                line.contains("more than the 64 Locust masters fleet can run")
                    && line.contains("raise master.capacity")
                    && !line.contains("starts")
                    && !line.contains("set master.shards"),
                "{line}"
            );
        }
        // Ports near 65535 leave room for 3: 4 needed is past them, 3 is not.
        let w = overload(10_000, 1, 2500, Shards::Auto, 3).unwrap();
        assert!(
            w.to_string().contains("more than the 3 Locust masters"),
            "{w}"
        );
        let w = overload(7_500, 1, 2500, Shards::Auto, 3).unwrap();
        assert!(w.to_string().contains("\"auto\" starts 3"), "{w}");
    }
}
