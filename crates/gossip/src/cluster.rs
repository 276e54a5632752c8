//! The cluster configuration (one TOML file per region) and the gossip topology computed from it.
//!
//! A region file:
//!
//! ```toml
//! # regions/us-east.toml
//! region = "us-east"          # must equal the file name without ".toml"
//!
//! [[node]]
//! id = "us-east-1"            # stable node id; also the DNS name in the node's certificate
//! http = "127.0.0.11:8080"    # OFREP, admin API, metrics
//! gossip = "127.0.0.11:7070"  # QUIC (UDP) between nodes: where this node listens
//! # dial = "127.0.0.11:7071"  # optional: where peers send to reach it (a relay, a NAT, a load
//! #                           # balancer's address); `gossip` when absent
//! ```
//!
//! Names (regions and node ids) are DNS labels. Node ids, HTTP addresses and gossip addresses are
//! unique across the whole cluster.
//!
//! Topology: every node links to every other node of its region, and to `k` nodes of every other
//! region. Inside each region nodes are ordered by id; the node at position `i` picks positions
//! `i, i+1, …, i+k-1` (modulo the region's size) of every other region, which spreads the
//! cross-region links evenly. Links are symmetric: a node also links to every node that picked it,
//! so both ends agree on who their peers are and either may dial.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::{is_valid_name, Error, PeerId};

/// Default number of nodes each node links to in every other region.
pub const DEFAULT_LINKS_PER_REGION: usize = 2;

/// One node of a region file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Stable node id (a DNS label); sync states are kept under it.
    pub id: String,
    /// Where the node serves HTTP.
    pub http: SocketAddr,
    /// Where the node accepts gossip (QUIC over UDP).
    pub gossip: SocketAddr,
    /// Where peers dial this node, when that is not `gossip` (a relay or NAT in front of it;
    /// the end-to-end tests put a UDP relay there to cut and heal links).
    #[serde(default)]
    pub dial: Option<SocketAddr>,
}

impl NodeSpec {
    /// The address peers dial: `dial` when given, else `gossip`.
    pub fn dial_addr(&self) -> SocketAddr {
        self.dial.unwrap_or(self.gossip)
    }
}

/// One region: its name and nodes (sorted by id).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    #[serde(rename = "region")]
    pub name: String,
    #[serde(rename = "node", default)]
    pub nodes: Vec<NodeSpec>,
}

impl Region {
    /// Parses one region file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Region, Error> {
        let mut region: Region =
            toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        region.nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(region)
    }
}

/// A peer of a node, as the topology chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: PeerId,
    pub region: String,
    /// The address to dial it at ([`NodeSpec::dial_addr`]).
    pub gossip: SocketAddr,
}

/// All regions of a cluster, validated; regions sorted by name, nodes by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    regions: Vec<Region>,
}

impl Cluster {
    /// Reads every `*.toml` file of `dir` as a region file.
    pub fn load_dir(dir: &Path) -> Result<Cluster, Error> {
        let io = |source| Error::Io {
            path: dir.to_owned(),
            source,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                paths.push(path);
            }
        }
        paths.sort();
        let mut regions = Vec::new();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let origin = path.display().to_string();
            let region = Region::parse(&text, &origin)?;
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            if stem != region.name {
                return Err(Error::Config(format!(
                    "{origin}: region {:?} must be in a file named {}.toml",
                    region.name, region.name
                )));
            }
            regions.push(region);
        }
        Cluster::new(regions)
    }

    /// Validates regions: at least one, names are DNS labels, each region has nodes, and region
    /// names, node ids and addresses are unique.
    pub fn new(mut regions: Vec<Region>) -> Result<Cluster, Error> {
        if regions.is_empty() {
            return Err(Error::Config("no regions".into()));
        }
        regions.sort_by(|a, b| a.name.cmp(&b.name));
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for region in &mut regions {
            region.nodes.sort_by(|a, b| a.id.cmp(&b.id));
            if !is_valid_name(&region.name) {
                return Err(Error::InvalidName(region.name.clone()));
            }
            if !names.insert(region.name.clone()) {
                return Err(Error::Config(format!("region {:?} twice", region.name)));
            }
            if region.nodes.is_empty() {
                return Err(Error::Config(format!(
                    "region {:?} has no nodes",
                    region.name
                )));
            }
            for node in &region.nodes {
                if !is_valid_name(&node.id) {
                    return Err(Error::InvalidName(node.id.clone()));
                }
                if !ids.insert(node.id.clone()) {
                    return Err(Error::Config(format!("node id {:?} twice", node.id)));
                }
                let dial = node.dial.filter(|d| *d != node.gossip);
                let named = [
                    ("http", Some(node.http)),
                    ("gossip", Some(node.gossip)),
                    ("dial", dial),
                ];
                for (what, addr) in named.into_iter().filter_map(|(w, a)| Some((w, a?))) {
                    if !addrs.insert(addr) {
                        return Err(Error::Config(format!(
                            "node {:?}: {what} address {addr} is used twice",
                            node.id
                        )));
                    }
                }
            }
        }
        Ok(Cluster { regions })
    }

    /// The regions, sorted by name.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Every node with its region name, in region then id order.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, &NodeSpec)> {
        self.regions
            .iter()
            .flat_map(|r| r.nodes.iter().map(move |n| (r.name.as_str(), n)))
    }

    /// One node and its region name.
    pub fn node(&self, id: &str) -> Option<(&str, &NodeSpec)> {
        self.nodes().find(|(_, n)| n.id == id)
    }

    /// The peers of node `id` with `links_per_region` links into every other region, sorted by id.
    pub fn peers_of(&self, id: &str, links_per_region: usize) -> Result<Vec<Peer>, Error> {
        if self.node(id).is_none() {
            return Err(Error::Config(format!("node {id:?} is not in the cluster")));
        }
        let links = self.links(links_per_region);
        let by_id: BTreeMap<&str, (&str, &NodeSpec)> =
            self.nodes().map(|(r, n)| (n.id.as_str(), (r, n))).collect();
        let mut peers: Vec<Peer> = links
            .iter()
            .filter_map(|(a, b)| match (a.as_str(), b.as_str()) {
                (a, b) if a == id => Some(b),
                (a, b) if b == id => Some(a),
                _ => None,
            })
            .filter_map(|peer| by_id.get(peer))
            .map(|(region, node)| Peer {
                id: PeerId(node.id.clone()),
                region: (*region).to_owned(),
                gossip: node.dial_addr(),
            })
            .collect();
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        peers.dedup_by(|a, b| a.id == b.id);
        Ok(peers)
    }

    /// Every link of the topology, as (smaller id, larger id).
    pub fn links(&self, links_per_region: usize) -> BTreeSet<(String, String)> {
        let mut links = BTreeSet::new();
        let mut add = |a: &str, b: &str| {
            if a != b {
                let pair = if a < b { (a, b) } else { (b, a) };
                links.insert((pair.0.to_owned(), pair.1.to_owned()));
            }
        };
        for region in &self.regions {
            for (i, node) in region.nodes.iter().enumerate() {
                for other in &region.nodes {
                    add(&node.id, &other.id);
                }
                for other_region in self.regions.iter().filter(|r| r.name != region.name) {
                    let n = other_region.nodes.len();
                    for j in 0..links_per_region.min(n) {
                        add(&node.id, &other_region.nodes[(i + j) % n].id);
                    }
                }
            }
        }
        links
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(name: &str, n: usize, ip: u8) -> Region {
        Region {
            name: name.into(),
            nodes: (1..=n)
                .map(|i| NodeSpec {
                    id: format!("{name}-{i}"),
                    http: format!("127.0.{ip}.{i}:8080").parse().unwrap(),
                    gossip: format!("127.0.{ip}.{i}:7070").parse().unwrap(),
                    dial: None,
                })
                .collect(),
        }
    }

    #[test]
    fn the_shipped_region_files_form_a_six_node_full_mesh() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../regions");
        let cluster = Cluster::load_dir(&dir).unwrap();
        let names: Vec<&str> = cluster.regions().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["ap-south", "eu-west", "us-east"]);
        assert_eq!(cluster.nodes().count(), 6);
        for (_, node) in cluster.nodes() {
            assert!(node.http.ip().is_loopback() && node.gossip.ip().is_loopback());
            let peers = cluster
                .peers_of(&node.id, DEFAULT_LINKS_PER_REGION)
                .unwrap();
            assert_eq!(peers.len(), 5, "{} has {peers:?}", node.id);
        }
    }

    #[test]
    fn a_region_file_parses_and_sorts_its_nodes() {
        let text = r#"
            region = "eu-west"
            [[node]]
            id = "eu-west-2"
            http = "127.0.0.22:8080"
            gossip = "127.0.0.22:7070"
            [[node]]
            id = "eu-west-1"
            http = "127.0.0.21:8080"
            gossip = "127.0.0.21:7070"
        "#;
        let region = Region::parse(text, "eu-west.toml").unwrap();
        assert_eq!(region.name, "eu-west");
        assert_eq!(region.nodes[0].id, "eu-west-1");
        assert_eq!(region.nodes[1].gossip, "127.0.0.22:7070".parse().unwrap());
    }

    #[test]
    fn unknown_keys_duplicates_and_bad_names_are_refused() {
        let unknown = "region = \"x\"\ncolour = \"red\"\n";
        assert!(Region::parse(unknown, "x").is_err());
        let bad_addr =
            "region = \"x\"\n[[node]]\nid = \"a\"\nhttp = \"nowhere\"\ngossip = \"127.0.0.1:1\"\n";
        assert!(Region::parse(bad_addr, "x").is_err());

        let a = region("us-east", 2, 1);
        let mut b = region("eu-west", 2, 2);
        b.nodes[0].gossip = a.nodes[0].gossip;
        assert!(Cluster::new(vec![a.clone(), b]).is_err(), "shared address");
        let mut c = region("eu-west", 2, 2);
        c.nodes[0].id = a.nodes[0].id.clone();
        assert!(Cluster::new(vec![a.clone(), c]).is_err(), "shared id");
        assert!(
            Cluster::new(vec![a.clone(), a.clone()]).is_err(),
            "region twice"
        );
        assert!(Cluster::new(vec![region("Bad_Region", 1, 3)]).is_err());
        assert!(Cluster::new(vec![]).is_err());
    }

    #[test]
    fn links_are_symmetric_full_in_region_and_k_per_other_region() {
        let cluster = Cluster::new(vec![
            region("us-east", 4, 1),
            region("eu-west", 3, 2),
            region("ap-south", 5, 3),
        ])
        .unwrap();
        for k in [1, 2, 3] {
            for (home, node) in cluster.nodes() {
                let peers = cluster.peers_of(&node.id, k).unwrap();
                for peer in &peers {
                    let back = cluster.peers_of(&peer.id.0, k).unwrap();
                    assert!(back.iter().any(|p| p.id.0 == node.id), "asymmetric link");
                }
                for region in cluster.regions() {
                    let count = peers.iter().filter(|p| p.region == region.name).count();
                    if region.name == home {
                        assert_eq!(count, region.nodes.len() - 1, "mesh in {home}");
                    } else {
                        assert!(
                            count >= k.min(region.nodes.len()),
                            "{} → {}",
                            node.id,
                            region.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn topology_does_not_depend_on_the_order_regions_are_given_in() {
        let a = vec![region("us-east", 3, 1), region("eu-west", 2, 2)];
        let mut b = a.clone();
        b.reverse();
        b[0].nodes.reverse();
        let a = Cluster::new(a).unwrap();
        let b = Cluster::new(b).unwrap();
        assert_eq!(a.links(1), b.links(1));
        assert_eq!(a, b);
    }

    #[test]
    fn peers_dial_a_node_at_its_dial_address_when_one_is_given() {
        let text = r#"
            region = "eu-west"
            [[node]]
            id = "eu-west-1"
            http = "127.0.0.21:8080"
            gossip = "127.0.0.21:7070"
            dial = "127.0.0.21:7071"
            [[node]]
            id = "eu-west-2"
            http = "127.0.0.22:8080"
            gossip = "127.0.0.22:7070"
        "#;
        let cluster = Cluster::new(vec![Region::parse(text, "eu-west.toml").unwrap()]).unwrap();
        let peers = cluster.peers_of("eu-west-2", 2).unwrap();
        assert_eq!(peers[0].gossip, "127.0.0.21:7071".parse().unwrap());
        let peers = cluster.peers_of("eu-west-1", 2).unwrap();
        assert_eq!(peers[0].gossip, "127.0.0.22:7070".parse().unwrap());
        let clash = text.replace("127.0.0.21:7071", "127.0.0.22:7070");
        let region = Region::parse(&clash, "eu-west.toml").unwrap();
        assert!(
            Cluster::new(vec![region]).is_err(),
            "dial address used twice"
        );
    }

    #[test]
    fn peers_of_an_unknown_node_is_an_error() {
        let cluster = Cluster::new(vec![region("us-east", 2, 1)]).unwrap();
        assert!(cluster.peers_of("nobody", 2).is_err());
    }
}
