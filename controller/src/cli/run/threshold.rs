//! Thresholds that fail a run (`--fail-on`, `[run] fail_on`): their syntax, and the verdict
//! over a run's final per-request statistics. Both are pure: parsing happens before anything
//! runs, evaluation after the run, over the rows of `stats.csv` (docs/run.md).
//!
//! Syntax: `[ENDPOINT:] METRIC OP VALUE[UNIT]`, for example `failure_rate>1%`, `p95>500ms`,
//! `rps<100`, `GET /login: p99>=1.5s`. The condition says when the run fails.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::locust::{Endpoint, AGGREGATED};

/// The percentiles Locust writes into `stats.csv` (its `PERCENTILES_TO_REPORT`), as
/// `p<N>` names; `median` and `p50` are its median column.
const PERCENTILES: [&str; 10] = [
    "66", "75", "80", "90", "95", "98", "99", "99.9", "99.99", "100",
];

/// What a threshold measures.
#[derive(Debug, Clone, PartialEq)]
pub enum Metric {
    /// 100 × failures / requests.
    FailureRate,
    Failures,
    Requests,
    /// Requests per second over the run.
    Rps,
    Avg,
    Min,
    Max,
    Median,
    /// A percentile column of `stats.csv`, by its number (`"95"`, `"99.9"`).
    Percentile(String),
}

/// How a metric's limit is written and shown.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Percent,
    Count,
    Rate,
    /// Milliseconds (written with `ms` or `s`).
    Time,
}

impl Metric {
    fn parse(s: &str) -> Result<Metric, String> {
        let m = match s.to_ascii_lowercase().as_str() {
            "failure_rate" => Metric::FailureRate,
            "failures" => Metric::Failures,
            "requests" => Metric::Requests,
            "rps" => Metric::Rps,
            "avg" => Metric::Avg,
            "min" => Metric::Min,
            "max" => Metric::Max,
            "median" | "p50" => Metric::Median,
            other => match other.strip_prefix('p') {
                Some(n) if PERCENTILES.contains(&n) => Metric::Percentile(n.to_string()),
                _ => {
                    return Err(format!(
                        "unknown metric {s:?}; use failure_rate, failures, requests, rps, avg, min, max, median, p50, p{}",
                        PERCENTILES.join(", p")
                    ))
                }
            },
        };
        Ok(m)
    }

    fn kind(&self) -> Kind {
        match self {
            Metric::FailureRate => Kind::Percent,
            Metric::Failures | Metric::Requests => Kind::Count,
            Metric::Rps => Kind::Rate,
            _ => Kind::Time,
        }
    }

    /// The value in `row`; `None` when it has no requests to measure a time or rate over.
    fn observe(&self, row: &Endpoint) -> Option<f64> {
        let measured = row.requests > 0;
        match self {
            Metric::Requests => Some(row.requests as f64),
            Metric::Failures => Some(row.failures as f64),
            Metric::Rps => Some(row.rps),
            Metric::FailureRate => {
                measured.then(|| row.failures as f64 * 100.0 / row.requests as f64)
            }
            Metric::Avg => row.avg.filter(|_| measured),
            Metric::Min => row.min.filter(|_| measured),
            Metric::Max => row.max.filter(|_| measured),
            Metric::Median => row.median.filter(|_| measured),
            Metric::Percentile(p) => row.percentile(p).filter(|_| measured),
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Metric::FailureRate => f.write_str("failure_rate"),
            Metric::Failures => f.write_str("failures"),
            Metric::Requests => f.write_str("requests"),
            Metric::Rps => f.write_str("rps"),
            Metric::Avg => f.write_str("avg"),
            Metric::Min => f.write_str("min"),
            Metric::Max => f.write_str("max"),
            Metric::Median => f.write_str("median"),
            Metric::Percentile(p) => write!(f, "p{p}"),
        }
    }
}

/// The comparison that breaks a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
}

impl Op {
    fn holds(self, observed: f64, limit: f64) -> bool {
        match self {
            Op::Lt => observed < limit,
            Op::Le => observed <= limit,
            Op::Gt => observed > limit,
            Op::Ge => observed >= limit,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

/// One parsed threshold. `limit` is in the metric's unit: ms, %, requests or requests/s.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// As written (trimmed): the name in reports and JUnit.
    pub text: String,
    /// `None`: the Aggregated row.
    pub endpoint: Option<String>,
    pub metric: Metric,
    pub op: Op,
    pub limit: f64,
}

const SYNTAX: &str = "write [ENDPOINT:] METRIC OP VALUE, e.g. p95>500ms, failure_rate>1%, rps<100, 'GET /login: p99>1s'";

impl Threshold {
    /// Parses one threshold; the error says what to write instead.
    pub fn parse(s: &str) -> Result<Threshold, String> {
        let text = s.trim();
        // The expression never holds a colon, so the last one ends an endpoint (whose name may
        // hold colons, as URLs do).
        let (endpoint, expr) = match text.rsplit_once(':') {
            Some((e, x)) => {
                let e = e.trim();
                if e.is_empty() {
                    return Err(format!("empty endpoint before ':'; {SYNTAX}"));
                }
                (Some(e.to_string()), x.trim())
            }
            None => (None, text),
        };
        let at = expr
            .find(['<', '>'])
            .ok_or_else(|| format!("no comparison (<, <=, >, >=); {SYNTAX}"))?;
        let (metric, rest) = expr.split_at(at);
        let (op, value) = match rest.strip_prefix("<=").or(rest.strip_prefix(">=")) {
            Some(v) if rest.starts_with('<') => (Op::Le, v),
            Some(v) => (Op::Ge, v),
            None if rest.starts_with('<') => (Op::Lt, &rest[1..]),
            None => (Op::Gt, &rest[1..]),
        };
        let metric = metric.trim();
        if metric.is_empty() {
            return Err(format!("no metric before {:?}; {SYNTAX}", op.as_str()));
        }
        let metric = Metric::parse(metric)?;
        let limit = parse_value(&metric, value.trim())?;
        Ok(Threshold {
            text: text.to_string(),
            endpoint,
            metric,
            op,
            limit,
        })
    }

    /// Parses a list, refusing the same threshold twice (JUnit test names must be unique).
    pub fn parse_all(list: &[String]) -> Result<Vec<Threshold>, String> {
        let mut out: Vec<Threshold> = Vec::with_capacity(list.len());
        for s in list {
            let t = Threshold::parse(s).map_err(|e| format!("{s:?}: {e}"))?;
            if let Some(d) = out.iter().find(|o| o.same_as(&t)) {
                return Err(format!(
                    "{s:?} repeats {:?}; give each threshold once",
                    d.text
                ));
            }
            out.push(t);
        }
        Ok(out)
    }

    fn same_as(&self, o: &Threshold) -> bool {
        self.endpoint == o.endpoint
            && self.metric == o.metric
            && self.op == o.op
            && self.limit == o.limit
    }
}

/// A number with the unit the metric needs, in the metric's base unit.
fn parse_value(metric: &Metric, v: &str) -> Result<f64, String> {
    let (number, scale) = match metric.kind() {
        Kind::Time => match (v.strip_suffix("ms"), v.strip_suffix('s')) {
            (Some(n), _) => (n, 1.0),
            (None, Some(n)) => (n, 1000.0),
            _ => {
                return Err(format!(
                    "{metric} takes a time with its unit, e.g. {metric}>500ms or {metric}>1.5s, not {v:?}"
                ))
            }
        },
        Kind::Percent => match v.strip_suffix('%') {
            Some(n) => (n, 1.0),
            None => {
                return Err(format!(
                    "{metric} takes a percentage, e.g. {metric}>1% or {metric}>0.5%, not {v:?}"
                ))
            }
        },
        Kind::Rate => (v.strip_suffix("/s").unwrap_or(v), 1.0),
        Kind::Count => (v, 1.0),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{metric} needs a number, not {v:?}; {SYNTAX}"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{metric} needs a number of at least 0, not {v:?}"));
    }
    Ok(n * scale)
}

/// A threshold after the run, as the summary, the JUnit file and the exit code see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The threshold as written.
    pub threshold: String,
    /// The `stats.csv` row it was checked on: `Aggregated`, or `METHOD NAME`.
    pub endpoint: String,
    pub metric: String,
    pub op: Op,
    pub limit: f64,
    /// `ms`, `%`, `rps` or empty (counts).
    pub unit: String,
    /// `None` when it could not be measured (`note` says why); the threshold then fails.
    pub observed: Option<f64>,
    pub passed: bool,
    pub note: Option<String>,
}

impl Verdict {
    /// `rps 20.29 rps, fails when < 100 rps`, or why there was nothing to measure.
    pub fn detail(&self) -> String {
        let limit = show(self.limit, self.limit, &self.unit);
        match (self.observed, &self.note) {
            (Some(v), _) => format!(
                "{} {}, fails when {} {limit}",
                self.metric,
                show(v, self.limit, &self.unit),
                self.op.as_str()
            ),
            (None, Some(n)) => format!("{n}; fails when {} {limit}", self.op.as_str()),
            (None, None) => format!("not measured; fails when {} {limit}", self.op.as_str()),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = if self.passed { "pass" } else { "FAIL" };
        write!(f, "{word} {}: {}", self.threshold, self.detail())
    }
}

/// A value with its unit: two decimals, or every digit when two would hide which side of the
/// limit it is on (`99.996 rps` against `100`).
fn show(v: f64, limit: f64, unit: &str) -> String {
    let short = super::report::num(v);
    let n = if v != limit && short.parse::<f64>() == Ok(limit) {
        v.to_string()
    } else {
        short
    };
    match unit {
        "" => n,
        "%" => format!("{n}%"),
        u => format!("{n} {u}"),
    }
}

/// The row a threshold is about, or why there is none.
fn find<'a>(rows: &'a [Endpoint], endpoint: Option<&str>) -> Result<&'a Endpoint, String> {
    let aggregated = || {
        rows.iter()
            .find(|r| r.is_aggregated())
            .ok_or_else(|| format!("no {AGGREGATED} row in stats.csv"))
    };
    let Some(want) = endpoint else {
        return aggregated();
    };
    if want == AGGREGATED {
        return aggregated();
    }
    let requests = || rows.iter().filter(|r| !r.is_aggregated());
    if let Some(r) = requests().find(|r| r.label() == want) {
        return Ok(r);
    }
    let named: Vec<&Endpoint> = requests().filter(|r| r.name == want).collect();
    match named.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("no request named {want:?} in stats.csv")),
        several => Err(format!(
            "several requests are named {want:?} ({}); name one as \"METHOD NAME\"",
            several
                .iter()
                .map(|r| r.method.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The verdict of each threshold over a run's final rows. A threshold fails when its condition
/// holds, and also when it cannot be measured (no such endpoint, no requests for a time or a
/// rate), since a gate must not pass on nothing.
pub fn evaluate(thresholds: &[Threshold], rows: &[Endpoint]) -> Vec<Verdict> {
    thresholds
        .iter()
        .map(|t| {
            let row = find(rows, t.endpoint.as_deref());
            let (endpoint, observed, note) = match row {
                Ok(r) => {
                    let v = t.metric.observe(r);
                    let note = v
                        .is_none()
                        .then(|| format!("{} had no requests to measure", r.label()));
                    (r.label(), v, note)
                }
                Err(why) => (
                    t.endpoint.clone().unwrap_or_else(|| AGGREGATED.into()),
                    None,
                    Some(why),
                ),
            };
            let unit = match t.metric.kind() {
                Kind::Percent => "%",
                Kind::Count => "",
                Kind::Rate => "rps",
                Kind::Time => "ms",
            };
            Verdict {
                threshold: t.text.clone(),
                endpoint,
                metric: t.metric.to_string(),
                op: t.op,
                limit: t.limit,
                unit: unit.into(),
                passed: observed.is_some_and(|v| !t.op.holds(v, t.limit)),
                observed,
                note,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Threshold {
        Threshold::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        Threshold::parse(s).unwrap_err()
    }

    #[test]
    fn the_three_examples_parse() {
        let f = t("failure_rate>1%");
        assert_eq!(
            (f.endpoint, f.metric, f.op, f.limit),
            (None, Metric::FailureRate, Op::Gt, 1.0)
        );
        let p = t(" p95 > 500ms ");
        assert_eq!(
            (p.metric, p.op, p.limit),
            (Metric::Percentile("95".into()), Op::Gt, 500.0)
        );
        assert_eq!(p.text, "p95 > 500ms");
        let r = t("rps<100");
        assert_eq!((r.metric, r.op, r.limit), (Metric::Rps, Op::Lt, 100.0));
    }

    #[test]
    fn units_scale_to_milliseconds() {
        assert_eq!(t("p99>1.5s").limit, 1500.0);
        assert_eq!(t("avg>=250ms").limit, 250.0);
        assert_eq!(t("max<=0s").limit, 0.0);
        assert_eq!(t("p99.9>2s").metric, Metric::Percentile("99.9".into()));
        assert_eq!(t("median>5ms").metric, Metric::Median);
        assert_eq!(t("P50>5ms").metric, Metric::Median);
        assert_eq!(t("rps<100/s").limit, 100.0);
        assert_eq!(t("failures>0").limit, 0.0);
        assert_eq!(t("requests<1").op, Op::Lt);
    }

    #[test]
    fn endpoints_come_before_the_last_colon() {
        let l = t("GET /login: p95>500ms");
        assert_eq!(l.endpoint.as_deref(), Some("GET /login"));
        let u = t("http://x:8080/a : failures>0");
        assert_eq!(u.endpoint.as_deref(), Some("http://x:8080/a"));
        assert!(err(": p95>1ms").contains("empty endpoint"));
    }

    #[test]
    fn mistakes_say_what_to_write() {
        assert!(
            err("p95>500").contains("p95>500ms or p95>1.5s"),
            "{}",
            err("p95>500")
        );
        assert!(err("failure_rate>1").contains("percentage"));
        assert!(err("p95=500ms").contains("no comparison"));
        assert!(err(">5ms").contains("no metric"));
        assert!(err("p97>5ms").starts_with("unknown metric \"p97\""));
        assert!(err("latency>5ms").contains("p99.9"));
        assert!(err("rps<-1").contains("at least 0"));
        assert!(err("rps<nan").contains("at least 0"));
        assert!(err("rps<lots").contains("needs a number"));
        assert!(err("failures>1ms").contains("needs a number"));
        assert!(!err("p95>500").contains('\n'));
    }

    #[test]
    fn a_list_refuses_repeats() {
        let l =
            |v: &[&str]| Threshold::parse_all(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(l(&["p95>500ms", "rps<1"]).unwrap().len(), 2);
        let e = l(&["p95>500ms", "p95 > 0.5s"]).unwrap_err();
        assert!(e.contains("repeats \"p95>500ms\""), "{e}");
        assert!(l(&["p95>500ms", "bad"])
            .unwrap_err()
            .starts_with("\"bad\": "));
    }

    fn row(method: &str, name: &str, requests: u64, failures: u64) -> Endpoint {
        Endpoint {
            method: method.into(),
            name: name.into(),
            requests,
            failures,
            rps: requests as f64 / 10.0,
            median: Some(20.0),
            avg: Some(25.5),
            min: Some(3.0),
            max: Some(900.0),
            avg_size: None,
            fail_rate: 0.0,
            percentiles: vec![("90".into(), Some(200.0)), ("95".into(), Some(500.0))],
        }
    }

    fn stats() -> Vec<Endpoint> {
        vec![
            row("GET", "/login", 100, 0),
            row("POST", "/login", 50, 5),
            row("GET", "/a", 0, 0),
            row("", AGGREGATED, 150, 5),
        ]
    }

    fn one(s: &str, rows: &[Endpoint]) -> Verdict {
        evaluate(&[t(s)], rows).remove(0)
    }

    #[test]
    fn the_aggregated_row_is_the_default() {
        let v = one("failure_rate>3%", &stats());
        assert_eq!(v.endpoint, "Aggregated");
        assert!((v.observed.unwrap() - 100.0 / 30.0).abs() < 1e-9);
        assert!(!v.passed, "{v}");
        assert_eq!(v.unit, "%");
        assert!(one("failure_rate>4%", &stats()).passed);
        assert_eq!(one("rps<10", &stats()).observed, Some(15.0));
        assert!(one("rps<10", &stats()).passed);
        assert!(!one("rps<=15", &stats()).passed);
        assert!(one("p90>=201ms", &stats()).passed);
        assert!(!one("max>0.5s", &stats()).passed);
    }

    #[test]
    fn equality_breaks_only_inclusive_comparisons() {
        assert!(one("p95>500ms", &stats()).passed);
        assert!(!one("p95>=500ms", &stats()).passed);
        assert!(one("p95<500ms", &stats()).passed);
        assert!(!one("p95<=0.5s", &stats()).passed);
        assert!(one("requests<150", &stats()).passed);
        assert!(!one("requests<=150", &stats()).passed);
    }

    #[test]
    fn endpoints_by_method_and_name_or_by_a_unique_name() {
        let v = one("POST /login: failures>0", &stats());
        assert_eq!(
            (v.endpoint.as_str(), v.observed),
            ("POST /login", Some(5.0))
        );
        assert!(!v.passed);
        assert!(one("GET /login: failures>0", &stats()).passed);
        assert!(one("Aggregated: requests<150", &stats()).passed);
        let v = one("/login: failures>0", &stats());
        assert_eq!(v.observed, None);
        assert!(!v.passed);
        assert_eq!(
            v.note.as_deref(),
            Some("several requests are named \"/login\" (GET, POST); name one as \"METHOD NAME\"")
        );
        let mut single = stats();
        single.remove(1);
        assert!(one("/login: failures>0", &single).passed);
    }

    #[test]
    fn a_missing_endpoint_or_no_requests_fails() {
        let v = one("GET /logout: p95>1s", &stats());
        assert!(!v.passed);
        assert_eq!(v.endpoint, "GET /logout");
        assert_eq!(
            v.note.as_deref(),
            Some("no request named \"GET /logout\" in stats.csv")
        );
        assert!(
            v.to_string()
                .starts_with("FAIL GET /logout: p95>1s: no request named"),
            "{v}"
        );
        // A request without requests: no time, no failure rate; counts are 0.
        let v = one("GET /a: p95>1s", &stats());
        assert_eq!((v.observed, v.passed), (None, false));
        assert_eq!(v.note.as_deref(), Some("GET /a had no requests to measure"));
        assert!(!one("GET /a: failure_rate>1%", &stats()).passed);
        assert!(one("GET /a: failures>0", &stats()).passed);
        assert!(!one("GET /a: requests<1", &stats()).passed);
        // No stats at all.
        let v = one("rps<1", &[]);
        assert_eq!(v.note.as_deref(), Some("no Aggregated row in stats.csv"));
        assert!(!v.passed);
    }

    #[test]
    fn verdicts_read_as_sentences() {
        assert_eq!(
            one("p95>=500ms", &stats()).to_string(),
            "FAIL p95>=500ms: p95 500 ms, fails when >= 500 ms"
        );
        assert_eq!(
            one("failures>10", &stats()).to_string(),
            "pass failures>10: failures 5, fails when > 10"
        );
        let mut close = stats();
        close[3].rps = 99.996;
        assert_eq!(
            one("rps<100", &close).detail(),
            "rps 99.996 rps, fails when < 100 rps"
        );
    }
}
