//! Every option of the configuration file declared once: its name, default, bounds and what it
//! does. Parsing reads defaults and bounds from here, error messages name the bounds, and the
//! commented example in README's Configuration section is [`reference()`] (a test keeps them
//! equal).

/// A whole-number option.
#[derive(Debug, Clone, Copy)]
pub struct Number {
    pub name: &'static str,
    pub default: u64,
    pub min: u64,
    pub max: u64,
    pub doc: &'static str,
}

/// A text option (a URL, a name, one of a few words), with the environment variable (and flag)
/// that overrides it. `default` is `None` for an option that is off unless set.
#[derive(Debug, Clone, Copy)]
pub struct Text {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub env: Option<&'static str>,
    pub doc: &'static str,
}

pub const DATABASE_URL: Text = Text {
    name: "database_url",
    default: Some("postgres://localhost/postgres"),
    env: Some("DATABASE_URL"),
    doc: "",
};
pub const REDIS_URL: Text = Text {
    name: "redis_url",
    default: Some("redis://127.0.0.1:6379"),
    env: Some("REDIS_URL"),
    doc: "",
};
pub const CHANNEL: Text = Text {
    name: "channel",
    default: Some("cache_invalidation"),
    env: Some("EVICTD_CHANNEL"),
    doc: "NOTIFY channel",
};
pub const KEY_PREFIX: Text = Text {
    name: "key_prefix",
    default: Some("cache:"),
    env: Some("EVICTD_KEY_PREFIX"),
    doc: "",
};
pub const DELIVERY: Text = Text {
    name: "delivery",
    default: Some("outbox"),
    env: Some("EVICTD_DELIVERY"),
    doc: "or \"notify\" or \"logical\"; applies to `migrate`",
};
pub const HTTP_ADDR: Text = Text {
    name: "http_addr",
    default: Some("127.0.0.1:9750"),
    env: Some("EVICTD_HTTP_ADDR"),
    doc: "/metrics, /healthz, /readyz",
};
pub const LOG_FORMAT: Text = Text {
    name: "log_format",
    default: Some("text"),
    env: Some("EVICTD_LOG_FORMAT"),
    doc: "or \"json\"; filter with EVICTD_LOG",
};
pub const OUTBOX_WAKEUP: Text = Text {
    name: "outbox_wakeup",
    default: Some("doorbell"),
    env: None,
    doc: "NOTIFY only while no daemon drains; or \"notify\": one per commit\n(writers serialise), or \"poll\": none (~10-50 ms lag)",
};
pub const TRIGGER_FIRING: Text = Text {
    name: "trigger_firing",
    default: Some("origin"),
    env: None,
    doc: "or \"always\": also under session_replication_role = replica\n(restores, subscribers); applies to `migrate`",
};
pub const LOGICAL_STREAMING: Text = Text {
    name: "logical_streaming",
    default: Some("off"),
    env: None,
    doc: "logical: or \"on\": transactions outgrowing logical_decoding_work_mem\nare streamed in progress, not spilled to the server's disk (their\ninvalidation then starts at their commit: slower for huge ones)",
};
pub const TLS_CA_FILE: Text = Text {
    name: "tls_ca_file",
    default: None,
    env: Some("EVICTD_TLS_CA_FILE"),
    doc: "extra CA for PostgreSQL and Redis TLS",
};
pub const PUBLISH_CHANNEL: Text = Text {
    name: "publish_channel",
    default: None,
    env: None,
    doc: "PUBLISH each batch's tags as JSON",
};

pub const REVALIDATED_TAGS_KEY: Text = Text {
    name: "revalidated_tags_key",
    default: None,
    env: None,
    doc: "also record invalidated tags in @fortedigital/nextjs-cache-handler's hash (KEYPREFIX__revalidated_tags__)",
};

pub const TAGTS_TTL_SECS: Number = Number {
    name: "tagts_ttl_secs",
    default: 86_400,
    min: 1,
    max: u64::MAX,
    doc: "lifetime of cache:tagts:* markers",
};
pub const BATCH_MAX_EVENTS: Number = Number {
    name: "batch_max_events",
    default: 10_000,
    min: 1,
    max: u64::MAX,
    doc: "notify, outbox: most events (notifications, outbox rows) in one batch",
};
/// 20 ms: `logical` is the low-overhead delivery (latency budget 100 ms). Against 5 ms, at
/// 6,000–9,000 durable commits/s on two shared cores, it halves the daemon's and Redis' CPU
/// per commit again and gives the writers a point or three (BENCHMARKS.md); p99 22–34 ms.
/// Past a second the daemon would look stuck to anyone watching the cache.
pub const BATCH_LINGER_MS: Number = Number {
    name: "batch_linger_ms",
    default: 20,
    min: 0,
    max: 1_000,
    doc: "logical: under load, a batch gathers what arrives this long after the last",
};
pub const DRAIN_CHUNK: Number = Number {
    name: "drain_chunk",
    default: 250,
    min: 1,
    max: u64::MAX,
    doc: "members removed per Redis command (bounds blocking: ~1 ms each)",
};
pub const WIDE_ROW_THRESHOLD: Number = Number {
    name: "wide_row_threshold",
    default: 150_000,
    min: 1,
    max: u64::MAX,
    doc: "outbox/logical: statements (transactions) over this many rows of a table go table-wide",
};
pub const OUTBOX_POLL_MAX_MS: Number = Number {
    name: "outbox_poll_max_ms",
    default: 50,
    min: 1,
    max: u64::MAX,
    doc: "poll mode: the longest pause between two polls when idle",
};
pub const NOTIFY_BUFFER: Number = Number {
    name: "notify_buffer",
    default: 100_000,
    min: 1,
    max: u64::MAX,
    doc: "notify mode: events buffered while Redis is down",
};
pub const HEALTH_INTERVAL_MS: Number = Number {
    name: "health_interval_ms",
    default: 5_000,
    min: 1,
    max: u64::MAX,
    doc: "ping both servers; a frozen connection is noticed within two",
};
pub const LIVENESS_TIMEOUT_SECS: Number = Number {
    name: "liveness_timeout_secs",
    default: 60,
    min: 1,
    max: 86_400,
    doc: "no progress this long: /healthz fails, systemd's watchdog starves",
};
pub const SECOND_PASS_MS: Number = Number {
    name: "second_pass_ms",
    default: 0,
    min: 0,
    max: u64::MAX,
    doc: ">0: invalidate each batch's tags again after this delay",
};
pub const SWEEP_INTERVAL_SECS: Number = Number {
    name: "sweep_interval_secs",
    default: 300,
    min: 0,
    max: u64::MAX,
    doc: "tag-set hygiene sweep every 5 minutes; 0 switches it off",
};
pub const SWEEP_RATE: Number = Number {
    name: "sweep_rate",
    default: 5_000,
    min: 1,
    max: u64::MAX,
    doc: "tag-set members the sweep examines per second at most",
};

/// The file's options in the order README lists them: text first, then numbers.
pub const TEXT: [Text; 10] = [
    DATABASE_URL,
    REDIS_URL,
    CHANNEL,
    KEY_PREFIX,
    DELIVERY,
    HTTP_ADDR,
    LOG_FORMAT,
    OUTBOX_WAKEUP,
    TRIGGER_FIRING,
    LOGICAL_STREAMING,
];
pub const NUMBERS: [Number; 12] = [
    TAGTS_TTL_SECS,
    BATCH_MAX_EVENTS,
    BATCH_LINGER_MS,
    DRAIN_CHUNK,
    WIDE_ROW_THRESHOLD,
    OUTBOX_POLL_MAX_MS,
    NOTIFY_BUFFER,
    HEALTH_INTERVAL_MS,
    LIVENESS_TIMEOUT_SECS,
    SECOND_PASS_MS,
    SWEEP_INTERVAL_SECS,
    SWEEP_RATE,
];
/// Options that are off unless set, listed commented out.
pub const OPTIONAL: [Text; 3] = [TLS_CA_FILE, PUBLISH_CHANNEL, REVALIDATED_TAGS_KEY];

impl Number {
    /// What a value out of bounds is told.
    pub fn bounds_problem(&self, value: u64) -> Option<String> {
        if value < self.min {
            Some(format!("{} must be at least {}", self.name, self.min))
        } else if value > self.max {
            Some(format!("{} must be at most {}", self.name, self.max))
        } else {
            None
        }
    }
}

/// Column of the comments in [`reference`].
const COMMENT_AT: usize = 36;

/// The commented example of every option at its default, as README shows it.
pub fn reference() -> String {
    let mut out = String::new();
    let mut line = |assignment: String, doc: &str, env: Option<&str>| {
        let mut comment = doc.to_string();
        if let Some(env) = env {
            comment = match (doc.is_empty(), env.ends_with("_URL")) {
                (true, true) => format!("or {env}"),
                (true, false) => env.to_string(),
                (false, _) => format!("{doc} ({env})"),
            };
        }
        let mut lines = comment.lines();
        let first = lines.next().unwrap_or_default();
        if first.is_empty() {
            out.push_str(&assignment);
        } else if assignment.len() < COMMENT_AT {
            out.push_str(&format!("{assignment:<COMMENT_AT$}# {first}"));
        } else {
            out.push_str(&format!("{assignment}   # {first}"));
        }
        out.push('\n');
        for more in lines {
            out.push_str(&format!("{:COMMENT_AT$}# {more}\n", ""));
        }
    };
    for text in TEXT {
        let value = text.default.unwrap_or_default();
        line(format!("{} = \"{value}\"", text.name), text.doc, text.env);
    }
    for number in NUMBERS {
        let default = number.default;
        let doc = match (number.min, number.max) {
            (0, u64::MAX) | (1, u64::MAX) => number.doc.to_string(),
            (min, max) => format!("{} ({min}-{max})", number.doc),
        };
        line(format!("{} = {default}", number.name), &doc, None);
    }
    for text in OPTIONAL {
        let example = match text.name {
            "tls_ca_file" => "/etc/evictd/ca.pem",
            "revalidated_tags_key" => "__revalidated_tags__",
            _ => "cache_invalidated",
        };
        line(
            format!("# {} = \"{example}\"", text.name),
            text.doc,
            text.env,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_told_by_name() {
        assert_eq!(
            DRAIN_CHUNK.bounds_problem(0).as_deref(),
            Some("drain_chunk must be at least 1")
        );
        assert_eq!(
            BATCH_LINGER_MS.bounds_problem(60_000).as_deref(),
            Some("batch_linger_ms must be at most 1000")
        );
        assert_eq!(SECOND_PASS_MS.bounds_problem(0), None);
    }
}
