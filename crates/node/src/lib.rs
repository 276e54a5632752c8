//! The `bunting` node: OFREP evaluation, the admin REST API, tokens, limits and metrics over HTTP.
//!
//! Owns: the wiring of everything else — the store ([`bunting_store`]), the flag-set documents
//! (one driver task, [`driver`]), compiled snapshots swapped atomically for the evaluation path
//! ([`snapshot`], [`bunting_engine`]), authentication and rate limits ([`auth`]), the HTTP routes
//! ([`http`], [`ofrep`], [`admin`]), configuration ([`config`]) and the CLI ([`cli`]).
//!
//! Never does: flag logic of its own. Validation is the model's, evaluation the engine's; the
//! HTTP layer translates bytes and the driver carries out effects (persist, publish).
//!
//! Tests start the server with [`serve`] on a listener bound to port 0.

pub mod admin;
pub mod auth;
pub mod certs_cmd;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod driver;
mod error;
pub mod gossip_link;
pub mod http;
pub mod idempotency;
pub mod listener;
pub mod ofrep;
pub mod snapshot;
pub mod telemetry;

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bunting_model::FlagSet;
use bunting_store::{MemoryStore, RedbStore, Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{NodeConfig, StoreBackend};
pub use error::{ApiError, NodeError};

/// Runs a node on `listener` until `shutdown` completes, then shuts down gracefully: no new
/// connections, in-flight requests (and so in-flight writes) finish, event streams end, the
/// driver finishes every queued write, and the store is closed before this returns.
///
/// `/healthz` answers at once; `/readyz` answers 503 until every flag set is loaded.
pub async fn serve(
    listener: TcpListener,
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    config.check().map_err(NodeError::Config)?;
    let store = open_store(&config).await?;
    serve_with_store(listener, config, store, shutdown).await
}

/// [`serve`] on a store opened by the caller (tests wrap one to make it fail on purpose).
pub async fn serve_with_store(
    listener: TcpListener,
    config: NodeConfig,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    config.check().map_err(NodeError::Config)?;
    let initial = match &config.flags_file {
        Some(path) => Some(read_flag_file(path)?),
        None => None,
    };
    let (tokens, incarnation) = {
        let store = store.clone();
        let limits = config.limits.clone();
        let admin = config.admin_token.clone();
        let sdk = config.sdk_key.clone();
        let metrics = config.metrics_token.clone().filter(|s| !s.is_empty());
        tokio::task::spawn_blocking(move || -> Result<_, NodeError> {
            let incarnation = store.next_incarnation()?;
            let tokens = auth::Tokens::load(
                store,
                limits.requests_per_second_per_token,
                limits.burst_per_token,
            )?;
            if let Some(secret) = admin.filter(|s| !s.is_empty()) {
                tokens.bootstrap(&secret, driver::now_ms())?;
            }
            if let Some(secret) = sdk.filter(|s| !s.is_empty()) {
                tokens.bootstrap_sdk(&secret, driver::now_ms())?;
            }
            metrics.inspect(|m| tokens.set_metrics_token(m));
            Ok((tokens, incarnation))
        })
        .await
        .map_err(|e| NodeError::Config(format!("startup task failed: {e}")))??
    };
    let identity = driver::Identity {
        node: config.node_id.clone(),
        region: config.region.clone(),
        incarnation,
    };
    let link = gossip_link::start(config.cluster.as_ref(), &config.node_id, &config.data_dir)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(false));
    let snapshots = Arc::new(snapshot::Snapshots::default());
    let state = Arc::new(http::AppState {
        snapshots: snapshots.clone(),
        tokens: Arc::new(tokens),
        driver: OnceLock::new(),
        ready: ready.clone(),
        identity: identity.clone(),
        limits: config.limits.clone(),
        started: Instant::now(),
        metrics: http::Metrics::default(),
        trace_evaluations: config.telemetry.otlp_endpoint.is_some(),
        stopping: stop_rx,
        gossip: link.as_ref().map(|l| l.status.clone()),
    });
    tracing::info!(
        node = %identity.node,
        region = %identity.region,
        incarnation,
        addr = ?listener.local_addr().ok(),
        "serving"
    );
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
    let loader = {
        let state = state.clone();
        let store_file =
            (config.store == StoreBackend::Redb).then(|| config.data_dir.join("bunting.redb"));
        tokio::spawn(async move {
            let started = driver::start(store, snapshots, identity, initial, ready, link).await;
            match started.map_err(|e| name_the_store_file(e, store_file.as_deref())) {
                Ok((handle, task)) => {
                    let _ = state.driver.set(handle);
                    Ok(task)
                }
                Err(e) => {
                    tracing::error!(error = %e, "loading the flag sets failed; stopping");
                    let _ = failed_tx.send(());
                    Err(e)
                }
            }
        })
    };
    let meters = match &config.telemetry.otlp_endpoint {
        Some(base) => Some(telemetry::evaluation_metrics(
            base,
            std::time::Duration::from_millis(
                config
                    .telemetry
                    .otlp_metrics_interval_ms
                    .unwrap_or(10_000)
                    .max(100),
            ),
            state.snapshots.clone(),
            &config.node_id,
            &config.region,
        )?),
        None => None,
    };
    let app = http::router(state.clone());
    let probes = http::probe_router(state.clone());
    let connection_limits = listener::ConnectionLimits::from_config(&config.limits);
    tracing::info!(
        max_connections = connection_limits.max_connections,
        max_connections_per_address = connection_limits.max_per_address,
        "connection limits"
    );
    listener::serve(
        listener,
        app,
        probes,
        connection_limits,
        Arc::new(listener::ConnectionStats::default()),
        async move {
            tokio::select! {
                _ = shutdown => {}
                Ok(()) = failed_rx => {}
            }
            tracing::info!("shutting down: finishing in-flight requests");
            let _ = stop_tx.send(true);
        },
    )
    .await;
    let task = loader
        .await
        .map_err(|e| NodeError::Config(format!("load task failed: {e}")))??;
    if let Some(handle) = state.driver.get() {
        handle.stop().await;
    }
    drop(state);
    let _ = task.await;
    if let Some(meters) = meters {
        // Flushes the last counts; the exporter blocks, so not on a runtime thread.
        let _ = tokio::task::spawn_blocking(move || meters.shutdown()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// A flag set that cannot be loaded from the store file stops the node with the file's name and
/// what to do, not only the record that failed.
fn name_the_store_file(e: NodeError, file: Option<&std::path::Path>) -> NodeError {
    match (e, file) {
        (e @ (NodeError::Store(_) | NodeError::Corrupt(_)), Some(file)) => {
            NodeError::Corrupt(format!(
                "{e}; in the store file {}. Restore the file from a backup, or move it aside and \
                 start the node again: it starts empty and catches up from its peers",
                file.display()
            ))
        }
        (e, _) => e,
    }
}

async fn open_store(config: &NodeConfig) -> Result<Arc<dyn Store>, NodeError> {
    match config.store {
        StoreBackend::Memory => Ok(Arc::new(MemoryStore::new())),
        StoreBackend::Redb => {
            let dir = config.data_dir.clone();
            let reset = config.reset_data;
            tokio::task::spawn_blocking(move || -> Result<Arc<dyn Store>, NodeError> {
                std::fs::create_dir_all(&dir)?;
                Ok(Arc::new(open_redb(&dir.join("bunting.redb"), reset)?))
            })
            .await
            .map_err(|e| NodeError::Config(format!("store open task failed: {e}")))?
        }
    }
}

/// Opens the redb store. A damaged file stops the node with the store's message (which names
/// the file and `--reset-data`), unless `reset` is set: then it is renamed to
/// `<file>.damaged-<unix-ms>`, never deleted, and the node starts on a new, empty store (with a
/// fresh random incarnation, so its actor ids cannot repeat) and catches up from its peers.
fn open_redb(path: &std::path::Path, reset: bool) -> Result<RedbStore, NodeError> {
    match RedbStore::open(path) {
        Err(StoreError::Damaged { path, detail }) if reset => {
            let mut aside = path.clone().into_os_string();
            aside.push(format!(".damaged-{}", driver::now_ms()));
            let aside = std::path::PathBuf::from(aside);
            std::fs::rename(&path, &aside).map_err(|e| {
                NodeError::Config(format!(
                    "--reset-data: cannot move the damaged store file {} aside to {}: {e}",
                    path.display(),
                    aside.display()
                ))
            })?;
            tracing::warn!(
                file = %path.display(),
                kept_as = %aside.display(),
                damage = %detail,
                "--reset-data: moved the damaged store file aside; starting empty, catching up from peers"
            );
            Ok(RedbStore::open(&path)?)
        }
        Ok(store) => {
            if reset {
                tracing::info!(
                    file = %path.display(),
                    "--reset-data given but the store file is intact; keeping it"
                );
            }
            Ok(store)
        }
        Err(e) => Err(e.into()),
    }
}

fn read_flag_file(path: &std::path::Path) -> Result<FlagSet, NodeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
    FlagSet::from_json_str(&text).map_err(|problems| NodeError::FlagFile {
        path: path.display().to_string(),
        problems,
    })
}

/// Resolves on Ctrl-C or SIGTERM: what stops `bunting serve` and `bunting dev` gracefully.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_failure_names_the_store_file_and_what_to_do() {
        let record = bunting_store::RecordId::Change {
            flag_set: "default".into(),
            seq: 7,
        };
        let corrupt = NodeError::Store(StoreError::Corrupt {
            record,
            detail: "checksum mismatch".into(),
        });
        let file = std::path::Path::new("/var/lib/bunting/bunting.redb");
        let said = name_the_store_file(corrupt, Some(file)).to_string();
        assert!(said.contains("checksum mismatch"), "{said}");
        assert!(said.contains("/var/lib/bunting/bunting.redb"), "{said}");
        assert!(
            said.contains("backup") && said.contains("move it aside"),
            "{said}"
        );
        // A memory store has no file to name; other errors pass unchanged.
        let config = NodeError::Config("x".into());
        assert_eq!(
            name_the_store_file(config, Some(file)).to_string(),
            "configuration: x"
        );
    }
}
