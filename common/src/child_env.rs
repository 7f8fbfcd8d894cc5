//! The environment a spec's code runs with: the Locust master on the controller host and the
//! Locust workers on nodes start with a cleared environment plus the variables listed here.
//!
//! Whoever can publish a spec runs Python in those processes, so whatever the parent's
//! environment holds (AWS credentials, an agent token given as `FLEET_AGENT_TOKEN`, the
//! operator's `HOME`) must not reach it by default. The base allowlist is what Python and
//! Locust need to find programs and format text; an operator adds names a spec needs with
//! `master.env_allow` or the agent's `worker_env_allow` (docs/security.md, "The spec author's
//! reach"). `AWS_*` and `FLEET_*` never pass, whatever the list says.

use std::ffi::{OsStr, OsString};

/// Passed from the parent when set: program lookup, locale, time zone.
const BASE: &[&str] = &["PATH", "LANG", "LANGUAGE", "LC_*", "TZ"];

/// Prefixes that never pass: cloud credentials and fleet's own settings and tokens.
const DENIED: &[&str] = &["AWS_", "FLEET_"];

/// Whether `name` matches `pattern`: the same name, or `PREFIX*` and a name starting with it.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

fn denied(name: &str) -> bool {
    DENIED.iter().any(|d| name.starts_with(d))
}

/// The parent's variables a child may see: the base allowlist and `extra`, never a denied
/// prefix, nothing that is not UTF-8 in its name.
pub fn inherited(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
    extra: &[String],
) -> Vec<(OsString, OsString)> {
    vars.into_iter()
        .filter(|(k, _)| {
            k.to_str().is_some_and(|k| {
                !denied(k)
                    && BASE
                        .iter()
                        .copied()
                        .chain(extra.iter().map(String::as_str))
                        .any(|p| matches(p, k))
            })
        })
        .collect()
}

/// Checks an operator's extra allowlist: names or `PREFIX*`, none that could only ever name a
/// denied variable, no bare `*`. `setting` names the setting in the error.
pub fn check_allow(setting: &str, allow: &[String]) -> Result<(), String> {
    for p in allow {
        let name = p.strip_suffix('*').unwrap_or(p);
        if name.is_empty()
            || name.contains('*')
            || name.contains('=')
            || !name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(format!(
                "{setting}: {p:?} is not a variable name or NAME_PREFIX*; list the variables a spec needs"
            ));
        }
        if denied(name) || DENIED.iter().any(|d| d.starts_with(name)) {
            return Err(format!(
                "{setting}: {p:?} would pass AWS_* or FLEET_* variables, which never reach a spec; remove it"
            ));
        }
    }
    Ok(())
}

/// Whether `name` is one a spec never sees (for callers that set variables themselves).
pub fn is_denied(name: &OsStr) -> bool {
    name.to_str().is_none_or(denied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn names(v: &[(OsString, OsString)]) -> Vec<&str> {
        v.iter().map(|(k, _)| k.to_str().unwrap()).collect()
    }

    #[test]
    fn only_the_base_allowlist_and_the_extra_names_pass() {
        let parent = vars(&[
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("LC_ALL", "C.UTF-8"),
            ("AWS_ACCESS_KEY_ID", "AKIA"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("FLEET_AGENT_TOKEN", "t"),
            ("GITHUB_TOKEN", "g"),
            ("TARGET_API_KEY", "k"),
            ("LOCUST_HOST", "http://x"),
            ("TZ", "UTC"),
        ]);
        assert_eq!(
            names(&inherited(parent.clone(), &[])),
            ["PATH", "LC_ALL", "TZ"]
        );
        let extra = ["TARGET_API_KEY".to_string(), "LOCUST_*".to_string()];
        assert_eq!(
            names(&inherited(parent, &extra)),
            ["PATH", "LC_ALL", "TARGET_API_KEY", "LOCUST_HOST", "TZ"]
        );
    }

    #[test]
    fn aws_and_fleet_variables_never_pass_whatever_the_list_says() {
        let parent = vars(&[("AWS_PROFILE", "p"), ("FLEET_DIR", "/f"), ("A", "1")]);
        let extra = [
            "AWS_PROFILE".to_string(),
            "FLEET_DIR".to_string(),
            "A".into(),
        ];
        assert_eq!(names(&inherited(parent, &extra)), ["A"]);
        assert!(is_denied(OsStr::new("AWS_SESSION_TOKEN")));
        assert!(!is_denied(OsStr::new("PYTHONUNBUFFERED")));
    }

    #[test]
    fn an_extra_allowlist_that_could_pass_secrets_is_refused_with_the_setting() {
        for bad in [
            "AWS_SECRET_ACCESS_KEY",
            "AWS_*",
            "AW*",
            "FLEET_AGENT_TOKEN",
            "F*",
            "*",
            "",
        ] {
            let e = check_allow("master.env_allow", &[bad.to_string()]).unwrap_err();
            assert!(e.starts_with("master.env_allow: "), "{e}");
        }
        for bad in ["A B", "A=B", "A*B*"] {
            assert!(check_allow("x", &[bad.to_string()]).is_err(), "{bad}");
        }
        let ok = [
            "TARGET_API_KEY".to_string(),
            "LOCUST_*".to_string(),
            "FOO".into(),
        ];
        assert_eq!(check_allow("x", &ok), Ok(()));
    }
}
