//! The command line: `bunting serve`, and the admin CLI (`bunting flags ...`, `bunting tokens ...`)
//! over the admin REST API. Every option can also be given as a `BUNTING_*` environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::auth::Scope;
use crate::config::StoreBackend;

#[derive(Debug, Parser)]
#[command(
    name = "bunting",
    version,
    about = "Bunting: a multi-region feature-flag service"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Later issues add `dev` (a local multi-region cluster), `certs` (a dev CA) and `sim` (the
/// simulator) here.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Serve(ServeArgs),
    /// Read and change flags through a node's admin API.
    Flags(FlagsArgs),
    /// Create, list and revoke API tokens through a node's admin API.
    Tokens(TokensArgs),
    /// Create a dev cluster CA and node certificates for gossip's mutual TLS.
    Certs(crate::certs_cmd::CertsArgs),
    /// Run the whole cluster of regions/ on this machine (one child process per node).
    Dev(crate::dev::DevArgs),
    /// Run the deterministic partition simulator (the same as `bunting-sim`; see sim/README.md).
    Sim(bunting_sim::cli::SimArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Per-node TOML file (node_id, region, http, data_dir, store, [limits], [telemetry]).
    #[arg(long, env = "BUNTING_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080 (overrides the file).
    #[arg(long, env = "BUNTING_HTTP")]
    pub http: Option<std::net::SocketAddr>,
    /// Data directory (overrides the file).
    #[arg(long, env = "BUNTING_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// flagd file loaded into the flag set `default` on first start.
    #[arg(long, env = "BUNTING_FLAGS")]
    pub flags: Option<PathBuf>,
    /// Node id (overrides the file).
    #[arg(long, env = "BUNTING_NODE_ID")]
    pub node_id: Option<String>,
    /// Region (overrides the file).
    #[arg(long, env = "BUNTING_REGION")]
    pub region: Option<String>,
    /// Store backend (overrides the file).
    #[arg(long, env = "BUNTING_STORE", value_enum)]
    pub store: Option<StoreBackend>,
    /// Base URL of an OTLP/HTTP collector for traces and metrics (overrides the file).
    #[arg(long, env = "BUNTING_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// A bootstrap admin token; prefer the environment variable to keep it out of `ps`.
    #[arg(long, env = "BUNTING_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Directory of region files: joins that cluster as `--node-id` (gossip address from the files).
    #[arg(long, env = "BUNTING_REGIONS")]
    pub regions: Option<PathBuf>,
    /// Directory with ca.pem, node.pem, node.key (default: <data-dir>/tls).
    #[arg(long, env = "BUNTING_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Milliseconds without hearing from any peer after which the node reports itself stale
    /// (default 60000; overrides the file's `[cluster] stale_after_ms`).
    #[arg(long, env = "BUNTING_STALE_AFTER_MS")]
    pub stale_after_ms: Option<u64>,
    /// A bootstrap SDK key (evaluate scope, flag set `default`), like the admin token; `bunting
    /// dev` gives every node the same one, so one key works on every node.
    #[arg(long, env = "BUNTING_SDK_KEY", hide_env_values = true)]
    pub sdk_key: Option<String>,
    /// A token that opens `/metrics` (for Prometheus); without it `/metrics` needs a token with
    /// the read scope. At least 32 characters.
    #[arg(long, env = "BUNTING_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Most TCP connections open at once (overrides `[limits] max_connections`; kept below 90 %
    /// of the open-file limit).
    #[arg(long, env = "BUNTING_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most connections open at once from one client address (`[limits]
    /// max_connections_per_address`).
    #[arg(long, env = "BUNTING_MAX_CONNECTIONS_PER_ADDRESS")]
    pub max_connections_per_address: Option<usize>,
    /// Milliseconds a client has to send a request's head (`[limits] header_read_timeout_ms`).
    #[arg(long, env = "BUNTING_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// Milliseconds an idle keep-alive connection stays open (`[limits] idle_timeout_ms`).
    #[arg(long, env = "BUNTING_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Most OFREP and admin requests handled at once (`[limits] max_in_flight_requests`).
    #[arg(long, env = "BUNTING_MAX_IN_FLIGHT_REQUESTS")]
    pub max_in_flight_requests: Option<usize>,
    /// Most requests waiting for a slot before 503 (`[limits] max_queued_requests`).
    #[arg(long, env = "BUNTING_MAX_QUEUED_REQUESTS")]
    pub max_queued_requests: Option<usize>,
    /// Milliseconds a request may wait for a slot before 503 (`[limits] max_queue_wait_ms`).
    #[arg(long, env = "BUNTING_MAX_QUEUE_WAIT_MS")]
    pub max_queue_wait_ms: Option<u64>,
    /// If the store file is damaged (the node refuses to start and says so), move it aside as
    /// `<file>.damaged-<unix-ms>` (never deleted) and start empty, catching up from peers. An
    /// intact store is kept. The variable takes 1/0, true/false, yes/no, on/off.
    #[arg(long, env = "BUNTING_RESET_DATA", value_parser = clap::builder::BoolishValueParser::new())]
    pub reset_data: bool,
}

/// Where the admin CLI sends its requests.
#[derive(Debug, Args)]
pub struct Remote {
    /// Base URL of a node.
    #[arg(
        long,
        env = "BUNTING_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// API token (admin, write or read scope as the command needs).
    #[arg(long, env = "BUNTING_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

#[derive(Debug, Args)]
pub struct FlagsArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// Flag set to work on.
    #[arg(
        long,
        env = "BUNTING_FLAG_SET",
        default_value = "default",
        global = true
    )]
    pub flag_set: String,
    #[command(subcommand)]
    pub command: FlagsCommand,
}

#[derive(Debug, Subcommand)]
pub enum FlagsCommand {
    /// List the flags of the flag set.
    List,
    /// Print one flag as JSON.
    Get { key: String },
    /// Upload a whole flagd file; the node applies it as a field-level difference.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Why (recorded in the audit log).
        #[arg(short, long)]
        message: Option<String>,
    },
    /// Turn a flag on or off (flips it without --on/--off).
    Toggle {
        key: String,
        #[arg(long, conflicts_with = "off")]
        on: bool,
        #[arg(long)]
        off: bool,
        #[arg(short, long)]
        message: Option<String>,
    },
    /// The audit log, newest first (of one flag when a key is given).
    History {
        key: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long, default_value_t = 0)]
        offset: usize,
    },
    /// Keys that hold concurrent values, with every value and its author.
    Conflicts,
}

#[derive(Debug, Args)]
pub struct TokensArgs {
    #[command(flatten)]
    pub remote: Remote,
    #[command(subcommand)]
    pub command: TokensCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token; prints it once.
    Create {
        #[arg(long)]
        name: String,
        /// Scopes (repeatable): admin, write, read, evaluate.
        #[arg(long = "scope", value_enum, required = true)]
        scopes: Vec<Scope>,
        /// Flag sets the token is bound to (repeatable); all when absent.
        #[arg(long = "flag-set")]
        flag_sets: Vec<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_and_admin_commands_parse() {
        let cli = Cli::parse_from([
            "bunting",
            "serve",
            "--http",
            "127.0.0.1:0",
            "--store",
            "memory",
            "--idle-timeout-ms",
            "5000",
            "--max-connections-per-address",
            "64",
            "--reset-data",
        ]);
        match cli.command {
            Command::Serve(a) => {
                assert_eq!(a.http.unwrap().port(), 0);
                assert_eq!(a.store, Some(StoreBackend::Memory));
                assert_eq!(a.idle_timeout_ms, Some(5000));
                assert_eq!(a.max_connections_per_address, Some(64));
                assert!(a.reset_data);
            }
            _ => panic!("expected serve"),
        }
        let cli = Cli::parse_from([
            "bunting", "flags", "toggle", "banner", "--off", "--url", "http://x", "--token", "t",
        ]);
        match cli.command {
            Command::Flags(f) => {
                assert_eq!(f.remote.url, "http://x");
                assert!(matches!(f.command, FlagsCommand::Toggle { off: true, .. }));
            }
            _ => panic!("expected flags"),
        }
    }
}
