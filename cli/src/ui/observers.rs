//! Following one agent's flow observer (`GetFlows` with `follow`, gRPC) into the hub, for as
//! long as the UI runs: an agent that does not answer is marked failing with the error and
//! retried with jittered exponential backoff; the rest of the page keeps working.
//!
//! After a reconnect the observer replays its ring; flows not newer than the last one
//! received are skipped, so a reconnect does not show flows twice.
//!
//! It must not interpret flows: the hub does.

use std::sync::Arc;
use std::time::Duration;

use api::observer_client::ObserverClient;
use clustermesh_observer_api as api;
use tokio_util::sync::CancellationToken;

use super::hub::{FeedState, Hub};

/// Flows asked for on (re)connect, besides the live ones.
pub const BACKLOG: u64 = 200;
/// How long dialling may take before the agent counts as not answering.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings detect an agent that stopped answering on an open stream (e.g. stopped).
const KEEPALIVE: Duration = Duration::from_secs(3);
/// Backoff between attempts: from the first to the last, doubling, ±25 % jitter.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(10));

/// One observer to follow.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`.
    pub address: String,
    /// `<cluster>/<node>` (or the address) as flows are labelled.
    pub label: String,
    /// The hub's index of it.
    pub feed: usize,
}

fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or_default();
    // 0.75..1.25 of `d`, from the clock's low bits (no need for a random generator).
    d.mul_f64(0.75 + f64::from(nanos % 1000) / 2000.0)
}

/// What ended one stream.
fn describe(e: &tonic::Status) -> String {
    let msg = e.message();
    if msg.is_empty() {
        format!("{:?}", e.code())
    } else {
        msg.to_owned()
    }
}

/// Follows `t` until `token` is cancelled.
pub async fn follow(t: Target, hub: Arc<Hub>, token: CancellationToken) {
    let mut backoff = BACKOFF.0;
    // Time of the last flow received: replays after a reconnect skip up to it.
    let mut last_ns = i64::MIN;
    loop {
        hub.set_feed(t.feed, FeedState::Connecting, String::new());
        let error = tokio::select! {
            _ = token.cancelled() => return,
            e = stream(&t, &hub, &mut last_ns, &mut backoff) => e,
        };
        tracing::debug!(observer = %t.address, %error, "observer stream ended");
        hub.set_feed(
            t.feed,
            FeedState::Failing,
            format!("observer {} ({}): {error}", t.address, t.label),
        );
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(jitter(backoff)) => {}
        }
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// One connection: returns why it ended.
async fn stream(t: &Target, hub: &Hub, last_ns: &mut i64, backoff: &mut Duration) -> String {
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{}", t.address)) {
        Ok(e) => e
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true),
        Err(e) => return format!("not a usable address: {e}"),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => {
            // tonic's own message is generic ("transport error"); the cause is at the end.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why = format!("{why}: {s}");
                source = s.source();
            }
            return format!("cannot connect ({why}); is the agent running?");
        }
    };
    let req = api::GetFlowsRequest {
        number: BACKLOG,
        follow: true,
        filter: None,
    };
    let mut s = match ObserverClient::new(channel).get_flows(req).await {
        Ok(r) => r.into_inner(),
        Err(e) => return format!("GetFlows refused: {}", describe(&e)),
    };
    hub.set_feed(t.feed, FeedState::Following, String::new());
    *backoff = BACKOFF.0;
    // Only the replayed ring (at most BACKLOG flows) can repeat what was received; live
    // flows from different CPUs may arrive slightly out of time order and all count.
    let replay_until = *last_ns;
    let mut replayed = 0;
    loop {
        match s.message().await {
            Ok(Some(f)) => {
                if replayed < BACKLOG {
                    replayed += 1;
                    if f.time_unix_nanos <= replay_until {
                        continue;
                    }
                }
                *last_ns = (*last_ns).max(f.time_unix_nanos);
                hub.ingest(t.feed, &t.label, &f);
            }
            Ok(None) => return "the agent closed the stream".into(),
            Err(e) => return format!("stream broken: {}", describe(&e)),
        }
    }
}
