//! `--junit FILE`: the thresholds' verdicts as JUnit XML, the test report format Jenkins,
//! GitLab and GitHub's test-report actions read. One `<testsuite>` per run (per matrix cell),
//! one `<testcase>` per threshold; a broken threshold carries a `<failure>` whose message
//! gives the observed value and the limit. The elements and attributes written are the common
//! subset those readers agree on; `tests/support/junit.xsd` checks them (docs/run.md).

use std::fmt::Write as _;

use super::report::{run_dir_name, Summary};

/// Text with XML's five special characters escaped, and the control characters XML 1.0 cannot
/// carry dropped (a request name could hold them).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => {}
            c => out.push(c),
        }
    }
    out
}

/// `2026-11-25T00:42:50`: RFC 3339 without its `Z` (the schema Jenkins uses takes no zone);
/// the time is UTC.
fn timestamp(rfc3339: &str) -> &str {
    rfc3339.strip_suffix('Z').unwrap_or(rfc3339)
}

/// The JUnit XML of the runs so far. `matrix`: suites and class names carry the cell's
/// directory name (`nodes-2-users-400`).
pub(super) fn junit_xml(runs: &[Summary], matrix: bool) -> String {
    let total: usize = runs.iter().map(|r| r.thresholds.len()).sum();
    let failed: usize = runs
        .iter()
        .flat_map(|r| &r.thresholds)
        .filter(|v| !v.passed)
        .count();
    let time: f64 = runs.iter().map(|r| r.duration_s).sum();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"fleet run\" tests=\"{total}\" failures=\"{failed}\" errors=\"0\" time=\"{time:.3}\">"
    );
    for r in runs {
        let cell = run_dir_name(r.nodes, r.users);
        let (suite, class) = match matrix {
            true => (format!("fleet run {cell}"), format!("fleet.run.{cell}")),
            false => ("fleet run".to_string(), "fleet.run".to_string()),
        };
        let failed = r.thresholds.iter().filter(|v| !v.passed).count();
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failed}\" errors=\"0\" skipped=\"0\" time=\"{:.3}\" timestamp=\"{}\">",
            esc(&suite),
            r.thresholds.len(),
            r.duration_s,
            esc(timestamp(&r.started))
        );
        x.push_str("    <properties>\n");
        for (k, v) in [
            ("nodes", r.nodes.to_string()),
            ("users", r.users.to_string()),
            ("workers", r.workers.to_string()),
            ("requests", r.requests.to_string()),
            ("results", r.dir.display().to_string()),
        ] {
            let _ = writeln!(x, "      <property name=\"{k}\" value=\"{}\"/>", esc(&v));
        }
        x.push_str("    </properties>\n");
        for v in &r.thresholds {
            let _ = write!(
                x,
                "    <testcase name=\"{}\" classname=\"{}\" time=\"0\"",
                esc(&v.threshold),
                esc(&class)
            );
            if v.passed {
                x.push_str("/>\n");
                continue;
            }
            let _ = writeln!(
                x,
                ">\n      <failure message=\"{}\" type=\"threshold\">{} on {}</failure>\n    </testcase>",
                esc(&v.detail()),
                esc(&v.to_string()),
                esc(&v.endpoint)
            );
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::run::locust::{Endpoint, AGGREGATED};
    use crate::cli::run::report::tests::summary;
    use crate::cli::run::threshold::{evaluate, Threshold};

    fn run(nodes: usize, users: u64, thresholds: &[&str]) -> Summary {
        let mut s = summary();
        s.nodes = nodes;
        s.users = users;
        let agg = Endpoint {
            method: String::new(),
            name: AGGREGATED.into(),
            requests: 88,
            failures: 43,
            rps: 20.29,
            median: Some(2.0),
            avg: Some(2.5),
            min: Some(1.0),
            max: Some(9.0),
            avg_size: None,
            fail_rate: 0.0,
            percentiles: vec![("95".into(), Some(5.0))],
        };
        let t: Vec<Threshold> = thresholds
            .iter()
            .map(|s| Threshold::parse(s).unwrap())
            .collect();
        s.thresholds = evaluate(&t, &[agg]);
        s
    }

    #[test]
    fn one_case_per_threshold_and_failures_with_value_and_limit() {
        let x = junit_xml(
            &[run(
                2,
                4,
                &["p95>500ms", "rps<100", "Get <a&b>: failures>0"],
            )],
            false,
        );
        assert!(x.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"fleet run\" tests=\"3\" failures=\"2\" errors=\"0\" time=\"8.000\">"), "{x}");
        assert_eq!(x.matches("<testcase ").count(), 3);
        assert_eq!(x.matches("<failure ").count(), 2);
        assert!(
            x.contains("<testcase name=\"p95&gt;500ms\" classname=\"fleet.run\" time=\"0\"/>"),
            "{x}"
        );
        assert!(
            x.contains("<failure message=\"rps 20.29 rps, fails when &lt; 100 rps\" type=\"threshold\">FAIL rps&lt;100: rps 20.29 rps, fails when &lt; 100 rps on Aggregated</failure>"),
            "{x}"
        );
        assert!(
            x.contains("name=\"Get &lt;a&amp;b&gt;: failures&gt;0\""),
            "{x}"
        );
        assert!(x.contains("timestamp=\"2026-11-25T00:42:50\""), "{x}");
    }

    #[test]
    fn a_matrix_has_a_suite_per_cell() {
        let x = junit_xml(&[run(1, 2, &["p95>1ms"]), run(2, 2, &["p95>1ms"])], true);
        assert!(x.contains("tests=\"2\" failures=\"2\""), "{x}");
        assert!(
            x.contains("<testsuite name=\"fleet run nodes-1-users-2\" tests=\"1\" failures=\"1\"")
        );
        assert!(x.contains("classname=\"fleet.run.nodes-2-users-2\""));
        assert_eq!(x.matches("<testsuite ").count(), 2);
    }

    #[test]
    fn control_characters_are_dropped() {
        assert_eq!(esc("a\u{1}b\t'\""), "ab\t&apos;&quot;");
    }
}
