//! The `bunting` binary: parses the command line and runs the node or an admin command.

use std::process::ExitCode;

use bunting_node::cli::{Cli, Command, ServeArgs};
use bunting_node::{client, serve, shutdown_signal, NodeConfig, NodeError};
use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Sim(args) = cli.command {
        // One thread, simulated time: the simulator needs no runtime.
        return bunting_sim::cli::main_with(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bunting: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => run_serve(args).await,
            Command::Flags(args) => client::flags(args).await,
            Command::Tokens(args) => client::tokens(args).await,
            Command::Certs(args) => bunting_node::certs_cmd::run(args),
            Command::Dev(args) => bunting_node::dev::run(args).await,
            Command::Sim(_) => Ok(()), // ran above, before the runtime
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bunting: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config_from(args: ServeArgs) -> Result<NodeConfig, NodeError> {
    let (region_given, http_given) = (args.region.is_some(), args.http.is_some());
    let from_file = args.config.is_some();
    let mut config = match &args.config {
        Some(path) => NodeConfig::from_file(path)?,
        None => NodeConfig::default(),
    };
    if let Some(v) = args.http {
        config.http = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.flags {
        config.flags_file = Some(v);
    }
    if let Some(v) = args.node_id {
        config.node_id = v;
    }
    if let Some(v) = args.region {
        config.region = v;
    }
    if let Some(v) = args.store {
        config.store = v;
    }
    if let Some(v) = args.otlp_endpoint {
        config.telemetry.otlp_endpoint = Some(v);
    }
    let limits = &mut config.limits;
    for (value, field) in [
        (args.max_connections, &mut limits.max_connections),
        (
            args.max_connections_per_address,
            &mut limits.max_connections_per_address,
        ),
        (
            args.max_in_flight_requests,
            &mut limits.max_in_flight_requests,
        ),
        (args.max_queued_requests, &mut limits.max_queued_requests),
    ] {
        if let Some(v) = value {
            *field = v;
        }
    }
    for (value, field) in [
        (
            args.header_read_timeout_ms,
            &mut limits.header_read_timeout_ms,
        ),
        (args.idle_timeout_ms, &mut limits.idle_timeout_ms),
        (args.max_queue_wait_ms, &mut limits.max_queue_wait_ms),
    ] {
        if let Some(v) = value {
            *field = v;
        }
    }
    config.admin_token = args.admin_token;
    config.sdk_key = args.sdk_key;
    config.metrics_token = args.metrics_token;
    config.reset_data = args.reset_data;
    if let Some(regions) = args.regions {
        let cluster = config.cluster.get_or_insert_with(Default::default);
        cluster.regions = regions;
    }
    if let Some(dir) = args.tls_dir {
        let cluster = config.cluster.get_or_insert_with(Default::default);
        cluster.tls_dir = Some(dir);
    }
    if let (Some(cluster), Some(ms)) = (config.cluster.as_mut(), args.stale_after_ms) {
        cluster.stale_after_ms = ms;
    }
    // Without a node file, the region files say where this node listens and which region it is in.
    if let (Some(cluster), false) = (&config.cluster, from_file) {
        let (region, http) = bunting_node::gossip_link::node_in_cluster(cluster, &config.node_id)?;
        if !region_given {
            config.region = region;
        }
        if !http_given {
            config.http = http;
        }
    }
    config.check().map_err(NodeError::Config)?;
    Ok(config)
}

async fn run_serve(args: ServeArgs) -> Result<(), NodeError> {
    let config = config_from(args)?;
    let _logging =
        bunting_node::telemetry::init(&config.telemetry, &config.node_id, &config.region)?;
    let listener = tokio::net::TcpListener::bind(config.http).await?;
    // The bound address on stdout lets scripts use port 0.
    println!("listening on http://{}", listener.local_addr()?);
    serve(listener, config, shutdown_signal()).await
}
