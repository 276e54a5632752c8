//! Per-node configuration: the TOML file (`--config node.toml`), overridden by command-line
//! options and `BUNTING_*` environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::NodeError;

/// Which [`bunting_store::Store`] backend keeps the node's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// redb, one file in the data directory (the default).
    Redb,
    /// In memory only: everything is lost when the process ends (tests, demos).
    Memory,
}

/// Everything one node needs to start. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Stable id of this node in the cluster; part of every change's author and actor id.
    pub node_id: String,
    /// The region this node serves; recorded in every change it makes.
    pub region: String,
    /// Where the HTTP server listens (used by `bunting serve`; tests pass their own listener).
    pub http: SocketAddr,
    /// Where the store keeps its files.
    pub data_dir: PathBuf,
    pub store: StoreBackend,
    /// A flagd file loaded into the flag set `default` on first start (when the store is empty).
    pub flags_file: Option<PathBuf>,
    /// A token that always has the admin scope on every flag set (from `BUNTING_ADMIN_TOKEN`);
    /// stored hashed under the token id `bootstrap-admin`, replacing any earlier bootstrap token.
    #[serde(skip)]
    pub admin_token: Option<String>,
    /// A token with the evaluate scope on the flag set `default` (from `BUNTING_SDK_KEY`); stored
    /// hashed under the token id `bootstrap-sdk`, replacing any earlier one. `bunting dev` gives
    /// every node the same key.
    #[serde(skip)]
    pub sdk_key: Option<String>,
    /// A token that opens `/metrics` (from `BUNTING_METRICS_TOKEN`); without one, `/metrics` needs
    /// a token with the read scope, so flag names are never public by default.
    #[serde(skip)]
    pub metrics_token: Option<String>,
    /// When the store file is damaged, move it aside (kept as `<file>.damaged-<unix-ms>`) and
    /// start empty, catching up from peers (`--reset-data`, `BUNTING_RESET_DATA`). An intact
    /// store is kept. A one-off operator action, so not read from the TOML file.
    #[serde(skip)]
    pub reset_data: bool,
    pub limits: LimitsConfig,
    pub telemetry: TelemetryConfig,
    /// The cluster this node gossips with; alone when absent.
    pub cluster: Option<crate::gossip_link::ClusterConfig>,
}

/// Protection against overload and hostile input.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest OFREP request body, in bytes (413 above).
    pub max_evaluation_body_bytes: usize,
    /// Largest admin request body, in bytes (413 above); defaults to the model's document limit.
    pub max_admin_body_bytes: usize,
    /// Sustained requests per second allowed to one token (429 with Retry-After above).
    pub requests_per_second_per_token: u32,
    /// Requests one token may send at once above the sustained rate.
    pub burst_per_token: u32,
    /// Longest time a request (other than an event stream) may take before it gets a 408.
    pub request_timeout_ms: u64,
    /// Most TCP connections open at once. At start the open-file limit (RLIMIT_NOFILE) is raised
    /// to its hard limit and this is lowered to 90 % of it, so the node never runs out of
    /// descriptors; a connection beyond it is closed at once.
    pub max_connections: usize,
    /// Most connections open at once from one client address (an IPv6 client: its /64); beyond
    /// it a connection is closed at once, so one client cannot fill the node. Lowered to half of
    /// `max_connections` when above it.
    pub max_connections_per_address: usize,
    /// A request's head (request line and headers) must arrive within this many milliseconds of
    /// its first byte; a new connection must send its first head within this of being accepted.
    /// The connection is closed otherwise (silent and trickling clients).
    pub header_read_timeout_ms: u64,
    /// A keep-alive connection that sends nothing for this many milliseconds after its last
    /// response is closed.
    pub idle_timeout_ms: u64,
    /// Most requests handled at once (OFREP and the admin API; health, readiness, metrics and
    /// event streams are exempt). More wait for a slot.
    pub max_in_flight_requests: usize,
    /// Most requests waiting for a slot; one more gets 503 with Retry-After at once.
    pub max_queued_requests: usize,
    /// Longest a request waits for a slot, in milliseconds, before it gets 503 with Retry-After.
    pub max_queue_wait_ms: u64,
}

/// Where traces and metrics are exported.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `RUST_LOG`-style filter for the logs; `info` when absent.
    pub log_filter: Option<String>,
    /// Logs as JSON lines instead of human-readable text.
    pub log_json: bool,
    /// Base URL of an OTLP/HTTP collector (e.g. `http://127.0.0.1:4318`); traces go to
    /// `/v1/traces`, metrics to `/v1/metrics`. Nothing is exported when absent.
    pub otlp_endpoint: Option<String>,
    /// How often metrics are exported over OTLP, in milliseconds.
    pub otlp_metrics_interval_ms: Option<u64>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: "node-1".into(),
            region: "local".into(),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("bunting-data"),
            store: StoreBackend::Redb,
            flags_file: None,
            admin_token: None,
            sdk_key: None,
            metrics_token: None,
            reset_data: false,
            limits: LimitsConfig::default(),
            telemetry: TelemetryConfig::default(),
            cluster: None,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_evaluation_body_bytes: bunting_model::limits::MAX_CONTEXT_BYTES,
            max_admin_body_bytes: bunting_model::limits::MAX_DOCUMENT_BYTES + 64 * 1024,
            requests_per_second_per_token: 50_000,
            burst_per_token: 100_000,
            request_timeout_ms: 10_000,
            max_connections: 16_384,
            max_connections_per_address: 1_024,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_in_flight_requests: 512,
            max_queued_requests: 4_096,
            max_queue_wait_ms: 1_000,
        }
    }
}

impl LimitsConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }
}

impl NodeConfig {
    /// Reads a TOML file; unknown keys are errors, so a typo does not silently fall back.
    pub fn from_file(path: &Path) -> Result<NodeConfig, NodeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        NodeConfig::from_toml(&text)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_toml(text: &str) -> Result<NodeConfig, String> {
        let config: NodeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.node_id.is_empty() || self.node_id.len() > 64 {
            return Err("node_id must be 1-64 bytes".into());
        }
        if self.region.is_empty() || self.region.len() > 64 {
            return Err("region must be 1-64 bytes".into());
        }
        for (variable, token) in [
            ("BUNTING_ADMIN_TOKEN (--admin-token)", &self.admin_token),
            ("BUNTING_SDK_KEY (--sdk-key)", &self.sdk_key),
            (
                "BUNTING_METRICS_TOKEN (--metrics-token)",
                &self.metrics_token,
            ),
        ] {
            if let Some(t) = token.as_deref().filter(|t| !t.is_empty()) {
                crate::auth::check_bootstrap_token(variable, t)?;
            }
        }
        if self.limits.requests_per_second_per_token == 0 || self.limits.burst_per_token == 0 {
            return Err(
                "limits.requests_per_second_per_token and burst_per_token must be > 0".into(),
            );
        }
        let l = &self.limits;
        for (name, value) in [
            ("max_connections", l.max_connections as u64),
            (
                "max_connections_per_address",
                l.max_connections_per_address as u64,
            ),
            ("header_read_timeout_ms", l.header_read_timeout_ms),
            ("idle_timeout_ms", l.idle_timeout_ms),
            ("max_in_flight_requests", l.max_in_flight_requests as u64),
            ("max_queue_wait_ms", l.max_queue_wait_ms),
        ] {
            if value == 0 {
                return Err(format!("limits.{name} must be > 0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default_config() {
        let c = NodeConfig::from_toml("").unwrap();
        assert_eq!(c.node_id, "node-1");
        assert_eq!(c.store, StoreBackend::Redb);
    }

    #[test]
    fn file_sets_region_node_and_store_and_rejects_typos() {
        let c = NodeConfig::from_toml(
            "node_id = \"eu-1\"\nregion = \"eu\"\nstore = \"memory\"\n[limits]\nburst_per_token = 5\n",
        )
        .unwrap();
        assert_eq!((c.node_id.as_str(), c.region.as_str()), ("eu-1", "eu"));
        assert_eq!(c.store, StoreBackend::Memory);
        assert_eq!(c.limits.burst_per_token, 5);
        let err = NodeConfig::from_toml("regoin = \"eu\"").unwrap_err();
        assert!(err.contains("regoin"), "{err}");
    }

    #[test]
    fn a_short_bootstrap_token_is_refused_naming_its_variable() {
        let mut c = NodeConfig {
            admin_token: Some("x".into()),
            ..NodeConfig::default()
        };
        let err = c.check().unwrap_err();
        assert!(
            err.contains("BUNTING_ADMIN_TOKEN") && err.contains("32"),
            "{err}"
        );
        c.admin_token = Some("a".repeat(32));
        c.sdk_key = Some(format!(" {}", "b".repeat(40)));
        assert!(c.check().unwrap_err().contains("BUNTING_SDK_KEY"));
        c.sdk_key = None;
        assert!(c.check().is_ok());
    }

    #[test]
    fn connection_limits_come_from_the_file_and_zero_is_refused() {
        let c = NodeConfig::from_toml(
            "[limits]\nmax_connections = 100\nmax_connections_per_address = 10\nheader_read_timeout_ms = 500\nidle_timeout_ms = 700\nmax_in_flight_requests = 8\nmax_queued_requests = 0\nmax_queue_wait_ms = 20\n",
        )
        .unwrap();
        let l = &c.limits;
        assert_eq!(
            (l.max_connections, l.max_connections_per_address),
            (100, 10)
        );
        assert_eq!((l.header_read_timeout_ms, l.idle_timeout_ms), (500, 700));
        assert_eq!(
            (
                l.max_in_flight_requests,
                l.max_queued_requests,
                l.max_queue_wait_ms
            ),
            (8, 0, 20)
        );
        let err = NodeConfig::from_toml("[limits]\nidle_timeout_ms = 0\n").unwrap_err();
        assert!(err.contains("idle_timeout_ms"), "{err}");
    }
}
