//! The heartbeat sender: posts the node's latest [`Heartbeat`] to `/v1/heartbeat`
//! (docs/protocol.md) whenever the main loop publishes one. A 401 makes it read the token file
//! again (`token.rs`): the fleet's agent token may have been rotated.

use std::sync::Arc;
use std::time::Duration;

use fleet_common::client::Client;
use fleet_common::wire::{routes, Heartbeat};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::poller::Poll;
use crate::token::{self, Reread};

const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// Posts every new heartbeat until the main loop drops its sender. A heartbeat that gets
/// through after failures also tells the main loop the controller is back, without waiting for
/// the long-poll to return. A failure is logged once, not at every heartbeat.
pub async fn run(
    cfg: Arc<Config>,
    client: Client,
    mut rx: watch::Receiver<Heartbeat>,
    poll_tx: mpsc::UnboundedSender<Poll>,
) {
    let mut failing = false;
    while rx.changed().await.is_ok() {
        let mut hb = rx.borrow_and_update().clone();
        hb.fit();
        let body = serde_json::to_vec(&hb).expect("serialises");
        match client
            .post_json(routes::HEARTBEAT, body, POST_TIMEOUT)
            .await
        {
            Ok(r) if r.status == 200 => {
                if failing {
                    let _ = poll_tx.send(Poll::Reachable);
                }
                failing = false;
            }
            Ok(r) if r.status == 401 => {
                let why = "heartbeat refused (HTTP 401)";
                let re = token::reread(&cfg, &client);
                if !failing || re == Reread::Changed {
                    log!("{}", token::describe(why, &re, &cfg));
                }
                failing = true;
            }
            Ok(r) => {
                if !failing {
                    log!("heartbeat refused: HTTP {}", r.status);
                }
                failing = true;
            }
            Err(e) => {
                if !failing {
                    log!("heartbeat failed: {e}");
                }
                failing = true;
            }
        }
    }
}
