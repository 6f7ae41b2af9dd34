//! Many etcd watches over one watch stream.
//!
//! etcd multiplexes any number of watches over one gRPC watch stream (each response names its
//! watch ID); etcd-client opens a new stream per `watch()` call instead. A stream costs about
//! 20 KiB on the client (tonic's encode and decode buffers, the request channel, HTTP/2
//! stream state), and a reader used one per resource plus one for the heartbeat, per remote:
//! with 250 remotes read through one local etcd (KVStoreMesh mode) that was ~25 MiB. One
//! [`Mux`] per etcd connection carries all of them; a watch costs a small channel.
//!
//! * **Creates are serialised.** etcd answers the create requests of a stream in order, but
//!   a created response does not say which request it answers, so only one create is in
//!   flight at a time (as etcd's Go client does); the next goes out when it is answered.
//! * **No head-of-line blocking.** Responses are handed to each watch's bounded channel
//!   without waiting. A watch whose consumer falls [`CAPACITY`] responses behind is canceled
//!   in etcd and ends as [`Ended::Lagged`]: its owner relists, exactly as after compaction.
//!   Other watches on the stream never wait for it.
//! * **Failure ends every watch.** If the stream fails, each watch ends with
//!   [`Ended::Failed`] (after the responses already queued for it); a new [`Mux`] opens a
//!   new stream.
//! * **Dropping a [`Watch`]** cancels it in etcd; dropping the [`Mux`] (every clone of its
//!   `Arc`) stops its task and so the stream.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use etcd_client::{Client, WatchOptions, WatchResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, Instrument as _};

use crate::client::MAX_MESSAGE_BYTES;

/// Responses queued per watch before it is dropped as lagging.
pub(crate) const CAPACITY: usize = 64;

/// Why a [`Watch`] delivers no more responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Its consumer fell [`CAPACITY`] responses behind; etcd no longer sends its events.
    Lagged,
    /// The shared stream (or the create request) failed.
    Failed(String),
}

enum Cmd {
    Watch {
        key: Vec<u8>,
        options: WatchOptions,
        reply: oneshot::Sender<Result<Registered, Ended>>,
    },
    Cancel(i64),
}

struct Registered {
    id: i64,
    rx: mpsc::Receiver<Box<WatchResponse>>,
    lagged: Arc<AtomicBool>,
}

/// State the task shares with the watches: why the stream ended.
#[derive(Default)]
struct Shared {
    failure: Mutex<Option<String>>,
}

/// One watch stream and the task that routes its responses; see the module docs.
pub(crate) struct Mux {
    cmds: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    _task: AbortOnDropHandle<()>,
}

impl Mux {
    /// Starts the routing task; the stream itself is opened by the first watch.
    pub(crate) fn new(client: Client) -> Arc<Self> {
        let (cmds, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(
            run(client, rx, shared.clone()).instrument(tracing::debug_span!("watch_mux")),
        );
        Arc::new(Self {
            cmds,
            shared,
            _task: AbortOnDropHandle::new(task),
        })
    }

    /// Creates a watch of `key` with `options`; the first response delivered is etcd's
    /// created response.
    pub(crate) async fn watch(
        self: &Arc<Self>,
        key: impl Into<Vec<u8>>,
        options: WatchOptions,
    ) -> Result<Watch, Ended> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Watch {
            key: key.into(),
            options,
            reply,
        };
        if self.cmds.send(cmd).is_err() {
            return Err(self.failure());
        }
        let registered = rx.await.map_err(|_| self.failure())??;
        Ok(Watch {
            id: registered.id,
            rx: registered.rx,
            lagged: registered.lagged,
            mux: self.clone(),
        })
    }

    fn failure(&self) -> Ended {
        let reason = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ended::Failed(reason.unwrap_or_else(|| "watch stream stopped".into()))
    }
}

/// One watch on a [`Mux`]; canceled in etcd when dropped.
pub(crate) struct Watch {
    id: i64,
    rx: mpsc::Receiver<Box<WatchResponse>>,
    lagged: Arc<AtomicBool>,
    mux: Arc<Mux>,
}

impl Watch {
    /// The next response, in etcd's order.
    pub(crate) async fn message(&mut self) -> Result<Box<WatchResponse>, Ended> {
        match self.rx.recv().await {
            Some(resp) => Ok(resp),
            None if self.lagged.load(Ordering::SeqCst) => Err(Ended::Lagged),
            None => Err(self.mux.failure()),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Fails only if the task is gone, and with it the stream.
        let _ = self.mux.cmds.send(Cmd::Cancel(self.id));
    }
}

struct Route {
    tx: mpsc::Sender<Box<WatchResponse>>,
    lagged: Arc<AtomicBool>,
}

type Pending = oneshot::Sender<Result<Registered, Ended>>;

/// The task's state; owned by [`run`] so that a failure is recorded before the routes are
/// dropped (a watch that sees its channel close must find the reason).
#[derive(Default)]
struct State {
    /// Watches waiting for their create request to be sent.
    queued: VecDeque<(Vec<u8>, WatchOptions, Pending)>,
    /// The create request etcd has not answered yet.
    in_flight: Option<Pending>,
    routes: HashMap<i64, Route>,
}

async fn run(client: Client, mut cmds: mpsc::UnboundedReceiver<Cmd>, shared: Arc<Shared>) {
    let mut state = State::default();
    let error = match route(client, &mut cmds, &mut state).await {
        Ok(()) => return,
        Err(e) => e,
    };
    debug!(%error, "watch stream failed");
    *shared
        .failure
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(error.clone());
    // Routes end their watches after the responses queued for them; watches waiting for a
    // create, queued or arriving from now on fail at once.
    drop(state.routes);
    let failed = || Err(Ended::Failed(error.clone()));
    let pending = state.in_flight.into_iter();
    for reply in pending.chain(state.queued.into_iter().map(|(_, _, r)| r)) {
        let _ = reply.send(failed());
    }
    cmds.close();
    while let Some(cmd) = cmds.recv().await {
        if let Cmd::Watch { reply, .. } = cmd {
            let _ = reply.send(failed());
        }
    }
}

/// Runs the stream until it fails (`Err`) or every [`Mux`] handle is gone (`Ok`).
async fn route(
    client: Client,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    state: &mut State,
) -> Result<(), String> {
    let mut wc = client
        .watch_client()
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut stream = None;
    let State {
        queued,
        in_flight,
        routes,
    } = state;
    loop {
        if in_flight.is_none() {
            if let Some((key, options, reply)) = queued.pop_front() {
                // Recorded first: if sending fails, the failure is reported to this watch.
                *in_flight = Some(reply);
                match stream.as_mut() {
                    None => {
                        let s = wc
                            .watch(key, Some(options))
                            .await
                            .map_err(|e| format!("open watch stream: {e}"))?;
                        stream = Some(s);
                    }
                    Some(s) => s
                        .watch(key, Some(options))
                        .await
                        .map_err(|e| format!("send watch request: {e}"))?,
                }
            }
        }
        let Some(s) = stream.as_mut() else {
            // Nothing to read before the first watch.
            match cmds.recv().await {
                Some(Cmd::Watch {
                    key,
                    options,
                    reply,
                }) => queued.push_back((key, options, reply)),
                Some(Cmd::Cancel(_)) => {}
                None => return Ok(()),
            }
            continue;
        };
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Watch { key, options, reply }) => queued.push_back((key, options, reply)),
                Some(Cmd::Cancel(id)) => {
                    if routes.remove(&id).is_some() {
                        s.cancel(id).await.map_err(|e| format!("send cancel request: {e}"))?;
                    }
                }
                None => return Ok(()),
            },
            msg = s.message() => {
                let resp = msg
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| "stream closed by the server".to_owned())?;
                let id = resp.watch_id();
                if resp.created() {
                    let Some(reply) = in_flight.take() else {
                        return Err(format!("unexpected created response for watch {id}"));
                    };
                    // The created response goes first, so the watch checks its header and
                    // sees a refusal (`canceled`, e.g. a compacted start revision) itself.
                    let canceled = resp.canceled();
                    let (tx, rx) = mpsc::channel(CAPACITY);
                    let lagged = Arc::new(AtomicBool::new(false));
                    let _ = tx.try_send(Box::new(resp));
                    let accepted = reply.send(Ok(Registered { id, rx, lagged: lagged.clone() }));
                    match (accepted.is_ok(), canceled) {
                        (_, true) => {} // etcd has no such watch
                        (true, false) => {
                            routes.insert(id, Route { tx, lagged });
                        }
                        (false, false) => {
                            // The watcher went away while waiting.
                            s.cancel(id).await.map_err(|e| format!("send cancel request: {e}"))?;
                        }
                    }
                    continue;
                }
                let canceled = resp.canceled();
                let Some(route) = routes.get(&id) else { continue };
                match route.tx.try_send(Box::new(resp)) {
                    Ok(()) if canceled => {
                        // Delivered (compaction or another reason); etcd forgot the watch.
                        routes.remove(&id);
                    }
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        route.lagged.store(true, Ordering::SeqCst);
                        routes.remove(&id);
                        if !canceled {
                            s.cancel(id).await.map_err(|e| format!("send cancel request: {e}"))?;
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        routes.remove(&id);
                        if !canceled {
                            s.cancel(id).await.map_err(|e| format!("send cancel request: {e}"))?;
                        }
                    }
                }
            }
        }
    }
}
