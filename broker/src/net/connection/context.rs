//! What every connection shares (the context the server hands each one) and what one
//! connection enforces on its own client after CONNECT (its `Guard`: ACL, publish rate).

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::Limits;
use crate::policy::acl::ClientAcl;
use crate::policy::auth::Authenticator;
use crate::policy::ratelimit::TokenBucket;
use crate::router::RouterCmd;
use crate::stats::Stats;

pub struct ConnectionContext {
    pub limits: Limits,
    pub router: mpsc::Sender<RouterCmd>,
    pub stats: Arc<Stats>,
    pub shutdown: crate::shutdown::Shutdown,
    /// True while the store cannot take more (reject_new, disk failing): publishers are
    /// not read from, so their unacknowledged messages stay with them.
    pub ingest_paused: watch::Receiver<bool>,
    /// Password check and ACL rules, shared by every connection.
    pub auth: Arc<Authenticator>,
    /// The listener's TLS settings and certificates (`None`: plain TCP); see `server::serve`.
    pub tls: Option<Arc<crate::tls::TlsListener>>,
}

/// What one connection enforces on its own client after CONNECT.
pub(super) struct Guard {
    /// `None`: no ACL configured.
    pub(super) acl: Option<Arc<ClientAcl>>,
    /// `max_publish_rate`. Boxed: most brokers set none, and every connection would carry
    /// its 40 bytes.
    pub(super) publish_rate: Option<Box<TokenBucket>>,
    /// Refusals logged so far (the first few, then one in 1000: a client publishing to a
    /// forbidden topic in a loop must not flood the log).
    pub(super) refusals: u64,
}

impl Guard {
    pub(super) fn should_log_refusal(&mut self) -> bool {
        self.refusals += 1;
        self.refusals <= 10 || self.refusals.is_multiple_of(1000)
    }
}

/// `max_topic_length` and `max_topic_levels`, for a topic name or filter.
pub(super) fn topic_within_limits(topic: &str, limits: &Limits) -> bool {
    topic.len() <= limits.max_topic_length
        && topic.bytes().filter(|b| *b == b'/').count() < limits.max_topic_levels
}
