//! What `fleet run` reads from Locust: the numbers of `/stats/requests`, the time of an HTTP
//! answer, the request count of its CSV, and its history CSV cut to a run's time window
//! (docs/locust.md says how Locust computes and caches them).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Result};
use fleet_common::client::Response;
use serde::Deserialize;

/// The numbers of the `Aggregated` row of `/stats/requests` (locust 2.47 key names).
#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct Aggregated {
    #[serde(default)]
    pub(super) num_requests: u64,
    #[serde(default)]
    pub(super) num_failures: u64,
    #[serde(default)]
    pub(super) total_rps: Option<f64>,
    #[serde(default)]
    pub(super) median_response_time: Option<f64>,
    #[serde(default, rename = "response_time_percentile_0.95")]
    pub(super) p95: Option<f64>,
    #[serde(default, rename = "response_time_percentile_0.99")]
    pub(super) p99: Option<f64>,
}

/// The top level of `/stats/requests`, as much as a run needs.
#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct Live {
    #[serde(default)]
    pub(super) state: String,
    #[serde(default)]
    pub(super) user_count: u64,
    #[serde(default)]
    pub(super) worker_count: u64,
    #[serde(default)]
    pub(super) current_rps: Option<f64>,
    #[serde(default)]
    pub(super) total_rps: f64,
    #[serde(default)]
    pub(super) fail_ratio: f64,
}

pub(super) fn aggregated(stats: &serde_json::Value) -> Result<Aggregated> {
    let row = stats["stats"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == "Aggregated"))
        .ok_or_else(|| {
            anyhow!("Locust's /stats/requests has no Aggregated row; is the master a Locust 2.x?")
        })?;
    Ok(serde_json::from_value(row.clone())?)
}

/// Unix seconds from an HTTP `Date` header (`Wed, 25 Nov 2026 00:42:50 GMT`).
fn http_date(s: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let p: Vec<&str> = s.split_whitespace().collect();
    if p.len() != 6 || p[5] != "GMT" {
        return None;
    }
    let month = MONTHS.iter().position(|m| *m == p[2])? + 1;
    let day: u32 = p[1].parse().ok()?;
    let year: u32 = p[3].parse().ok()?;
    let t = humantime::parse_rfc3339(&format!("{year:04}-{month:02}-{day:02}T{}Z", p[4])).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// The controller host's clock (where the managed master runs), else ours.
pub(super) fn server_time(r: &Response) -> u64 {
    r.header("date").and_then(http_date).unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

/// Keeps the header and the rows of Locust's history CSV stamped within `[from, to]`.
/// Returns the text, the number of rows kept, and whether the file already holds a complete
/// row after `to` (then everything up to `to` has been flushed).
pub(super) fn history_window(csv: &str, from: u64, to: u64) -> (String, usize, bool) {
    let mut out = String::new();
    let mut kept = 0;
    let mut past = false;
    let mut keep = true;
    // A last line without its newline is still being written.
    let complete = match csv.rfind('\n') {
        Some(i) => &csv[..=i],
        None => "",
    };
    for (i, line) in complete.lines().enumerate() {
        if i == 0 {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        // The timestamp is the first field; a line without one continues a quoted field.
        if let Some(ts) = line
            .split_once(',')
            .and_then(|(t, _)| t.parse::<u64>().ok())
        {
            keep = ts >= from && ts <= to;
            past |= ts > to;
            if keep {
                kept += 1;
            }
        }
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    (out, kept, past)
}

/// The `Request Count` of the Aggregated row of Locust's `/stats/requests/csv`.
pub(super) fn csv_requests(csv: &str) -> Option<u64> {
    endpoints(csv)
        .ok()?
        .into_iter()
        .find(|e| e.is_aggregated())
        .map(|e| e.requests)
}

/// The name of the row that sums every request.
pub(super) const AGGREGATED: &str = "Aggregated";

/// One row of `stats.csv` (`/stats/requests/csv`, locust 2.47 column names): a request name,
/// or the Aggregated row. Times are in ms; `None` where Locust writes `N/A` or nothing (no
/// requests).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Endpoint {
    /// `Type`: the request's method, empty for the Aggregated row.
    pub(super) method: String,
    pub(super) name: String,
    pub(super) requests: u64,
    pub(super) failures: u64,
    pub(super) rps: f64,
    /// `Failures/s`.
    pub(super) fail_rate: f64,
    pub(super) median: Option<f64>,
    pub(super) avg: Option<f64>,
    pub(super) min: Option<f64>,
    pub(super) max: Option<f64>,
    /// `Average Content Size`, in bytes.
    pub(super) avg_size: Option<f64>,
    /// The percentile columns by number: `("95", Some(500.0))` from the `95%` column.
    pub(super) percentiles: Vec<(String, Option<f64>)>,
}

impl Endpoint {
    pub(super) fn is_aggregated(&self) -> bool {
        self.method.is_empty() && self.name == AGGREGATED
    }

    /// `GET /login`, or `Aggregated`.
    pub(super) fn label(&self) -> String {
        match self.method.is_empty() {
            true => self.name.clone(),
            false => format!("{} {}", self.method, self.name),
        }
    }

    pub(super) fn percentile(&self, p: &str) -> Option<f64> {
        self.percentiles
            .iter()
            .find(|(k, _)| k == p)
            .and_then(|(_, v)| *v)
    }
}

/// The records of a CSV text (RFC 4180: quoted fields may hold commas, quotes doubled, and
/// newlines), as Python's `csv` module writes them.
fn csv_records(text: &str) -> Vec<Vec<String>> {
    let mut records = vec![];
    let mut record = vec![];
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    records
}

/// The rows of `stats.csv`, columns found by their header names.
pub(super) fn endpoints(csv: &str) -> Result<Vec<Endpoint>> {
    let mut records = csv_records(csv).into_iter();
    let header = records
        .next()
        .ok_or_else(|| anyhow!("stats.csv is empty"))?;
    let col = |name: &str| header.iter().position(|h| h == name);
    let (Some(ty), Some(name)) = (col("Type"), col("Name")) else {
        return Err(anyhow!(
            "stats.csv has no Type and Name columns; is the master a Locust 2.x?"
        ));
    };
    let percentiles: Vec<(String, usize)> = header
        .iter()
        .enumerate()
        .filter_map(|(i, h)| Some((h.strip_suffix('%')?.to_string(), i)))
        .collect();
    let number = |r: &[String], c: Option<usize>| -> Option<f64> {
        r.get(c?)?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
    };
    Ok(records
        .filter(|r| r.len() > name)
        .map(|r| Endpoint {
            method: r[ty].clone(),
            name: r[name].clone(),
            requests: number(&r, col("Request Count")).unwrap_or(0.0) as u64,
            failures: number(&r, col("Failure Count")).unwrap_or(0.0) as u64,
            rps: number(&r, col("Requests/s")).unwrap_or(0.0),
            fail_rate: number(&r, col("Failures/s")).unwrap_or(0.0),
            median: number(&r, col("Median Response Time")),
            avg: number(&r, col("Average Response Time")),
            min: number(&r, col("Min Response Time")),
            max: number(&r, col("Max Response Time")),
            avg_size: number(&r, col("Average Content Size")),
            percentiles: percentiles
                .iter()
                .map(|(p, i)| (p.clone(), number(&r, Some(*i))))
                .collect(),
        })
        .collect())
}

/// `running 6/6 users, 12.3 rps, 0.00% fail, 2 workers`. Locust's `current_rps` (its last
/// ~10 s) is 0 for the first seconds of a test; its `total_rps` is shown until then.
pub(super) fn live_message(l: &Live, users: u64) -> String {
    format!(
        "{} {}/{users} users, {:.1} rps, {:.2}% fail, {} workers",
        l.state,
        l.user_count,
        l.current_rps.filter(|r| *r > 0.0).unwrap_or(l.total_rps),
        l.fail_ratio * 100.0,
        l.worker_count
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS: &str = r#"{"current_rps": 14.6, "fail_ratio": 0.4886, "state": "running",
      "stats": [
        {"name": "/a", "num_requests": 45, "num_failures": 0, "total_rps": 10.3,
         "median_response_time": 2, "response_time_percentile_0.95": 4,
         "response_time_percentile_0.99": 6},
        {"method": "", "name": "Aggregated", "num_requests": 88, "num_failures": 43,
         "total_rps": 20.29351370704754, "median_response_time": 2,
         "response_time_percentile_0.95": 5, "response_time_percentile_0.99": 6.0}
      ],
      "total_rps": 20.29351370704754, "user_count": 4, "worker_count": 1}"#;

    #[test]
    fn the_aggregated_row_gives_the_numbers() {
        let v: serde_json::Value = serde_json::from_str(STATS).unwrap();
        let a = aggregated(&v).unwrap();
        assert_eq!((a.num_requests, a.num_failures), (88, 43));
        assert_eq!(a.total_rps, Some(20.29351370704754));
        assert_eq!(
            (a.median_response_time, a.p95, a.p99),
            (Some(2.0), Some(5.0), Some(6.0))
        );
        let l: Live = serde_json::from_value(v).unwrap();
        assert_eq!((l.user_count, l.worker_count), (4, 1));
        let none = serde_json::json!({"stats": [{"name": "/a"}]});
        assert!(aggregated(&none).is_err());
    }

    #[test]
    fn http_dates() {
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:10 GMT"), Some(10));
        assert_eq!(
            http_date("Wed, 25 Nov 2026 00:42:50 GMT"),
            Some(1_795_567_370)
        );
        assert_eq!(http_date("yesterday"), None);
    }

    /// A `stats.csv` as locust 2.47 writes it, with a name that needs quoting.
    const STATS_CSV: &str = "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%\r\n\
        GET,/a,45,0,2,2.5,1,9,10.0,10.3,0.0,2,3,3,3,4,4,6,9,9,9,9\r\n\
        GET,\"/b,\"\"c\"\"\",0,0,0,0.0,,0,0.0,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A\r\n\
        ,Aggregated,88,43,2,2.7,1,12,10.0,20.29,9.9,2,3,3,4,5,5,6,6,12,12,12\r\n";

    #[test]
    fn stats_csv_rows() {
        let rows = endpoints(STATS_CSV).unwrap();
        assert_eq!(rows.len(), 3);
        let a = &rows[0];
        assert_eq!(
            (a.label(), a.requests, a.failures),
            ("GET /a".into(), 45, 0)
        );
        assert_eq!(
            (a.median, a.avg, a.min, a.max),
            (Some(2.0), Some(2.5), Some(1.0), Some(9.0))
        );
        assert_eq!(
            (a.percentile("90"), a.percentile("99.9")),
            (Some(4.0), Some(9.0))
        );
        assert_eq!(rows[1].name, "/b,\"c\"");
        assert_eq!((rows[1].min, rows[1].percentile("95")), (None, None));
        let agg = &rows[2];
        assert!(agg.is_aggregated() && !a.is_aggregated());
        assert_eq!(
            (agg.label(), agg.rps, agg.percentile("100")),
            ("Aggregated".into(), 20.29, Some(12.0))
        );
        assert_eq!(csv_requests(STATS_CSV), Some(88));
        assert!(endpoints("").is_err());
        assert!(endpoints("a,b\n1,2\n").is_err());
        assert_eq!(
            csv_records("x,\"y\nz\"\n"),
            [vec!["x".to_string(), "y\nz".into()]]
        );
    }

    #[test]
    fn history_is_cut_to_the_run() {
        let csv = "Timestamp,User Count,Type,Name\n\
                   100,0,,Aggregated\n\
                   105,4,GET,/a\n\
                   105,4,,Aggregated\n\
                   106,4,GET,\"a\nb\"\n\
                   110,0,,Aggregated\n\
                   111,0,,Aggre";
        let (out, kept, past) = history_window(csv, 105, 106);
        assert_eq!(
            out,
            "Timestamp,User Count,Type,Name\n105,4,GET,/a\n105,4,,Aggregated\n106,4,GET,\"a\nb\"\n"
        );
        assert_eq!(kept, 3);
        assert!(past);
        assert_eq!(
            csv_requests("Type,Name,Request Count\nGET,/a,3,0\n,Aggregated,37,0,1.07\n"),
            Some(37)
        );
        // Nothing flushed past the end yet; the partial last line is not counted.
        let (_, _, past) = history_window("T\n105,x\n107,partial", 105, 106);
        assert!(!past);
    }
}
