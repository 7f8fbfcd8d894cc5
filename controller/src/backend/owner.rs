//! What belongs to this fleet on AWS, decided from tags alone (docs/ec2.md, "Ownership").
//!
//! Every instance, Auto Scaling group and launch template the fleet makes carries two tags:
//! `fleet=<name>` and `fleet-id=<id>`. Names are chosen by people and collide (two teams keep
//! the default name); the id is random per fleet directory, so the pair is what makes a resource
//! ours. EC2 filters only narrow a listing (and treat `*` and `?` as wildcards); the decisions
//! here compare tag values exactly, and every destructive call goes through them first.

/// The tag with the fleet's name.
pub const NAME_TAG: &str = "fleet";
/// The tag with the fleet's random id (`fleet.toml` `id`).
pub const ID_TAG: &str = "fleet-id";

/// This fleet's identity on AWS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    pub id: String,
}

impl Owner {
    /// The tags every resource the fleet makes carries.
    pub fn tags(&self) -> [(&'static str, &str); 2] {
        [(NAME_TAG, &self.name), (ID_TAG, &self.id)]
    }

    /// Why a resource with these tags is not ours, or `None` when it is: exactly one `fleet`
    /// tag equal to our name and exactly one `fleet-id` tag equal to our id, byte for byte.
    pub fn refusal<'a>(
        &self,
        tags: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Option<String> {
        let (mut names, mut ids) = (vec![], vec![]);
        for (k, v) in tags {
            match k {
                NAME_TAG => names.push(v),
                ID_TAG => ids.push(v),
                _ => {}
            }
        }
        let describe = |key: &str, vals: &[&str]| match vals {
            [] => format!("no {key} tag"),
            [v] => format!("{key}={v:?}"),
            _ => format!("{} {key} tags", vals.len()),
        };
        if names == [self.name.as_str()] && ids == [self.id.as_str()] {
            None
        } else {
            Some(format!(
                "{}, {} (this fleet: {NAME_TAG}={:?}, {ID_TAG}={:?})",
                describe(NAME_TAG, &names),
                describe(ID_TAG, &ids),
                self.name,
                self.id
            ))
        }
    }

    pub fn owns<'a>(&self, tags: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
        self.refusal(tags).is_none()
    }
}

/// An instance as a re-check before a destructive call saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub id: String,
    pub tags: Vec<(String, String)>,
}

/// The targets of a destructive call, split by the re-check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    /// Exactly ours: the call may go ahead on these.
    pub ours: Vec<String>,
    /// Everything else, each with the reason, never to be touched.
    pub refused: Vec<(String, String)>,
}

/// Decides which of `wanted` may be destroyed, from what a fresh listing of them (`seen`) says
/// their tags are now. An id the listing did not return is refused too: what we cannot see, we
/// cannot check.
pub fn check_targets(owner: &Owner, wanted: &[String], seen: &[Seen]) -> Checked {
    let mut out = Checked::default();
    for id in wanted {
        let why = match seen.iter().find(|s| &s.id == id) {
            None => Some("not found when re-checked".to_string()),
            Some(s) => owner.refusal(s.tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        };
        match why {
            None => out.ours.push(id.clone()),
            Some(w) => out.refused.push((id.clone(), w)),
        }
    }
    out
}

/// The one line for targets a destructive call left alone.
pub fn refused_line(what: &str, refused: &[(String, String)]) -> String {
    let shown: Vec<String> = refused
        .iter()
        .take(5)
        .map(|(id, why)| format!("{id} ({why})"))
        .collect();
    format!(
        "left {} {what} alone that {} not exactly this fleet's: {}{}; run the command again to converge on what is",
        refused.len(),
        if refused.len() == 1 { "is" } else { "are" },
        shown.join(", "),
        if refused.len() > shown.len() { ", ..." } else { "" }
    )
}

/// What a named group or template found on AWS is to this fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    Missing,
    Ours,
    /// Exists, but not with our tags: never adopted, changed or deleted.
    Foreign(String),
}

/// Decides about a resource looked up by name: `tags` is `None` when there is none.
pub fn check_named<'a>(
    owner: &Owner,
    tags: Option<impl IntoIterator<Item = (&'a str, &'a str)>>,
) -> Named {
    match tags {
        None => Named::Missing,
        Some(t) => match owner.refusal(t) {
            None => Named::Ours,
            Some(why) => Named::Foreign(why),
        },
    }
}

/// The one line for a group or template by our name that is not ours.
pub fn foreign_line(kind: &str, name: &str, why: &str, owner: &Owner) -> String {
    format!(
        "{kind} {name} exists but is not this fleet's ({why}); fleet never adopts or deletes it: set asg.name in fleet.toml to another name, or, if it is this fleet's, tag it {ID_TAG}={}",
        owner.id
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            name: "load".into(),
            id: "0123456789abcdef".into(),
        }
    }

    fn seen(id: &str, tags: &[(&str, &str)]) -> Seen {
        Seen {
            id: id.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_resource_is_ours_only_with_our_exact_name_and_id() {
        let o = owner();
        let ours = [
            ("fleet", "load"),
            ("fleet-id", "0123456789abcdef"),
            ("Name", "fleet-load"),
        ];
        assert!(o.owns(ours));
        // Same name, another fleet directory.
        assert!(!o.owns([("fleet", "load"), ("fleet-id", "fedcba9876543210")]));
        // Same name, made before fleet ids or by hand.
        let why = o.refusal([("fleet", "load")]).unwrap();
        assert!(why.contains("no fleet-id tag"), "{why}");
        // Our id under another name.
        assert!(!o.owns([("fleet", "load2"), ("fleet-id", "0123456789abcdef")]));
        // No pattern matching, no case folding, no trimming.
        assert!(!o.owns([("fleet", "lo*"), ("fleet-id", "0123456789abcdef")]));
        assert!(!o.owns([("fleet", "LOAD"), ("fleet-id", "0123456789abcdef")]));
        assert!(!o.owns([("fleet", "load "), ("fleet-id", "0123456789abcdef")]));
        assert!(!o.owns([("fleet", "load"), ("fleet-id", "0123456789abcdef*")]));
        // Tag keys are exact too.
        assert!(!o.owns([("Fleet", "load"), ("fleet-id", "0123456789abcdef")]));
        assert!(!o.owns(std::iter::empty()));
    }

    #[test]
    fn destructive_targets_are_rechecked_one_by_one() {
        let o = owner();
        let ok = [("fleet", "load"), ("fleet-id", "0123456789abcdef")];
        let wanted: Vec<String> = ["i-a", "i-b", "i-c", "i-d"].map(String::from).to_vec();
        let listing = [
            seen("i-a", &ok),
            seen("i-b", &[("fleet", "load"), ("fleet-id", "other")]),
            seen("i-d", &ok),
            // Listed but not asked for: never added.
            seen("i-x", &ok),
        ];
        let c = check_targets(&o, &wanted, &listing);
        assert_eq!(c.ours, ["i-a", "i-d"]);
        assert_eq!(
            c.refused
                .iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<_>>(),
            ["i-b", "i-c"]
        );
        assert!(
            c.refused[0].1.contains("fleet-id=\"other\""),
            "{:?}",
            c.refused
        );
        assert!(c.refused[1].1.contains("not found"), "{:?}", c.refused);
        let line = refused_line("instances", &c.refused);
        assert!(line.starts_with("left 2 instances alone"), "{line}");
        assert_eq!(line.lines().count(), 1);
        assert_eq!(check_targets(&o, &[], &listing), Checked::default());
    }

    #[test]
    fn a_group_or_template_by_our_name_is_adopted_only_with_our_tags() {
        let o = owner();
        let none: Option<Vec<(&str, &str)>> = None;
        assert_eq!(check_named(&o, none), Named::Missing);
        assert_eq!(
            check_named(
                &o,
                Some([("fleet", "load"), ("fleet-id", "0123456789abcdef")])
            ),
            Named::Ours
        );
        let Named::Foreign(why) = check_named(&o, Some([("fleet", "load")])) else {
            panic!("adopted a group without our id")
        };
        let line = foreign_line("Auto Scaling group", "fleet-load", &why, &o);
        assert!(line.contains("asg.name"), "{line}");
        assert!(line.contains("fleet-id=0123456789abcdef"), "{line}");
        assert_eq!(line.lines().count(), 1);
    }
}
