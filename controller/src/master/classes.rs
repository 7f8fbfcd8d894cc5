//! The user classes a spec defines. A Locust master fixes its user classes when it starts, so a
//! spec that renames or adds one needs a master restart (docs/locust.md, "Spec changes and user
//! classes"); the supervisor compares this set between spec versions to know.

use std::collections::BTreeSet;
use std::path::Path;

/// User classes a spec defines, by a scan of its Python files: top-level `class Name(...)`
/// whose bases mention `User`. Files the bundle ignores are skipped, as are unreadable ones.
pub fn user_classes(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    scan(dir, &mut out);
    out
}

fn scan(dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if fleet_common::bundle::is_ignored(&name) {
            continue;
        }
        let p = e.path();
        if p.is_dir() {
            scan(&p, out);
        } else if name.ends_with(".py") {
            if let Ok(text) = std::fs::read_to_string(&p) {
                out.extend(classes_in(&text));
            }
        }
    }
}

/// The user classes one Python source defines at its top level.
fn classes_in(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines().filter_map(|line| {
        let rest = line.strip_prefix("class ")?;
        let (cls, tail) = rest.split_once('(')?;
        let bases = tail.split(')').next().unwrap_or("");
        bases.contains("User").then(|| cls.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(c: BTreeSet<String>) -> Vec<String> {
        c.into_iter().collect()
    }

    #[test]
    fn user_classes_are_found_by_their_bases_in_every_python_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("lib")).unwrap();
        std::fs::write(
            d.path().join("locustfile.py"),
            "from locust import HttpUser\nclass Web(HttpUser):\n    pass\nclass Helper(object):\n    class Inner(HttpUser): pass\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("lib/more.py"),
            "class Api(FastHttpUser):\n    pass\n",
        )
        .unwrap();
        std::fs::write(d.path().join("notes.txt"), "class Text(HttpUser):\n").unwrap();
        assert_eq!(names(user_classes(d.path())), vec!["Api", "Web"]);
    }

    #[test]
    fn a_class_without_user_in_its_bases_or_without_bases_is_not_a_user_class() {
        let src = "class Plain:\n    pass\nclass Shape(Base):\n    pass\nclass Mixed(TaskSet, HttpUser):\n    pass\n";
        assert_eq!(classes_in(src).collect::<Vec<_>>(), vec!["Mixed"]);
    }

    #[test]
    fn ignored_directories_are_not_scanned() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("__pycache__")).unwrap();
        std::fs::write(
            d.path().join("__pycache__/old.py"),
            "class Stale(HttpUser):\n    pass\n",
        )
        .unwrap();
        std::fs::write(d.path().join("locustfile.py"), "class Web(HttpUser):\n").unwrap();
        assert_eq!(names(user_classes(d.path())), vec!["Web"]);
    }

    #[test]
    fn a_missing_directory_has_no_user_classes() {
        let d = tempfile::tempdir().unwrap();
        assert!(user_classes(&d.path().join("absent")).is_empty());
    }
}
