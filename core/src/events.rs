//! Building events: every event gets a UUIDv7 id and its source time here, in one place.

use custos_proto::v1::{event::Payload, Event};

/// Nanoseconds since the Unix epoch, now.
pub fn now_unix_nano() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// A fresh UUIDv7 in canonical text form (time-ordered, so ids sort roughly by creation).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Who and where an event comes from; shared by every event of a session.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub edge_id: String,
    pub session_id: String,
    pub identity: String,
    pub connection: String,
}

impl Origin {
    /// Build an event of this origin with a new id and the current time.
    pub fn event(&self, payload: Payload) -> Event {
        Event {
            id: new_id(),
            time_unix_nano: now_unix_nano(),
            edge_id: self.edge_id.clone(),
            session_id: self.session_id.clone(),
            identity: self.identity.clone(),
            connection: self.connection.clone(),
            payload: Some(payload),
        }
    }
}

/// Why an event is not acceptable into the canonical log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("event bytes are not a custos.v1.Event protobuf: {0}")]
    Undecodable(String),
    #[error("event id {0:?} is not a UUID")]
    BadId(String),
    #[error("event {0} has no payload")]
    NoPayload(String),
}

/// Decode and check an event as the control plane does before it enters the canonical log.
pub fn decode_checked(bytes: &[u8]) -> Result<Event, EventError> {
    use prost::Message;
    let event = Event::decode(bytes).map_err(|e| EventError::Undecodable(e.to_string()))?;
    if uuid::Uuid::parse_str(&event.id).is_err() {
        return Err(EventError::BadId(event.id));
    }
    if event.payload.is_none() {
        return Err(EventError::NoPayload(event.id));
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_proto::v1::SessionStarted;
    use prost::Message;

    #[test]
    fn built_events_pass_the_check() {
        let origin = Origin {
            edge_id: "edge-1".into(),
            identity: "alice".into(),
            ..Default::default()
        };
        let e = origin.event(Payload::SessionStarted(SessionStarted::default()));
        let back = decode_checked(&e.encode_to_vec()).unwrap();
        assert_eq!(back, e);
        assert_eq!(uuid::Uuid::parse_str(&e.id).unwrap().get_version_num(), 7);
    }

    #[test]
    fn malformed_events_are_named() {
        assert!(matches!(
            decode_checked(b"\xff\xff\xff"),
            Err(EventError::Undecodable(_))
        ));
        let no_payload = Event {
            id: new_id(),
            ..Default::default()
        };
        assert!(matches!(
            decode_checked(&no_payload.encode_to_vec()),
            Err(EventError::NoPayload(_))
        ));
        let bad_id = Event {
            id: "not-a-uuid".into(),
            payload: Some(Payload::SessionStarted(SessionStarted::default())),
            ..Default::default()
        };
        assert_eq!(
            decode_checked(&bad_id.encode_to_vec()),
            Err(EventError::BadId("not-a-uuid".into()))
        );
    }
}
