//! The one client of the operator API that every command uses: the controller's HTTPS API with
//! the operator token (`fleet_common::client::Client` underneath), and Locust's own API through
//! the controller's authenticated `/locust/*` proxy. Every failure is one line that says what
//! to do (docs/protocol.md lists the routes).

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use fleet_common::client::{Client, ClientError, Response};
use fleet_common::wire::{routes, NodeView};
use hyper::Method;

use super::remote::Endpoint;
use crate::backend::NodeInfo;
use crate::config::Fleet;
use crate::daemon::reload::Reloaded;

/// The usual time for one call.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// JSON answers and Locust's per-request CSVs (at most 500 rows each in Locust).
pub const SMALL_LIMIT: usize = 16 << 20;
/// `/api/nodes` at the largest fleets.
const NODES_LIMIT: usize = 64 << 20;
const NODES_TIMEOUT: Duration = Duration::from_secs(10);
/// Best-effort notes to the controller (forget a node, the backend's listing).
const NOTE_TIMEOUT: Duration = Duration::from_secs(5);

/// The controller, with the operator token.
pub struct Api {
    client: Client,
    url: String,
    /// What to check when the token is refused (where it came from).
    token_hint: String,
}

impl Api {
    /// The fleet directory's own controller.
    pub fn new(fleet: &Fleet) -> Result<Api> {
        Api::connect(&Endpoint::of_fleet(fleet)?)
    }

    /// Any controller: the fleet directory's, a remote, or the one the environment names.
    pub fn connect(e: &Endpoint) -> Result<Api> {
        let client = Client::new(&e.url, &e.ca_pem, Some(&format!("Bearer {}", e.token)))
            .map_err(|err| anyhow!("{err} (from {})", e.ca_from))?;
        Ok(Api {
            client,
            url: e.url.clone(),
            token_hint: e.token_hint(),
        })
    }

    /// The controller's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// One request; any HTTP status is an answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        json: Option<serde_json::Value>,
        limit: usize,
        timeout: Duration,
    ) -> Result<Response> {
        self.send_json(method.clone(), path, json, limit, timeout)
            .await
            .map_err(|e| self.failed(&method, path, limit, e))
    }

    async fn send_json(
        &self,
        method: Method,
        path: &str,
        json: Option<serde_json::Value>,
        limit: usize,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let body = json.map(|v| ("application/json", v.to_string().into_bytes()));
        self.client
            .request(method, path, body, timeout, limit)
            .await
    }

    fn failed(&self, method: &Method, path: &str, limit: usize, e: ClientError) -> anyhow::Error {
        match e {
            ClientError::Body { .. } => anyhow!("{method} {path}: answer over {limit} bytes"),
            e => anyhow!(
                "controller {} unreachable ({e}); is `fleet serve` running there?",
                self.url
            ),
        }
    }

    /// One line for a refused request, saying what to do ([`refused`]).
    pub fn refused(&self, r: &Response, what: &str) -> anyhow::Error {
        refused(r, what, &self.token_hint)
    }

    /// One request with a raw body (`content_type`, bytes); any HTTP status is an answer.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
        limit: usize,
        timeout: Duration,
    ) -> Result<Response> {
        self.client
            .request(method.clone(), path, body, timeout, limit)
            .await
            .map_err(|e| self.failed(&method, path, limit, e))
    }

    /// A request that must answer 200.
    pub async fn ok(
        &self,
        method: Method,
        path: &str,
        json: Option<serde_json::Value>,
        limit: usize,
        timeout: Duration,
    ) -> Result<Response> {
        let r = self
            .call(method.clone(), path, json, limit, timeout)
            .await?;
        if r.status != 200 {
            return Err(self.refused(&r, &format!("{method} {path}")));
        }
        Ok(r)
    }

    pub async fn get(&self, path: &str, limit: usize) -> Result<Response> {
        self.ok(Method::GET, path, None, limit, TIMEOUT).await
    }

    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self.get(path, SMALL_LIMIT).await?;
        serde_json::from_slice(&r.body)
            .with_context(|| format!("GET {path}: not the JSON expected"))
    }

    /// An operator action (`/api/swarm`, `/api/stop`): a refusal is the controller's own
    /// `error` line.
    pub async fn act(&self, path: &str, json: serde_json::Value) -> Result<()> {
        let r = self
            .call(Method::POST, path, Some(json), 1 << 20, TIMEOUT)
            .await?;
        if r.status != 200 {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            return Err(match v.get("error").and_then(|e| e.as_str()) {
                Some(e) => anyhow!("{e}"),
                None => self.refused(&r, &format!("POST {path}")),
            });
        }
        Ok(())
    }

    /// The controller's view of the nodes.
    pub async fn nodes(&self) -> Result<Vec<NodeView>> {
        let r = self
            .ok(
                Method::GET,
                routes::API_NODES,
                None,
                NODES_LIMIT,
                NODES_TIMEOUT,
            )
            .await?;
        serde_json::from_slice(&r.body)
            .with_context(|| format!("GET {}: not the JSON expected", routes::API_NODES))
    }

    /// The controller's view of the nodes, or `None` when the controller cannot be reached at
    /// all (`fleet status` then still lists the backend's nodes).
    pub async fn nodes_if_up(&self) -> Result<Option<Vec<NodeView>>> {
        let path = routes::API_NODES;
        match self
            .send_json(Method::GET, path, None, NODES_LIMIT, NODES_TIMEOUT)
            .await
        {
            Err(e) if e.is_unreachable() => Ok(None),
            Err(e) => Err(self.failed(&Method::GET, path, NODES_LIMIT, e)),
            Ok(r) if r.status != 200 => Err(self.refused(&r, &format!("GET {path}"))),
            Ok(r) => serde_json::from_slice(&r.body)
                .map(Some)
                .with_context(|| format!("GET {path}: not the JSON expected")),
        }
    }

    /// The test's stats, merged over its masters: `GET /api/stats` (`/stats/requests`' shape),
    /// or with `csv` `GET /api/stats/csv` (Locust's `stats.csv`). A controller older than
    /// them answers 404: then Locust's own through the proxy, as before.
    pub async fn test_stats(&self, csv: bool) -> Result<Response> {
        let (path, before) = match csv {
            false => (routes::API_STATS, "/locust/stats/requests"),
            true => (routes::API_STATS_CSV, "/locust/stats/requests/csv"),
        };
        let r = self
            .call(Method::GET, path, None, SMALL_LIMIT, TIMEOUT)
            .await?;
        match r.status {
            200 => Ok(r),
            404 => self.get(before, SMALL_LIMIT).await,
            _ => Err(self.refused(&r, &format!("GET {path}"))),
        }
    }

    /// The workers connected to the test's masters (`worker_count` of [`Api::test_stats`]).
    pub async fn worker_count(&self) -> Result<u64> {
        let r = self.test_stats(false).await?;
        let v: serde_json::Value = serde_json::from_slice(&r.body)
            .context("the test's stats are not the JSON expected")?;
        Ok(v["worker_count"].as_u64().unwrap_or(0))
    }

    /// Stops the running test.
    pub async fn stop(&self) -> Result<Response> {
        self.ok(
            Method::POST,
            routes::API_STOP,
            Some(serde_json::json!({})),
            1 << 20,
            TIMEOUT,
        )
        .await
        .map_err(|e| anyhow!("cannot stop the test ({e:#}); run `fleet stop`"))
    }

    /// Asks the running controller to reload its certificate and credentials (what SIGHUP
    /// does); `None` when no controller answered.
    pub async fn reload(&self) -> Result<Option<Reloaded>> {
        let r = match self
            .client
            .request(Method::POST, routes::API_RELOAD, None, TIMEOUT, SMALL_LIMIT)
            .await
        {
            Ok(r) => r,
            Err(e) if e.is_unreachable() => return Ok(None),
            Err(e) => return Err(anyhow!("POST {}: {e}", routes::API_RELOAD)),
        };
        if r.status != 200 {
            return Err(self.refused(&r, &format!("POST {}", routes::API_RELOAD)));
        }
        serde_json::from_slice(&r.body)
            .map(Some)
            .with_context(|| format!("POST {}: not the JSON expected", routes::API_RELOAD))
    }

    /// Tells the controller to forget nodes (best effort: a controller that is down learns it
    /// from the missing heartbeats).
    pub async fn forget(&self, ids: &[String]) {
        for id in ids {
            let path = format!("{}/{id}", routes::API_NODES);
            let _ = self
                .client
                .request(Method::DELETE, &path, None, NOTE_TIMEOUT, 1024)
                .await;
        }
    }

    /// Tells the controller which nodes the backend lists as live, so it keeps them while they
    /// are silent (best effort: nodes.rs says why).
    pub async fn report_listed(&self, observed: &[NodeInfo]) {
        let listing = crate::daemon::Listing {
            listed: observed
                .iter()
                .filter(|n| n.live)
                .map(|n| n.id.clone())
                .collect(),
        };
        let Ok(body) = serde_json::to_vec(&listing) else {
            return;
        };
        let _ = self
            .client
            .request(
                Method::PUT,
                routes::API_NODES,
                Some(("application/json", body)),
                NOTE_TIMEOUT,
                1024,
            )
            .await;
    }
}

/// One line for a refused request, saying what to do; `token_hint` says what to check when the
/// token is refused (where it came from).
pub fn refused(r: &Response, what: &str, token_hint: &str) -> anyhow::Error {
    let text = {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        match v.get("error").and_then(|e| e.as_str()) {
            Some(e) => e.to_string(),
            None => String::from_utf8_lossy(&r.body)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .chars()
                .take(200)
                .collect(),
        }
    };
    let locust = what.contains(" /locust");
    match r.status {
        401 => anyhow!("the controller refused the operator token ({what}: HTTP 401); {token_hint}"),
        429 => anyhow!("the controller refused the operator token, and this address has failed too often ({what}: HTTP 429); {token_hint}"),
        502 if locust => anyhow!("the Locust master is not reachable behind the controller ({what}: HTTP 502); check state/master.log and retry"),
        s if locust => anyhow!("Locust refused {what}: HTTP {s} {text}"),
        s => anyhow!("the controller answered HTTP {s} to {what}: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Response {
        Response {
            status,
            headers: Default::default(),
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    const H: &str = "check secrets/operator.token";

    #[test]
    fn refusals_say_what_to_do() {
        let e = refused(&answer(401, ""), "GET /api/nodes", H).to_string();
        assert!(e.contains("check secrets/operator.token"), "{e}");
        let e = refused(&answer(429, ""), "GET /api/nodes", "check FLEET_TOKEN");
        assert!(
            e.to_string().ends_with("HTTP 429); check FLEET_TOKEN"),
            "{e}"
        );
        let e = refused(&answer(502, "bad gateway"), "GET /locust/stats/requests", H).to_string();
        assert!(e.contains("check state/master.log"), "{e}");
        let e = refused(
            &answer(409, r#"{"error":"no workers"}"#),
            "POST /api/swarm",
            H,
        )
        .to_string();
        assert_eq!(
            e,
            "the controller answered HTTP 409 to POST /api/swarm: no workers"
        );
        let e = refused(&answer(500, "\n\nboom\nmore"), "GET /locust/x", H).to_string();
        assert_eq!(e, "Locust refused GET /locust/x: HTTP 500 boom");
    }
}
