//! `bunting dev`: the whole cluster of `regions/` on this machine, one `bunting serve` child
//! process per node on its 127.0.0.x addresses, with a dev CA, embedded storage under one data
//! directory and the example flags loaded. Ctrl-C (or SIGTERM) stops every child cleanly.
//!
//! Never does: anything a node does not do in production. It only creates certificates, starts
//! processes and calls the admin API.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bunting_gossip::cluster::Cluster;
use clap::Args;
use tokio::process::{Child, Command};

use crate::{shutdown_signal, NodeError};

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the CA, every node's certificates, data and logs live (kept between runs).
    #[arg(long, env = "BUNTING_DEV_DATA_DIR", default_value = "bunting-dev")]
    pub data_dir: PathBuf,
    /// Directory of region files.
    #[arg(long, env = "BUNTING_REGIONS", default_value = "regions")]
    pub regions: PathBuf,
    /// flagd file loaded into the flag set `default` on first start (through one node; the
    /// others receive it by replication).
    #[arg(long, default_value = "examples/flags.json")]
    pub flags: PathBuf,
}

fn config_error(what: impl std::fmt::Display) -> NodeError {
    NodeError::Config(format!("dev: {what}"))
}

/// A started node.
struct Node {
    id: String,
    url: String,
    child: Child,
}

/// Creates what is missing, starts the cluster, prints how to reach it and waits for a signal.
pub async fn run(args: DevArgs) -> Result<(), NodeError> {
    let cluster = Cluster::load_dir(&args.regions).map_err(config_error)?;
    std::fs::create_dir_all(&args.data_dir)?;
    let ca_dir = args.data_dir.join("ca");
    if !bunting_gossip::certs::ca_exists(&ca_dir) {
        bunting_gossip::certs::init_ca(&ca_dir).map_err(config_error)?;
        println!("created a dev CA in {}", ca_dir.display());
    }
    let admin_token = secret(
        &args.data_dir,
        "BUNTING_ADMIN_TOKEN",
        "admin-token",
        "bnt_dev_",
    )?;
    // Tokens are stored per node, so every node is given the same SDK key at start.
    let sdk_key = secret(&args.data_dir, "BUNTING_SDK_KEY", "sdk-key", "bnt_sdk_dev_")?;
    let exe = std::env::current_exe()?;
    let mut nodes: Vec<Node> = Vec::new();
    let specs: Vec<(String, String, std::net::SocketAddr)> = cluster
        .nodes()
        .map(|(region, spec)| (region.to_owned(), spec.id.clone(), spec.http))
        .collect();
    let mut result = Ok(());
    for (i, (region, id, http)) in specs.iter().enumerate() {
        let node_dir = args.data_dir.join(id);
        let tls_dir = node_dir.join("tls");
        if !bunting_gossip::certs::node_files_exist(&tls_dir) {
            if let Err(e) = bunting_gossip::certs::issue(&ca_dir, id, &tls_dir) {
                result = Err(config_error(e));
                break;
            }
        }
        match spawn_node(
            &exe,
            &args,
            &node_dir,
            region,
            id,
            *http,
            (&admin_token, &sdk_key),
            i == 0,
        ) {
            Ok(child) => nodes.push(Node {
                id: id.clone(),
                url: format!("http://{http}"),
                child,
            }),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        result = announce(&nodes, &admin_token, &sdk_key, &args).await;
    }
    if result.is_ok() {
        tokio::select! {
            _ = shutdown_signal() => println!("\nstopping {} nodes", nodes.len()),
            (id, status) = first_exit(&mut nodes) => {
                result = Err(config_error(format!("node {id} exited ({status}); stopping the others")));
            }
        }
    }
    stop_all(&mut nodes).await;
    result
}

/// A secret every node is given (the admin token, the SDK key): from the environment variable
/// `env`, or the one kept in the data dir's `file`, or a new random one kept there.
fn secret(data_dir: &Path, env: &str, file: &str, prefix: &str) -> Result<String, NodeError> {
    if let Ok(t) = std::env::var(env) {
        if !t.is_empty() {
            // Every node would refuse it at start; say so once, here.
            crate::auth::check_bootstrap_token(env, &t).map_err(config_error)?;
            return Ok(t);
        }
    }
    let path = data_dir.join(file);
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        // A short token kept from before the length rule is replaced by a new one.
        if crate::auth::check_bootstrap_token(env, &t).is_ok() {
            return Ok(t);
        }
    }
    let mut random = [0u8; 24];
    getrandom::fill(&mut random).map_err(|e| config_error(format!("no randomness: {e}")))?;
    let token = format!("{prefix}{}", hex::encode(random));
    std::fs::write(&path, &token)?;
    Ok(token)
}

#[allow(clippy::too_many_arguments)]
fn spawn_node(
    exe: &Path,
    args: &DevArgs,
    node_dir: &Path,
    region: &str,
    id: &str,
    http: std::net::SocketAddr,
    (admin_token, sdk_key): (&str, &str),
    load_flags: bool,
) -> Result<Child, NodeError> {
    std::fs::create_dir_all(node_dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node_dir.join("bunting.log"))?;
    let mut command = Command::new(exe);
    command
        .arg("serve")
        .arg("--http")
        .arg(http.to_string())
        .arg("--data-dir")
        .arg(node_dir)
        .arg("--node-id")
        .arg(id)
        .arg("--region")
        .arg(region)
        .arg("--store")
        .arg("redb")
        .arg("--regions")
        .arg(&args.regions)
        .arg("--tls-dir")
        .arg(node_dir.join("tls"))
        .env("BUNTING_ADMIN_TOKEN", admin_token)
        .env("BUNTING_SDK_KEY", sdk_key)
        .env_remove("BUNTING_CONFIG")
        .env_remove("BUNTING_FLAGS")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if load_flags {
        command.arg("--flags").arg(&args.flags);
    }
    // SIGINT from the terminal reaches the children too; kill_on_drop covers a panic here.
    command.kill_on_drop(true);
    command
        .spawn()
        .map_err(|e| config_error(format!("starting {id}: {e}")))
}

/// Waits for every node to be ready and prints the cluster.
async fn announce(
    nodes: &[Node],
    admin_token: &str,
    sdk_key: &str,
    args: &DevArgs,
) -> Result<(), NodeError> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for node in nodes {
        loop {
            let ok = http
                .get(format!("{}/readyz", node.url))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                return Err(config_error(format!(
                    "node {} not ready after 60 s; see {}",
                    node.id,
                    args.data_dir.join(&node.id).join("bunting.log").display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!();
    println!("Bunting dev cluster: {} nodes", nodes.len());
    println!("admin token: {admin_token}  (valid on every node)");
    println!("sdk key:     {sdk_key}  (valid on every node; flag set default)");
    for node in nodes {
        println!("  {:<12} {}", node.id, node.url);
    }
    println!("logs and data: {}", args.data_dir.display());
    let first = nodes.first().map(|n| n.url.as_str()).unwrap_or("<url>");
    println!("try: curl -s -X POST -H 'Authorization: Bearer {sdk_key}' -H 'Content-Type: application/json' -d '{{\"context\":{{}}}}' {first}/ofrep/v1/evaluate/flags");
    println!("Ctrl-C stops the cluster.");
    Ok(())
}

/// The first child to exit, with its exit status.
async fn first_exit(nodes: &mut [Node]) -> (String, String) {
    loop {
        for node in nodes.iter_mut() {
            if let Ok(Some(status)) = node.child.try_wait() {
                return (node.id.clone(), status.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// SIGTERM to every child, then waits (10 s at most each) and kills what is left.
async fn stop_all(nodes: &mut [Node]) {
    for node in nodes.iter() {
        if let Some(pid) = node.child.id() {
            // `kill` keeps this crate free of unsafe code; a node stops gracefully on SIGTERM.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    for node in nodes.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(10), node.child.wait()).await {
            Ok(Ok(status)) => println!("{} stopped ({status})", node.id),
            _ => {
                let _ = node.child.kill().await;
                println!("{} killed after 10 s", node.id);
            }
        }
    }
}
