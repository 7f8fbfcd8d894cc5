//! Picking up a new agent token while the agent runs (docs/security.md, "Rotation").
//!
//! The token is read from `token_file` at start. It is read again on SIGHUP, and when the
//! controller refuses a heartbeat with 401 (the rotation was finished before this node was
//! told): if the file now holds another token, every request from then on carries it. A token
//! given inline (`token`, as in EC2 user-data) cannot change: such a node must be replaced.

use fleet_common::client::Client;

use crate::config::Config;

/// What reading the token again found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reread {
    /// A new token, sent from now on.
    Changed,
    /// The file holds the token already in use.
    Unchanged,
    /// The token is inline in the config: nothing to read.
    Inline,
    /// The file could not be read (or holds no usable token): the old token stays.
    Failed(String),
}

/// The `Authorization` value for `token`.
fn bearer(token: &str) -> String {
    format!("Bearer {}", token.trim())
}

/// The decision: what `read` (the token file's contents, or why it could not be read) means
/// for a client that `sends` a given `Authorization` value now.
pub fn decide(inline: bool, read: Result<String, String>, sends: impl Fn(&str) -> bool) -> Reread {
    if inline {
        return Reread::Inline;
    }
    match read {
        Err(e) => Reread::Failed(e),
        Ok(t) if t.trim().is_empty() => Reread::Failed("the token file is empty".into()),
        Ok(t) if sends(&bearer(&t)) => Reread::Unchanged,
        Ok(_) => Reread::Changed,
    }
}

/// Reads the token file again and, when it holds a new token, makes `client` send it.
pub fn reread(cfg: &Config, client: &Client) -> Reread {
    let inline = cfg.token.is_some();
    let read = if inline {
        Ok(String::new())
    } else {
        cfg.token()
    };
    let r = decide(inline, read.clone(), |a| client.sends_auth(a));
    if r == Reread::Changed {
        let token = read.unwrap_or_default();
        if let Err(e) = client.set_auth(&bearer(&token)) {
            return Reread::Failed(format!("the token file holds an unusable token: {e}"));
        }
    }
    r
}

/// The log line for `r`, read because of `why`.
pub fn describe(why: &str, r: &Reread, cfg: &Config) -> String {
    let file = cfg
        .token_file
        .as_ref()
        .map(|f| f.display().to_string())
        .unwrap_or_default();
    match r {
        Reread::Changed => format!("{why}: read a new agent token from {file}; using it now"),
        Reread::Unchanged => format!(
            "{why}: {file} holds the token in use; put the fleet's current agent token there \
             (secrets/agent.token on the controller)"
        ),
        Reread::Inline => format!(
            "{why}: the agent token is inline in the config and cannot change; give this node \
             the fleet's current token (new user-data: replace the node)"
        ),
        Reread::Failed(e) => format!("{why}: keeping the current agent token: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_in_the_file_is_taken_and_the_same_one_is_not() {
        let sends_old = |a: &str| a == "Bearer old";
        assert_eq!(
            decide(false, Ok("new\n".into()), sends_old),
            Reread::Changed
        );
        assert_eq!(
            decide(false, Ok(" old \n".into()), sends_old),
            Reread::Unchanged
        );
        assert_eq!(
            decide(false, Ok("\n".into()), sends_old),
            Reread::Failed("the token file is empty".into())
        );
        assert_eq!(
            decide(false, Err("cannot read".into()), sends_old),
            Reread::Failed("cannot read".into())
        );
        assert_eq!(decide(true, Ok("new".into()), sends_old), Reread::Inline);
    }
}
