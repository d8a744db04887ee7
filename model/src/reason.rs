//! Why a message goes to DEAD.

/// Why a message went to DEAD. The one table of names: DEAD's subjects and headers, the
/// `dataviz_dead_letters_total` metric, `dataviz dlq --reason`, the dead-letters page and the
/// README all use [`DeadReason::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// The topic is not `gateways/<gateway id>/<device code>`.
    BadTopic,
    /// Over `MAX_PAYLOAD_BYTES`, or over what the NATS server accepts.
    Oversized,
    /// The payload is not UTF-8.
    NotUtf8,
    /// The payload is not JSON.
    BadJson,
    /// JSON, but not the shape of a readings payload.
    BadPayload,
    /// Over `MAX_READINGS_PER_MESSAGE` readings.
    TooManyReadings,
    /// A `ts` this system cannot read.
    BadTs,
    /// A value PostgreSQL cannot store (a NUL character).
    Unstorable,
    /// No gateway with the topic's id.
    UnknownGateway,
    /// A message in RAW that Dataviz did not write.
    ForeignMessage,
    /// A READINGS message the writer cannot read, or a batch PostgreSQL refused.
    BadBatch,
}

impl DeadReason {
    /// Every reason, in the order the README lists them.
    pub const ALL: [DeadReason; 11] = [
        DeadReason::BadTopic,
        DeadReason::BadJson,
        DeadReason::BadPayload,
        DeadReason::BadTs,
        DeadReason::NotUtf8,
        DeadReason::Oversized,
        DeadReason::TooManyReadings,
        DeadReason::UnknownGateway,
        DeadReason::Unstorable,
        DeadReason::ForeignMessage,
        DeadReason::BadBatch,
    ];

    /// The stable name: a subject token, a header value, a metric label.
    pub fn name(self) -> &'static str {
        match self {
            DeadReason::BadTopic => "bad_topic",
            DeadReason::Oversized => "oversized",
            DeadReason::NotUtf8 => "not_utf8",
            DeadReason::BadJson => "bad_json",
            DeadReason::BadPayload => "bad_payload",
            DeadReason::TooManyReadings => "too_many_readings",
            DeadReason::BadTs => "bad_ts",
            DeadReason::Unstorable => "unstorable",
            DeadReason::UnknownGateway => "unknown_gateway",
            DeadReason::ForeignMessage => "foreign_message",
            DeadReason::BadBatch => "bad_batch",
        }
    }

    /// The reason named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<DeadReason> {
        DeadReason::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_one_name() {
        let names: std::collections::HashSet<_> =
            DeadReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), DeadReason::ALL.len());
        for reason in DeadReason::ALL {
            assert_eq!(DeadReason::from_name(reason.name()), Some(reason));
        }
        assert_eq!(DeadReason::from_name("bad"), None);
    }

    #[test]
    fn the_readme_lists_every_reason() {
        let readme = include_str!("../../README.md");
        let listed = readme
            .split_once("Dead-letter reasons:")
            .expect("the README's list of reasons")
            .1
            .split("\n\n")
            .next()
            .unwrap();
        let names: Vec<&str> = listed.split('`').skip(1).step_by(2).collect();
        let expected: Vec<&str> = DeadReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names, expected);
    }
}
