//! The production bus: NATS JetStream.
//!
//! Events are published to `custos.events.<kind>.<connection>` with the event id as `Nats-Msg-Id`
//! into one file-backed stream (default `CUSTOS_EVENTS`) capturing `custos.events.>`. The
//! control-plane leader reads them through a durable pull consumer with explicit acks.
//!
//! Works with nats-server 2.9 and later: only stream/consumer features of 2.9 are used (no KV, no
//! subject transforms, no metadata).

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{
    CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind, PublishError,
    PublishErrorKind,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, ConsumerError, ConsumerErrorKind, RawMessageErrorKind};
use async_nats::jetstream::{self, AckKind};
use async_nats::{ConnectErrorKind, ServerAddr};
use bytes::Bytes;
use custos_proto::v1::{BatchedEvent, EventBatch};
use custos_proto::Event;
use futures::future::BoxFuture;
use futures::StreamExt;
use prost::Message;

use super::{
    check_event, subject_for, unbatch, BusError, Delivery, EventBus, EventSource, PublishAck,
    Stored, BATCH_SUBJECT, EVENTS_SUBJECT_PREFIX,
};

/// How long a nacked event waits before it is redelivered.
const NAK_DELAY: Duration = Duration::from_secs(1);
/// Acks outstanding per consumer before the server stops delivering.
const MAX_ACK_PENDING: i64 = 100_000;

/// The `[bus]` settings for NATS.
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct NatsConfig {
    /// Server URL(s), comma separated: `nats://127.0.0.1:4222`. May embed `user:pass@`; it is
    /// never printed.
    pub url: String,
    /// Name of the JetStream stream holding the events.
    pub stream: String,
    /// Replicas of the stream (1 for a single server; 3 for a 3-node JetStream cluster).
    pub replicas: usize,
    /// Window in which the broker drops re-publishes of the same event id.
    pub duplicate_window_secs: u64,
    /// How long `publish` waits for the JetStream ack (also bounds JetStream API requests).
    pub publish_timeout_ms: u64,
    /// How long connecting may take before the bus is reported unavailable.
    pub connect_timeout_ms: u64,
    /// How long the stream keeps events, in days; 0 keeps them until removed by hand.
    pub max_age_days: u64,
    /// Most events a publisher sends as one bus message. Events that arrive while earlier
    /// publishes wait for their ack go out together, which divides the broker's and the control
    /// plane's per-message cost; an idle publisher still sends each event at once, alone.
    /// 1 sends every event alone.
    pub publish_batch_max: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_string(),
            stream: "CUSTOS_EVENTS".to_string(),
            replicas: 1,
            duplicate_window_secs: 120,
            publish_timeout_ms: 5000,
            connect_timeout_ms: 3000,
            max_age_days: 7,
            publish_batch_max: 64,
        }
    }
}

/// Debug without the credentials a URL may embed.
impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("stream", &self.stream)
            .field("replicas", &self.replicas)
            .field("duplicate_window_secs", &self.duplicate_window_secs)
            .field("publish_timeout_ms", &self.publish_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("max_age_days", &self.max_age_days)
            .field("publish_batch_max", &self.publish_batch_max)
            .finish()
    }
}

/// The environment variable that overrides `[bus.nats] url`, e.g. to keep the credentials a URL
/// embeds out of configuration files.
pub const NATS_URL_ENV: &str = "CUSTOS_NATS_URL";

impl NatsConfig {
    /// Take `url` from [`NATS_URL_ENV`] when it is set and not blank. Config loaders call this
    /// once, after parsing the file.
    pub fn apply_env(&mut self) {
        self.override_url(std::env::var(NATS_URL_ENV).ok());
    }

    fn override_url(&mut self, value: Option<String>) {
        if let Some(url) = value.filter(|u| !u.trim().is_empty()) {
            self.url = url;
        }
    }

    fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: vec![format!("{EVENTS_SUBJECT_PREFIX}.>")],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            num_replicas: self.replicas.max(1),
            duplicate_window: Duration::from_secs(self.duplicate_window_secs),
            max_age: Duration::from_secs(self.max_age_days.saturating_mul(86_400)),
            ..Default::default()
        }
    }
}

/// `url` (one or several, comma separated) without any `user:pass@` / `token@` part.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|part| {
            let part = part.trim();
            let (scheme, rest) = match part.find("://") {
                Some(i) => part.split_at(i + 3),
                None => ("", part),
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}{}", &rest[at + 1..]),
                None => part.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Replace any credentials of `url` that appear in `text` (an error message from below).
fn scrub(text: String, url: &str) -> String {
    let mut text = text;
    for part in url.split(',') {
        let rest = part
            .trim()
            .split_once("://")
            .map_or(part.trim(), |(_, r)| r);
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            if !userinfo.is_empty() {
                text = text.replace(userinfo, "***");
                // Also the parts on their own (user, password), if long enough to be specific.
                for piece in userinfo.split(':').filter(|p| p.len() >= 4) {
                    text = text.replace(piece, "***");
                }
            }
        }
    }
    text
}

/// The NATS JetStream event bus (publishing side). Cheap to clone.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: Arc<NatsConfig>,
    /// The batching task's queue (`publish_batch_max` > 1).
    batcher: Option<tokio::sync::mpsc::Sender<Queued>>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("cfg", &self.cfg)
            .field("state", &self.client.connection_state())
            .finish_non_exhaustive()
    }
}

impl NatsBus {
    /// Connect (bounded by `connect_timeout_ms`: an unreachable server is reported as
    /// [`BusError::Unavailable`], not retried forever), then [`ensure_stream`](Self::ensure_stream).
    /// Once connected, the client reconnects on its own after connection losses.
    pub async fn connect(cfg: NatsConfig) -> Result<Self, BusError> {
        let shown = redact_url(&cfg.url);
        if cfg.publish_timeout_ms == 0 || cfg.connect_timeout_ms == 0 {
            return Err(BusError::Invalid(
                "[bus] publish_timeout_ms and connect_timeout_ms must be greater than 0".into(),
            ));
        }
        if !(1..=10_000).contains(&cfg.publish_batch_max) {
            return Err(BusError::Invalid(format!(
                "[bus] publish_batch_max is {}; it must be between 1 (no batching) and 10000",
                cfg.publish_batch_max
            )));
        }
        let addrs = cfg
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                BusError::Invalid(format!(
                    "[bus] url {shown:?} is not a NATS URL ({}); expected e.g. \
                     nats://127.0.0.1:4222",
                    scrub(e.to_string(), &cfg.url)
                ))
            })?;
        if addrs.is_empty() {
            return Err(BusError::Invalid(
                "[bus] url is empty; set it (or CUSTOS_NATS_URL) to e.g. nats://127.0.0.1:4222"
                    .into(),
            ));
        }

        let connect_timeout = cfg.connect_timeout();
        let unavailable = |detail: String| BusError::Unavailable {
            url: shown.clone(),
            detail: scrub(detail, &cfg.url),
        };
        let options = async_nats::ConnectOptions::new()
            .name("custos")
            .connection_timeout(connect_timeout)
            .request_timeout(Some(cfg.publish_timeout()));
        // `connection_timeout` bounds each TCP/TLS/handshake attempt; the outer bound also covers
        // name resolution and several servers.
        let overall = connect_timeout
            .saturating_mul(addrs.len() as u32)
            .saturating_add(Duration::from_secs(1));
        let client = match tokio::time::timeout(overall, options.connect(addrs)).await {
            Err(_elapsed) => {
                return Err(unavailable(format!(
                    "cannot connect: no answer within {overall:?}"
                )))
            }
            Ok(Err(e)) => {
                return Err(match e.kind() {
                    ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                        BusError::Rejected(scrub(
                            format!(
                                "NATS at {shown} refused the connection ({e}); check the \
                                 credentials in [bus] url / CUSTOS_NATS_URL"
                            ),
                            &cfg.url,
                        ))
                    }
                    ConnectErrorKind::TimedOut => unavailable(format!(
                        "cannot connect: no answer within {connect_timeout:?} ({e})"
                    )),
                    _ => unavailable(format!("cannot connect ({e})")),
                })
            }
            Ok(Ok(client)) => client,
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.publish_timeout())
            .backpressure_on_inflight(true)
            .build(client.clone());
        let max = cfg.publish_batch_max;
        let mut bus = NatsBus {
            client,
            js,
            cfg: Arc::new(cfg),
            batcher: None,
        };
        bus.ensure_stream().await?;
        if max > 1 {
            let (tx, rx) = tokio::sync::mpsc::channel(max.saturating_mul(4));
            tokio::spawn(run_batcher(bus.clone(), rx, max));
            bus.batcher = Some(tx);
        }
        Ok(bus)
    }

    /// Create the event stream if it does not exist: subjects `custos.events.>`, file storage,
    /// the configured duplicate window, replicas and max age. An existing stream is used as it
    /// is (its settings are never changed here; differences are logged).
    pub async fn ensure_stream(&self) -> Result<(), BusError> {
        let wanted = self.cfg.stream_config();
        let name = &self.cfg.stream;
        let bound = self.cfg.publish_timeout().saturating_mul(3);
        let stream =
            match tokio::time::timeout(bound, self.js.get_or_create_stream(wanted.clone())).await {
                Err(_elapsed) => {
                    return Err(BusError::Timeout {
                        what: format!("JetStream answer while creating stream {name}"),
                        after: bound,
                    })
                }
                Ok(Err(e)) => return Err(self.create_stream_error(e)),
                Ok(Ok(stream)) => stream,
            };
        let have = &stream.cached_info().config;
        let ours = format!("{EVENTS_SUBJECT_PREFIX}.>");
        if !have
            .subjects
            .iter()
            .any(|s| *s == ours || s == "custos.>" || s == ">")
        {
            return Err(BusError::Rejected(format!(
                "stream {name} exists but captures {:?}, not {ours}; point [bus] stream at \
                 another name or fix the stream's subjects (nats stream edit {name})",
                have.subjects
            )));
        }
        if have.duplicate_window != wanted.duplicate_window
            || have.max_age != wanted.max_age
            || have.num_replicas != wanted.num_replicas
            || have.storage != wanted.storage
        {
            tracing::warn!(
                stream = %name,
                duplicate_window = ?have.duplicate_window,
                max_age = ?have.max_age,
                replicas = have.num_replicas,
                storage = ?have.storage,
                "the existing event stream differs from [bus] settings; it is used as it is"
            );
        }
        Ok(())
    }

    /// The JetStream context (API timeout = `publish_timeout_ms`).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The underlying NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The settings this bus was connected with.
    pub fn config(&self) -> &NatsConfig {
        &self.cfg
    }

    /// A durable pull consumer named `durable` on the event stream (explicit acks, from the
    /// first event, unlimited redeliveries, redelivery after `ack_wait` without ack). If it
    /// already exists it is bound as it is.
    pub async fn source(&self, durable: &str, ack_wait: Duration) -> Result<NatsSource, BusError> {
        if durable.is_empty()
            || !durable
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(BusError::Invalid(format!(
                "consumer name {durable:?} must be non-empty and use only A-Z, a-z, 0-9, '_' and '-'"
            )));
        }
        let name = &self.cfg.stream;
        let bound = self.cfg.publish_timeout().saturating_mul(3);
        let timeout = |what: &str| BusError::Timeout {
            what: format!("JetStream answer while {what}"),
            after: bound,
        };
        let stream = tokio::time::timeout(bound, self.js.get_stream(name))
            .await
            .map_err(|_| timeout(&format!("looking up stream {name}")))?
            .map_err(|e| self.get_stream_error(e))?;
        let config = pull::Config {
            durable_name: Some(durable.to_string()),
            description: Some("custos event ingest".to_string()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait,
            max_deliver: -1,
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        };
        let consumer: PullConsumer =
            tokio::time::timeout(bound, stream.get_or_create_consumer(durable, config))
                .await
                .map_err(|_| timeout(&format!("creating consumer {durable} on stream {name}")))?
                .map_err(|e| self.consumer_error(e, durable))?;
        let have = &consumer.cached_info().config;
        if have.ack_wait != ack_wait || have.ack_policy != AckPolicy::Explicit {
            tracing::warn!(
                consumer = %durable,
                ack_wait = ?have.ack_wait,
                ack_policy = ?have.ack_policy,
                "the existing consumer differs from the requested settings; it is used as it is"
            );
        }
        Ok(NatsSource {
            consumer,
            stream,
            client: self.client.clone(),
            cfg: self.cfg.clone(),
            durable: durable.to_string(),
            backlog: None,
            pull: None,
        })
    }

    fn unavailable(&self, detail: String) -> BusError {
        BusError::Unavailable {
            url: redact_url(&self.cfg.url),
            detail: scrub(detail, &self.cfg.url),
        }
    }

    fn create_stream_error(&self, e: CreateStreamError) -> BusError {
        let name = &self.cfg.stream;
        match e.kind() {
            CreateStreamErrorKind::JetStreamUnavailable => self.unavailable(
                "JetStream does not answer (no responders): the server runs without JetStream; \
                 start nats-server with -js (or a jetstream {} block in its config)"
                    .into(),
            ),
            CreateStreamErrorKind::TimedOut => BusError::Timeout {
                what: format!("JetStream answer while creating stream {name}"),
                after: self.cfg.publish_timeout(),
            },
            CreateStreamErrorKind::JetStream(err) => BusError::Rejected(format!(
                "creating stream {name} (subjects {EVENTS_SUBJECT_PREFIX}.>, replicas {}): {err}",
                self.cfg.replicas
            )),
            CreateStreamErrorKind::EmptyStreamName | CreateStreamErrorKind::InvalidStreamName => {
                BusError::Invalid(format!(
                    "[bus] stream {name:?} is not a valid stream name (use A-Z, a-z, 0-9, '_', '-')"
                ))
            }
            _ => self.unavailable(format!("creating stream {name}: {e}")),
        }
    }

    fn get_stream_error(&self, e: GetStreamError) -> BusError {
        let name = &self.cfg.stream;
        match e.kind() {
            GetStreamErrorKind::JetStream(err) if err.code() == 404 => BusError::Rejected(format!(
                "stream {name} does not exist; it is created when custos connects to the bus \
                 (NatsBus::ensure_stream) - restart the control plane"
            )),
            GetStreamErrorKind::JetStream(err) => {
                BusError::Rejected(format!("looking up stream {name}: {err}"))
            }
            GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => {
                BusError::Invalid(format!("[bus] stream {name:?} is not a valid stream name"))
            }
            GetStreamErrorKind::Request => {
                self.unavailable(format!("looking up stream {name}: {e}"))
            }
        }
    }

    fn consumer_error(&self, e: ConsumerError, durable: &str) -> BusError {
        let name = &self.cfg.stream;
        match e.kind() {
            ConsumerErrorKind::JetStream(err) => BusError::Rejected(format!(
                "creating consumer {durable} on stream {name}: {err}"
            )),
            ConsumerErrorKind::TimedOut => BusError::Timeout {
                what: format!("JetStream answer while creating consumer {durable}"),
                after: self.cfg.publish_timeout(),
            },
            ConsumerErrorKind::InvalidConsumerType => BusError::Rejected(format!(
                "consumer {durable} on stream {name} exists but is not a pull consumer; delete it \
                 (nats consumer rm {name} {durable}) or use another name"
            )),
            _ => self.unavailable(format!("creating consumer {durable} on stream {name}: {e}")),
        }
    }

    /// No ack in time: a lost connection is `Unavailable`, otherwise `Timeout`.
    fn no_ack(&self, id: &str, subject: &str, after: Duration) -> BusError {
        if self.client.connection_state() != State::Connected {
            self.unavailable(format!(
                "connection lost; event {} on {subject} was not acknowledged within {after:?} \
                 (the client keeps reconnecting)",
                id
            ))
        } else {
            BusError::Timeout {
                what: format!("JetStream ack for event {id} on {subject}"),
                after,
            }
        }
    }

    fn publish_error(&self, e: PublishError, id: &str, subject: &str, after: Duration) -> BusError {
        match e.kind() {
            PublishErrorKind::TimedOut => self.no_ack(id, subject, after),
            PublishErrorKind::StreamNotFound => self.unavailable(format!(
                "no JetStream stream takes {subject} (no responders): JetStream is off or stream \
                 {} was removed; restart the control plane to recreate it",
                self.cfg.stream
            )),
            PublishErrorKind::BrokenPipe => self.unavailable(format!(
                "connection lost while waiting for the ack of event {id}"
            )),
            PublishErrorKind::MaxAckPending => self.unavailable(format!(
                "too many publishes awaiting acks; event {id} was not sent"
            )),
            PublishErrorKind::MaxPayloadExceeded => BusError::Rejected(format!(
                "event {id} is larger than the server's max_payload ({e}); raise max_payload in \
                 the nats-server configuration or lower the connection's result excerpt cap"
            )),
            PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
                BusError::Rejected(format!("publishing event {id} on {subject}: {e}"))
            }
            PublishErrorKind::Other => {
                let js_error = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<jetstream::Error>());
                match js_error {
                    Some(err)
                        if [
                            jetstream::ErrorCode::INSUFFICIENT_RESOURCES,
                            jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED,
                        ]
                        .contains(&err.error_code()) =>
                    {
                        BusError::Rejected(format!(
                            "stream {} refused event {id} on {subject} because JetStream storage \
                             is full ({err}); give the NATS servers more room (jetstream \
                             max_file_store, disk), or free the stream once the control plane \
                             has ingested it (custos_bus_consumer_pending is 0): nats stream \
                             purge {}",
                            self.cfg.stream, self.cfg.stream
                        ))
                    }
                    Some(err) => BusError::Rejected(format!(
                        "stream {} refused event {id} on {subject}: {err}",
                        self.cfg.stream
                    )),
                    None => self.unavailable(format!("publishing event {id} on {subject}: {e}")),
                }
            }
        }
    }
}

impl NatsBus {
    /// Publish one message and wait for its JetStream ack, bounded by `publish_timeout_ms`.
    /// `id` names the event(s) in errors.
    async fn publish_raw(
        &self,
        subject: String,
        payload: Bytes,
        msg_id: &str,
        id: &str,
    ) -> Result<PublishAck, BusError> {
        let after = self.cfg.publish_timeout();
        let attempt = async {
            let ack = self
                .js
                .send_publish(
                    subject.clone(),
                    PublishMessage::build().payload(payload).message_id(msg_id),
                )
                .await?;
            ack.await
        };
        match tokio::time::timeout(after, attempt).await {
            Err(_elapsed) => Err(self.no_ack(id, &subject, after)),
            Ok(Err(e)) => Err(self.publish_error(e, id, &subject, after)),
            Ok(Ok(ack)) => Ok(PublishAck {
                stream_seq: ack.sequence,
                duplicate: ack.duplicate,
            }),
        }
    }

    /// Publish what the batcher collected: one event as itself, several as one [`EventBatch`],
    /// and tell every waiting publisher the outcome.
    async fn publish_collected(&self, batch: Vec<Queued>) {
        if let [one] = batch.as_slice() {
            let r = self
                .publish_raw(one.subject.clone(), one.data.clone(), &one.id, &one.id)
                .await;
            for q in batch {
                let _ = q.done.send(r.clone());
            }
            return;
        }
        let id = format!("{} (+{} batched)", batch[0].id, batch.len() - 1);
        let msg_id = batch_msg_id(batch.iter().map(|q| q.id.as_str()));
        let payload = EventBatch {
            events: batch
                .iter()
                .map(|q| BatchedEvent {
                    subject: q.subject.clone(),
                    event: q.data.to_vec(),
                })
                .collect(),
        }
        .encode_to_vec();
        let r = self
            .publish_raw(BATCH_SUBJECT.to_string(), payload.into(), &msg_id, &id)
            .await;
        for q in batch {
            let _ = q.done.send(r.clone());
        }
    }
}

/// The `Nats-Msg-Id` of a batch: a digest of every event id in it, in order. The broker drops a
/// re-publish of the very same batch, and only that: a batch that merely starts with the same
/// event, or has as many events, is a different message (naming a batch by its first id and
/// count would make the broker drop, as a "duplicate", a retry batch holding other events).
fn batch_msg_id<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for id in ids {
        h.update((id.len() as u64).to_le_bytes());
        h.update(id.as_bytes());
    }
    format!("batch:{}", hex::encode(&h.finalize()[..16]))
}

/// Most bytes of events in one batch; an event this large or larger is published alone. Well
/// under nats-server's default `max_payload` of 1 MiB.
const BATCH_MAX_BYTES: usize = 256 * 1024;
/// Batches a publisher has waiting for their JetStream ack at once; events arriving meanwhile
/// gather into the next batch.
const BATCHES_IN_FLIGHT: usize = 2;

/// An event waiting in the batcher.
struct Queued {
    id: String,
    subject: String,
    data: Bytes,
    done: tokio::sync::oneshot::Sender<Result<PublishAck, BusError>>,
}

/// Gather queued events into batches and publish them, at most [`BATCHES_IN_FLIGHT`] at a time.
/// Nothing waits to fill a batch: an event that finds a free slot goes out at once (alone, when
/// it is the only one queued), so batching costs no latency when the bus is idle. Ends when every
/// [`NatsBus`] clone that feeds it is dropped.
async fn run_batcher(bus: NatsBus, mut rx: tokio::sync::mpsc::Receiver<Queued>, max: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    let mut carry: Option<Queued> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut bytes = first.data.len();
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(q) if bytes + q.data.len() > BATCH_MAX_BYTES => {
                    carry = Some(q);
                    break;
                }
                Ok(q) => {
                    bytes += q.data.len();
                    batch.push(q);
                }
                Err(_) => break,
            }
        }
        let bus = bus.clone();
        tokio::spawn(async move {
            bus.publish_collected(batch).await;
            drop(slot);
        });
    }
}

impl EventBus for NatsBus {
    fn publish<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<PublishAck, BusError>> {
        Box::pin(async move {
            check_event(event)?;
            let subject = subject_for(event);
            let payload = Bytes::from(event.encode_to_vec());
            match &self.batcher {
                Some(tx) if payload.len() < BATCH_MAX_BYTES => {
                    let (done, answer) = tokio::sync::oneshot::channel();
                    let queued = Queued {
                        id: event.id.clone(),
                        subject: subject.clone(),
                        data: payload,
                        done,
                    };
                    let after = self.cfg.publish_timeout();
                    // One bound for the queue and the ack together, as for an unbatched publish.
                    let queued_and_acked = async {
                        if tx.send(queued).await.is_err() {
                            return Err(self.unavailable(format!(
                                "the publisher's batching task has stopped; event {} was not \
                                 sent (restart the process)",
                                event.id
                            )));
                        }
                        answer.await.unwrap_or_else(|_| {
                            Err(self.unavailable(format!(
                                "the publisher's batching task stopped before event {} was \
                                 acknowledged",
                                event.id
                            )))
                        })
                    };
                    match tokio::time::timeout(after, queued_and_acked).await {
                        Ok(r) => r,
                        Err(_) => Err(self.no_ack(&event.id, &subject, after)),
                    }
                }
                _ => {
                    self.publish_raw(subject, payload, &event.id, &event.id)
                        .await
                }
            }
        })
    }
}

/// The NATS JetStream event source: a durable pull consumer.
pub struct NatsSource {
    consumer: PullConsumer,
    stream: stream::Stream,
    client: async_nats::Client,
    cfg: Arc<NatsConfig>,
    durable: String,
    /// Messages the server still had for this consumer after the last fetch.
    backlog: Option<u64>,
    /// The open pull ([`NatsSource::pull`]); `None` until the first fetch and after it failed.
    pull: Option<pull::Stream>,
}

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("stream", &self.cfg.stream)
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

impl NatsSource {
    /// Name of the durable consumer.
    pub fn durable(&self) -> &str {
        &self.durable
    }

    /// The consumer handle, e.g. to query its state (`info()`).
    pub fn consumer(&mut self) -> &mut PullConsumer {
        &mut self.consumer
    }

    fn unavailable(&self, detail: String) -> BusError {
        BusError::Unavailable {
            url: redact_url(&self.cfg.url),
            detail: scrub(detail, &self.cfg.url),
        }
    }

    /// The consumer's persistent pull: one subscription for the life of the source, topped up by
    /// the client as it drains. A pull per fetch cost the broker a subscription, an unsubscription
    /// and a JetStream API request for every handful of messages (in the Postgres benchmark,
    /// nats-server's CPU per statement fell from 138 to 112–116 µs with this change).
    async fn pull(&mut self) -> Result<&mut pull::Stream, BusError> {
        if self.pull.is_none() {
            let bound = self.cfg.publish_timeout();
            let request = self
                .consumer
                .stream()
                .max_messages_per_batch(PULL_BATCH)
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_HEARTBEAT)
                .messages();
            let stream = match tokio::time::timeout(bound, request).await {
                Err(_elapsed) => {
                    return Err(BusError::Timeout {
                        what: format!(
                            "JetStream answer opening a pull on consumer {} of stream {}",
                            self.durable, self.cfg.stream
                        ),
                        after: bound,
                    })
                }
                Ok(Err(e)) => {
                    return Err(self.unavailable(format!(
                        "pulling from consumer {} of stream {}: {e}",
                        self.durable, self.cfg.stream
                    )))
                }
                Ok(Ok(s)) => s,
            };
            self.pull = Some(stream);
        }
        Ok(self.pull.as_mut().expect("set above"))
    }

    async fn fetch_inner(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut backlog = None;
        let mut failed = None;
        {
            let cfg = self.cfg.clone();
            let pull = match self.pull().await {
                Ok(p) => p,
                Err(e) => {
                    self.backlog = None;
                    return Err(e);
                }
            };
            // Wait up to `wait` for the first message, then take only what is already here: the
            // caller commits a batch as soon as it has one instead of waiting to fill `max`.
            let mut next = tokio::time::timeout(wait, pull.next()).await.ok();
            while let Some(item) = next.take() {
                match item {
                    None => {
                        failed = Some("the pull ended".to_string());
                        break;
                    }
                    Some(Err(e)) => {
                        // A missed heartbeat, a lost connection, or a status from the server
                        // ending the pull (e.g. 409 leadership change or consumer deleted). What
                        // arrived before it is still handed over; the pull is opened anew.
                        failed = Some(e.to_string());
                        break;
                    }
                    Some(Ok(message)) => {
                        let info = message.info().ok();
                        backlog = info.as_ref().map(|i| i.pending);
                        let seq = info.map_or(0, |i| i.stream_sequence);
                        let mut events = unbatch(&message.subject, &message.payload);
                        // Every event but the last of a batch: the message is acked with the last.
                        let last = events.pop();
                        out.extend(events.into_iter().map(|(subject, data)| Delivery {
                            seq,
                            data,
                            subject,
                            acker: super::Acker::InBatch,
                        }));
                        if let Some((subject, data)) = last {
                            out.push(Delivery {
                                seq,
                                data,
                                subject,
                                acker: super::Acker::Nats(Box::new(Acker {
                                    message,
                                    cfg: cfg.clone(),
                                })),
                            });
                        }
                    }
                }
                if out.len() >= max {
                    break;
                }
                next = futures::FutureExt::now_or_never(pull.next());
            }
        }
        if let Some(e) = failed {
            self.pull = None;
            if out.is_empty() {
                self.backlog = None;
                return Err(self.unavailable(format!(
                    "pulling from consumer {} of stream {}: {e}",
                    self.durable, self.cfg.stream
                )));
            }
            tracing::debug!(error = %e, "pull ended early");
        }
        if out.is_empty() && self.client.connection_state() != State::Connected {
            self.backlog = None;
            return Err(self.unavailable(
                "not connected to the server (the client keeps reconnecting)".into(),
            ));
        }
        // Nothing for the whole wait on a live pull means nothing was pending.
        self.backlog = if out.is_empty() { Some(0) } else { backlog };
        Ok(out)
    }
}

/// Messages one pull request asks for; the client sends the next request before they run out.
const PULL_BATCH: usize = 256;
/// How long one pull request stays open on the server before the client renews it. Short, so the
/// pull of a control plane that died (or lost leadership) stops taking messages soon: what it took
/// meanwhile waits out the ack wait, and the new leader reads such gaps back from the stream.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// The server's idle heartbeat on an open pull; two missed ones end the pull with an error.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

impl EventSource for NatsSource {
    fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Delivery>, BusError>> {
        Box::pin(self.fetch_inner(max, wait))
    }

    fn backlog(&self) -> Option<u64> {
        self.backlog
    }

    fn get(&mut self, seq: u64) -> BoxFuture<'_, Result<Option<Stored>, BusError>> {
        Box::pin(async move {
            let bound = self.cfg.publish_timeout();
            match tokio::time::timeout(bound, self.stream.get_raw_message(seq)).await {
                Err(_elapsed) => Err(BusError::Timeout {
                    what: format!(
                        "JetStream answer reading sequence {seq} of stream {}",
                        self.cfg.stream
                    ),
                    after: bound,
                }),
                Ok(Ok(m)) => Ok(Some(Stored {
                    data: m.payload,
                    subject: m.subject.to_string(),
                })),
                Ok(Err(e)) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
                Ok(Err(e)) => Err(self.unavailable(format!(
                    "reading sequence {seq} of stream {}: {e}",
                    self.cfg.stream
                ))),
            }
        })
    }

    fn settled_tail(&mut self) -> BoxFuture<'_, Result<Option<u64>, BusError>> {
        Box::pin(async move {
            let bound = self.cfg.publish_timeout();
            let name = self.cfg.stream.clone();
            let timeout = |what: &str| BusError::Timeout {
                what: format!("JetStream answer reading the {what}"),
                after: bound,
            };
            // The stream first: an event stored after this read leaves the consumer pending, so
            // a consumer seen idle afterwards has handed out everything up to `last`.
            let last = match tokio::time::timeout(bound, self.stream.info()).await {
                Err(_) => return Err(timeout(&format!("state of stream {name}"))),
                Ok(Err(e)) => {
                    return Err(self.unavailable(format!("reading the state of stream {name}: {e}")))
                }
                Ok(Ok(info)) => info.state.last_sequence,
            };
            let durable = self.durable.clone();
            let idle = match tokio::time::timeout(bound, self.consumer.info()).await {
                Err(_) => return Err(timeout(&format!("state of consumer {durable}"))),
                Ok(Err(e)) => {
                    return Err(self.unavailable(format!(
                        "reading the state of consumer {durable} of stream {name}: {e}"
                    )))
                }
                Ok(Ok(info)) => info.num_pending == 0 && info.num_ack_pending == 0,
            };
            Ok(idle.then_some(last))
        })
    }

    fn connects(&self) -> u64 {
        self.client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn bounds(&mut self) -> BoxFuture<'_, Result<Option<(u64, u64)>, BusError>> {
        Box::pin(async move {
            let bound = self.cfg.publish_timeout();
            let name = self.cfg.stream.clone();
            match tokio::time::timeout(bound, self.stream.info()).await {
                Err(_) => Err(BusError::Timeout {
                    what: format!("JetStream answer reading the state of stream {name}"),
                    after: bound,
                }),
                Ok(Err(e)) => {
                    Err(self.unavailable(format!("reading the state of stream {name}: {e}")))
                }
                Ok(Ok(info)) => Ok(Some((info.state.first_sequence, info.state.last_sequence))),
            }
        })
    }
}

/// The private acker of a NATS delivery.
pub(super) struct Acker {
    message: jetstream::Message,
    cfg: Arc<NatsConfig>,
}

impl Acker {
    async fn send(self, kind: AckKind, what: &str) -> Result<(), BusError> {
        let bound = Duration::from_millis(self.cfg.publish_timeout_ms);
        let unavailable = |detail: String| BusError::Unavailable {
            url: redact_url(&self.cfg.url),
            detail: scrub(detail, &self.cfg.url),
        };
        match tokio::time::timeout(bound, self.message.ack_with(kind)).await {
            Err(_elapsed) => Err(unavailable(format!(
                "could not send the {what} for {} within {bound:?}; it is redelivered after the \
                 ack wait",
                self.message.subject
            ))),
            Ok(Err(e)) => Err(unavailable(format!(
                "could not send the {what} for {} ({e}); it is redelivered after the ack wait",
                self.message.subject
            ))),
            Ok(Ok(())) => Ok(()),
        }
    }

    pub(super) async fn ack(self) -> Result<(), BusError> {
        self.send(AckKind::Ack, "ack").await
    }

    pub(super) async fn nack(self, reason: &str) -> Result<(), BusError> {
        tracing::debug!(subject = %self.message.subject, reason, "nack: event will be redelivered");
        self.send(AckKind::Nak(Some(NAK_DELAY)), "nack").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_printed_without_credentials() {
        assert_eq!(
            redact_url("nats://alice:s3cret@nats.example:4222"),
            "nats://nats.example:4222"
        );
        assert_eq!(redact_url("tok3n@10.0.0.1:4222"), "10.0.0.1:4222");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(
            redact_url("nats://a:b@h1:4222, tls://c:d@h2:4443/x@y"),
            "nats://h1:4222,tls://h2:4443/x@y"
        );
        let cfg = NatsConfig {
            url: "nats://alice:s3cret@nats.example:4222".into(),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("s3cret"));
        assert_eq!(
            scrub("failed: nats://alice:s3cret@x and s3cret".into(), &cfg.url),
            "failed: nats://***@x and ***"
        );
    }

    #[test]
    fn config_defaults_and_partial_toml_like_input() {
        let cfg: NatsConfig = serde_json::from_str(r#"{"url":"nats://n:4222"}"#).unwrap();
        assert_eq!(cfg.url, "nats://n:4222");
        assert_eq!(cfg.stream, "CUSTOS_EVENTS");
        assert_eq!(cfg.replicas, 1);
        assert_eq!(cfg.duplicate_window_secs, 120);
        assert_eq!(cfg.publish_timeout_ms, 5000);
        assert_eq!(cfg.connect_timeout_ms, 3000);
        assert_eq!(cfg.max_age_days, 7);
        let sc = cfg.stream_config();
        assert_eq!(sc.subjects, ["custos.events.>"]);
        assert_eq!(sc.max_age, Duration::from_secs(7 * 86_400));
        let unlimited = NatsConfig {
            max_age_days: 0,
            ..Default::default()
        };
        assert_eq!(unlimited.stream_config().max_age, Duration::ZERO);
    }

    #[test]
    fn a_batch_msg_id_names_exactly_its_events() {
        let id = |ids: &[&str]| batch_msg_id(ids.iter().copied());
        assert_eq!(id(&["a", "b", "c"]), id(&["a", "b", "c"]));
        assert!(id(&["a", "b"]).starts_with("batch:"));
        // Same first event and count, other events: a different message.
        assert_ne!(id(&["a", "b", "c"]), id(&["a", "b", "d"]));
        assert_ne!(id(&["a", "b"]), id(&["b", "a"]));
        // Length-prefixed: ids cannot run into each other.
        assert_ne!(id(&["ab", "c"]), id(&["a", "bc"]));
    }

    #[test]
    fn the_environment_overrides_the_url_only_when_set_and_not_blank() {
        let mut cfg = NatsConfig {
            url: "nats://from-file:4222".into(),
            ..Default::default()
        };
        cfg.override_url(None);
        assert_eq!(cfg.url, "nats://from-file:4222");
        cfg.override_url(Some("  ".into()));
        assert_eq!(cfg.url, "nats://from-file:4222");
        cfg.override_url(Some("nats://u:p@from-env:4222".into()));
        assert_eq!(cfg.url, "nats://u:p@from-env:4222");
    }

    #[tokio::test]
    async fn invalid_settings_are_refused_before_connecting() {
        let err = NatsBus::connect(NatsConfig {
            publish_timeout_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(matches!(err, BusError::Invalid(_)), "{err}");
        for publish_batch_max in [0, 10_001] {
            let err = NatsBus::connect(NatsConfig {
                publish_batch_max,
                ..Default::default()
            })
            .await
            .unwrap_err();
            assert!(
                matches!(&err, BusError::Invalid(m) if m.contains("publish_batch_max")),
                "{err}"
            );
        }
        let err = NatsBus::connect(NatsConfig {
            url: " , ".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(matches!(err, BusError::Invalid(_)), "{err}");
    }
}
