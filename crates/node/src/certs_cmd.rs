//! `bunting certs`: a cluster CA and node certificates for the gossip transport's mutual TLS,
//! over [`bunting_gossip::certs`]. Meant for development and small installs; a production CA can
//! issue the same files (`ca.pem`, `node.pem`, `node.key`).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::NodeError;

#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a cluster CA (ca.pem, ca.key) in DIR; refuses to overwrite one.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate signed by the CA in --ca: writes node.pem, node.key and ca.pem
    /// into --out (the node's `tls_dir`).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// Node id (a DNS label; the name peers dial it by).
        #[arg(long)]
        node: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn gossip_error(e: bunting_gossip::Error) -> NodeError {
    NodeError::Config(format!("certs: {e}"))
}

/// Runs a `bunting certs` command and prints what it wrote.
pub fn run(args: CertsArgs) -> Result<(), NodeError> {
    match args.command {
        CertsCommand::Init { dir } => {
            let files = bunting_gossip::certs::init_ca(&dir).map_err(gossip_error)?;
            println!("CA certificate: {}", files.cert.display());
            println!("CA key:         {} (keep it private)", files.key.display());
        }
        CertsCommand::Issue { ca, node, out } => {
            let files = bunting_gossip::certs::issue(&ca, &node, &out).map_err(gossip_error)?;
            println!("node {node}:");
            println!("  certificate: {}", files.cert.display());
            println!("  key:         {}", files.key.display());
            println!("  CA:          {}", files.ca.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_gives_a_loadable_node_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let out = dir.path().join("n1");
        run(CertsArgs {
            command: CertsCommand::Init { dir: ca.clone() },
        })
        .unwrap();
        run(CertsArgs {
            command: CertsCommand::Issue {
                ca: ca.clone(),
                node: "us-east-1".into(),
                out: out.clone(),
            },
        })
        .unwrap();
        let tls = bunting_gossip::NodeTls::load(&out).unwrap();
        assert_eq!(tls.node_id(), "us-east-1");
        // A second init must not overwrite the CA key.
        let again = run(CertsArgs {
            command: CertsCommand::Init { dir: ca },
        });
        assert!(again.is_err());
    }
}
