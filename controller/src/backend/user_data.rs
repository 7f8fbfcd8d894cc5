//! The user-data a node's agent reads over IMDSv2 (docs/user-data.md): what the `ec2` and `asg`
//! backends launch with, and what `fleet user-data` prints.
//!
//! It is the agent's config layer for one fleet: where the controller is, the CA to pin, the
//! agent token, the bundle verify key. The token is a secret: anyone allowed
//! `ec2:DescribeInstanceAttribute` can read user-data (docs/security.md).

use anyhow::{bail, Result};

use crate::config::Fleet;

/// EC2's cap on user-data, before base64.
pub const MAX_USER_DATA: usize = 16 * 1024;

pub fn render(fleet: &Fleet, backend: &str) -> Result<String> {
    let ec2 = &fleet.config.ec2;
    let mut t = toml::Table::new();
    t.insert(
        "controller".into(),
        fleet.config.controller.url.clone().into(),
    );
    t.insert("ca_pem".into(), fleet.read(&fleet.ca_pem())?.into());
    t.insert(
        "token".into(),
        fleet.read(&fleet.agent_token())?.trim().into(),
    );
    t.insert(
        "verify_key".into(),
        fleet.read(&fleet.verify_key())?.trim().into(),
    );
    t.insert("fleet".into(), fleet.config.name.clone().into());
    t.insert("backend".into(), backend.into());
    if let Some(s) = ec2.max_lifetime_s {
        t.insert("max_lifetime_s".into(), (s as i64).into());
    }
    for (k, v) in &ec2.agent_settings {
        t.insert(k.clone(), v.clone());
    }
    let text = format!(
        "# fleet {:?}: agent user-data (docs/user-data.md)\n{}",
        fleet.config.name,
        toml::to_string(&t)?
    );
    if text.len() > MAX_USER_DATA {
        bail!(
            "user-data is {} bytes, over EC2's {MAX_USER_DATA}; trim ec2.agent_settings",
            text.len()
        );
    }
    Ok(text)
}
