//! `report.html` for a test over several Locust masters. Locust's own HTML report covers the
//! one master that renders it, so for a merged test `fleet run` writes this small summary
//! instead: the run, every endpoint with its percentiles (from the merged `stats.csv`) and the
//! merged errors. One self-contained file: inline style, no script, nothing fetched.

use std::fmt::Write as _;
use std::time::Duration;

use super::locust::Endpoint;
use super::report::{load_rows, num, Summary};
use crate::master::merge::Report;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn opt(v: Option<f64>) -> String {
    v.map(num).unwrap_or_else(|| "N/A".into())
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2330}\
h1{font-size:20px}h2{font-size:15px;margin-top:24px}\
table{border-collapse:collapse}th,td{border-bottom:1px solid #e3e6eb;padding:3px 10px;\
text-align:right;white-space:nowrap}th{color:#6b7280;font-size:12px}\
td.t{text-align:left;white-space:normal}.muted{color:#6b7280}";

/// The page for `s`, the merged `report` (stats.json) and the rows of the merged `stats.csv`.
pub(super) fn report_html(s: &Summary, report: &Report, rows: &[Endpoint]) -> String {
    let mut h = String::new();
    let title = format!(
        "fleet run: {} users for {}",
        s.users,
        humantime::format_duration(Duration::from_secs_f64(s.duration_s))
    );
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{t}</title><style>{STYLE}</style></head><body>\n<h1>{t}</h1>\n\
         <p class=\"muted\">The test over {m} Locust masters, merged exactly: counts and rates \
         summed, percentiles from the masters' merged response-time histograms. Each \
         master's own report, history and exceptions are in its Locust UI.</p>\n",
        t = esc(&title),
        m = report.masters
    );
    h.push_str("<h2>Run</h2>\n<table>\n");
    let head = [
        ("started", s.started.clone()),
        ("ended", s.ended.clone()),
        ("users", s.users.to_string()),
    ];
    for (k, v) in head.into_iter().chain(load_rows(s)) {
        let _ = writeln!(h, "<tr><th class=\"t\">{k}</th><td>{}</td></tr>", esc(&v));
    }
    h.push_str("</table>\n<h2>Requests</h2>\n<table>\n<tr><th class=\"t\">Type</th><th class=\"t\">Name</th><th># requests</th><th># fails</th><th>median (ms)</th><th>average (ms)</th><th>min (ms)</th><th>max (ms)</th><th>average size (bytes)</th><th>RPS</th><th>failures/s</th>");
    let percentiles: Vec<&str> = rows
        .first()
        .map(|r| r.percentiles.iter().map(|(p, _)| p.as_str()).collect())
        .unwrap_or_default();
    for p in &percentiles {
        let _ = write!(h, "<th>{}%</th>", esc(p));
    }
    h.push_str("</tr>\n");
    for r in rows {
        let _ = write!(
            h,
            "<tr><td class=\"t\">{}</td><td class=\"t\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td>",
            esc(&r.method),
            esc(&r.name),
            r.requests,
            r.failures,
            opt(r.median),
            opt(r.avg),
            opt(r.min),
            opt(r.max),
            opt(r.avg_size),
            r.rps,
            r.fail_rate,
        );
        for p in &percentiles {
            let _ = write!(h, "<td>{}</td>", opt(r.percentile(p)));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n<h2>Errors</h2>\n");
    if report.errors.is_empty() {
        h.push_str("<p class=\"muted\">No errors.</p>\n");
    } else {
        let mut errors: Vec<_> = report.errors.iter().collect();
        errors.sort_by_key(|e| std::cmp::Reverse(e.occurrences));
        h.push_str("<table>\n<tr><th># occurrences</th><th class=\"t\">Type</th><th class=\"t\">Name</th><th class=\"t\">Error</th></tr>\n");
        for e in errors {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td class=\"t\">{}</td><td class=\"t\">{}</td><td class=\"t\">{}</td></tr>",
                e.occurrences,
                esc(&e.method),
                esc(&e.name),
                esc(&e.error)
            );
        }
        h.push_str("</table>\n");
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::run::locust::endpoints;
    use crate::master::merge::ErrorRow;
    use crate::master::view::report_from_requests;

    #[test]
    fn the_merged_report_is_one_self_contained_page_of_the_numbers() {
        let mut s = crate::cli::run::report::tests::summary();
        s.masters = 3;
        let mut report = report_from_requests(b"{}").unwrap();
        report.masters = 3;
        report.errors = vec![ErrorRow {
            method: "GET".into(),
            name: "/<script>".into(),
            error: "HTTPError('500 Server Error')".into(),
            occurrences: 7,
            first_seen: None,
            last_seen: None,
        }];
        let csv = "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,95%,100%\r\n\
                   GET,/a&b,45,7,2,2.5,1,9,10.0,10.3,0.5,2,4,9\r\n\
                   ,Aggregated,88,43,2,2.7,1,12,10.0,20.29,9.9,2,5,12\r\n";
        let rows = endpoints(csv).unwrap();
        let h = report_html(&s, &report, &rows);
        assert!(h.starts_with("<!doctype html>") && h.ends_with("</body></html>\n"));
        for bad in [
            "<script", "src=", "href=", "http://", "https://", "@import", "url(",
        ] {
            assert!(!h.contains(bad), "{bad} in {h}");
        }
        assert!(h.contains("over 3 Locust masters"));
        assert!(
            h.contains("<th>50%</th><th>95%</th><th>100%</th></tr>"),
            "{h}"
        );
        assert!(
            h.contains("<tr><td class=\"t\">GET</td><td class=\"t\">/a&amp;b</td><td>45</td><td>7</td><td>2</td><td>2.50</td><td>1</td><td>9</td><td>10</td><td>10.30</td><td>0.50</td><td>2</td><td>4</td><td>9</td></tr>"),
            "{h}"
        );
        assert!(h.contains("<td class=\"t\">Aggregated</td><td>88</td>"));
        assert!(h.contains("<td>7</td><td class=\"t\">GET</td><td class=\"t\">/&lt;script&gt;</td><td class=\"t\">HTTPError(&#39;500 Server Error&#39;)</td>"));
        assert!(h.contains("<tr><th class=\"t\">p95 (ms)</th><td>5</td></tr>"));
    }
}
